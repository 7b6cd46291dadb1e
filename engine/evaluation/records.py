"""Where evaluations go: run_dir/eval.jsonl (one row per evaluation: {"iteration", "time", metrics}),
run_dir/eval/iter_XXXXXXXX.jsonl (the samples table: one `Record` per prompt), TensorBoard (scalars
eval/*, and the first samples as a table in the text tab, under run_dir/tensorboard/eval) and eval.png.

"iteration" counts the iterations completed before the evaluation (0: the starting policy). A run that
resumes from the checkpoint of iteration r (r + 1 completed) keeps the rows up to r + 1 and replays the
rest, and a fresh run starts clean, so no row is lost or written twice across SIGKILL / SIGTERM: the
samples table is written (atomically) before its row is appended, and an evaluation whose row is on disk
is never repeated. Only the main process writes.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
import warnings

from engine.runtime.checkpoint import write_text_atomically
from engine.runtime.metrics import (
    TENSORBOARD_DIR,
    json_value,
    open_tensorboard,
    parse_jsonl,
    plot_panels,
    write_jsonl_atomically,
)

from .scoring import Record

EVAL_FILE = "eval.jsonl"
SAMPLES_DIR = "eval"
PLOT_FILE = "eval.png"


def samples_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, SAMPLES_DIR, f"iter_{iteration:08d}.jsonl")


def read_rows(run_dir: str) -> list[dict]:
    """The rows of run_dir/eval.jsonl ([] when there is none)."""
    path = os.path.join(run_dir, EVAL_FILE)
    return parse_jsonl(path) if os.path.exists(path) else []


class EvalLog:
    """The run's evaluation files. `keep_through`: the last evaluation row a resumed run keeps (the
    iterations its checkpoint completed), None for a fresh run (nothing kept)."""

    def __init__(self, run_dir: str, *, is_main: bool, keep_through: int | None, tensorboard: bool = True,
                 logged_samples: int = 4, tracker=None):
        self.run_dir, self.is_main, self.logged_samples = run_dir, is_main, logged_samples
        self.tracker = tracker  # engine/runtime/tracking.py (wandb): the rows and the samples tables
        self.path = os.path.join(run_dir, EVAL_FILE)
        self._writer = None
        if not is_main:
            return
        self._prepare(-1 if keep_through is None else keep_through)
        if tensorboard:
            self._writer = open_tensorboard(os.path.join(run_dir, TENSORBOARD_DIR, "eval"), keep_through)

    def _prepare(self, keep_through: int) -> None:
        rows = [row for row in read_rows(self.run_dir) if row["iteration"] <= keep_through]
        if os.path.exists(self.path):
            write_jsonl_atomically(self.path, rows)
        for stale in glob.glob(os.path.join(self.run_dir, SAMPLES_DIR, "iter_*.jsonl")):
            if int(os.path.basename(stale)[5:13]) > keep_through:
                os.remove(stale)

    def write(self, iteration: int, metrics: dict, records: list[Record]) -> None:
        """The samples table, then the row (flushed and synced), then TensorBoard."""
        if not self.is_main:
            return
        os.makedirs(os.path.join(self.run_dir, SAMPLES_DIR), exist_ok=True)
        samples = [{k: _finite(v) for k, v in dataclasses.asdict(r).items()} for r in records]
        table = "".join(json.dumps(sample, allow_nan=False) + "\n" for sample in samples)
        write_text_atomically(samples_path(self.run_dir, iteration), table)
        row = {"iteration": iteration, "time": time.time(), **{k: json_value(k, v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("iteration", "time") and value is not None:
                    self._writer.add_scalar(f"eval/{key}", value, iteration)
            self._writer.add_text("eval/samples", markdown_table(records[: self.logged_samples]), iteration)
            self._writer.flush()
        if self.tracker is not None:
            self.tracker.log(iteration, {k: v for k, v in row.items() if k not in ("iteration", "time")},
                             prefix="eval/")
            self.tracker.table(iteration, "eval/samples", samples)

    def plot(self) -> str | None:
        """eval.png: scores, win rates and KL against the iteration; None without rows or matplotlib."""
        if not self.is_main:
            return None
        rows = read_rows(self.run_dir)
        if not rows:
            return None
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            warnings.warn(f"eval.png skipped: {e} (pip install matplotlib)", stacklevel=2)
            return None
        panels = [("score", ["score", "reference_score"]),
                  ("win rate against the reference", ["win_rate", "preference_win_rate", "judge_win_rate"]),
                  ("KL to the reference policy", ["kl"])]
        path = os.path.join(self.run_dir, PLOT_FILE)
        return path if plot_panels(rows, panels, "evaluation on held-out prompts", path) else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite(value):
    """NaN / inf -> None (JSON null), like metrics.jsonl; anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def markdown_table(records: list[Record]) -> str:
    """The first samples as a Markdown table (TensorBoard's text tab renders it)."""
    head = "| # | prompt | response | reference | score | reference score | KL |\n|---|---|---|---|---|---|---|\n"

    def cell(text) -> str:
        return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")[:300]

    def num(x) -> str:
        return "" if x is None else f"{x:.4g}"

    return head + "".join(f"| {r.index} | {cell(r.prompt)} | {cell(r.response)} | {cell(r.reference)} | "
                          f"{num(r.score)} | {num(r.reference_score)} | {num(r.kl)} |\n" for r in records)
