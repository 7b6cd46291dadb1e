"""What a run records and what a user watches: metrics.jsonl, TensorBoard scalars, PNG plots, a
progress bar and per-phase wall times.

    logger = MetricsLogger(cfg.run_dir, is_main=rank == 0, resume_from=start_iteration)
    timer, progress = PhaseTimer(sync_cuda=True), Progress(total, initial=start_iteration)
    for i in range(start_iteration + 1, total + 1):
        progress.phase("generate")
        with timer("generate"):
            ...
        metrics = {...} | timer.pop()
        logger.log(i, metrics)
        progress.advance(metrics)
    logger.plot(); logger.close(); progress.close()

run_dir/metrics.jsonl holds one JSON object per iteration, {"iteration": i, "time": unix_ts, ...},
with non-finite values written as null so that every line is valid JSON. Only the main process
writes anything; other ranks build a logger with is_main=False, which does nothing.
TensorBoard and matplotlib are optional: without them the scalars or the plots are skipped with a
one-line warning.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("iteration", "time")
# Progress bar postfix: metric name -> short label.
_POSTFIX_KEYS = {"reward/mean": "reward", "kl/mean": "kl", "loss/last": "loss", "time/iteration": "s/it"}


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def json_value(key: str, value: Any) -> int | float | None:
    """An int stays an int; anything else float()-able (float, 0-dim tensor, numpy scalar) becomes a
    float, and a non-finite float becomes None (JSON null)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(f"metric {key!r} must be a number, got a tensor of shape {tuple(value.shape)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from None
    return number if math.isfinite(number) else None


def parse_jsonl(path: str) -> list[dict]:
    """Rows of a metrics file. A last line cut short by a crash mid-write is dropped with a
    warning; any other line that is not a JSON object is a ValueError naming file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # no trailing newline: an interrupted append
                warnings.warn(f"{path}:{lineno}: dropping an incomplete last line ({e})", stacklevel=3)
                continue
            raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'iteration', got {line!r}")
        rows.append(row)
    return rows


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of run_dir/metrics.jsonl in file order (null values read back as None)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    return parse_jsonl(path)


def write_jsonl_atomically(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_metrics_file(path: str, resume_from: int | None) -> None:
    """Before appending: on resume, drop the rows the resumed run will replay (iteration >
    resume_from); in any case, drop an incomplete last line so the next append starts a new line."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(size - 1, 0))
        complete = size == 0 or f.read(1) == b"\n"
    if resume_from is None and complete:
        return
    rows = parse_jsonl(path)
    if resume_from is not None:
        rows = [row for row in rows if row["iteration"] <= resume_from]
    write_jsonl_atomically(path, rows)


# ----------------------------------------------------------------------------------------------
# The logger


def open_tensorboard(log_dir: str, resume_from: int | None):
    """A SummaryWriter whose steps after `resume_from` are purged (None: a fresh run); None, with a
    warning, without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        warnings.warn(f"TensorBoard logging skipped: {e} (pip install tensorboard)", stacklevel=3)
        return None
    # purge_step hides the events of the iterations a resumed run replays.
    return SummaryWriter(log_dir, purge_step=None if resume_from is None else resume_from + 1)


class MetricsLogger:
    """Appends one row per iteration to run_dir/metrics.jsonl and, optionally, TensorBoard scalars
    under run_dir/tensorboard/; plot() renders PNGs from the jsonl. With is_main=False (ranks other
    than 0) every method is a no-op and nothing is created on disk."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, plots: bool = True, is_main: bool = True,
                 resume_from: int | None = None, tracker=None):
        if resume_from is not None and resume_from < 0:
            raise ValueError(f"resume_from must be >= 0 or None, got {resume_from!r}")
        self.run_dir = run_dir
        self.tracker = tracker  # engine/runtime/tracking.py (wandb), mirrors each row; None: none
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.is_main = is_main
        self.plots = plots
        self._file: TextIO | None = None
        self._writer = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        _prepare_metrics_file(self.path, resume_from)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._writer = open_tensorboard(os.path.join(run_dir, TENSORBOARD_DIR), resume_from)

    def log(self, iteration: int, metrics: dict[str, float | int]) -> None:
        """Appends {"iteration", "time", **metrics} (flushed); non-finite values become null in the
        file and are not sent to TensorBoard."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger({self.run_dir!r}) is closed")
        if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral):
            raise TypeError(f"iteration must be an int, got {type(iteration).__name__}: {iteration!r}")
        for key in _RESERVED_KEYS:
            if key in metrics:
                raise ValueError(f"metric name {key!r} is reserved (it is written by the logger)")
        values = {key: json_value(key, value) for key, value in metrics.items()}
        row = {"iteration": int(iteration), "time": time.time(), **values}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if value is not None:
                    self._writer.add_scalar(key, value, int(iteration))
            self._writer.flush()
        if self.tracker is not None:
            self.tracker.log(int(iteration), values)

    def plot(self) -> list[str]:
        """PNGs in run_dir from metrics.jsonl: reward.png, kl.png and loss.png, each when its metrics
        were logged. Returns the paths written ([] on other ranks, with plots=False, or without
        matplotlib)."""
        if not (self.is_main and self.plots) or not os.path.exists(self.path):
            return []
        if self._file is not None:
            self._file.flush()
        return write_plots(self.run_dir, read_metrics(self.run_dir))

    def close(self) -> None:
        """Closes the file and the TensorBoard writer; calling it again does nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Plots


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the rows where `key` has a (finite) value."""
    pairs = [(row["iteration"], row[key]) for row in rows if row.get(key) is not None]
    return [i for i, _ in pairs], [v for _, v in pairs]


def _save_figure(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick; pyplot is never imported
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _new_axes(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_reward(rows: list[dict], path: str) -> bool:
    its, mean = _series(rows, "reward/mean")
    if not its:
        return False
    fig, ax = _new_axes("Reward", "reward")
    ax.plot(its, mean, marker=".", label="reward/mean")
    std_by_it = {row["iteration"]: row.get("reward/std") for row in rows}
    band = [(i, m, std_by_it[i]) for i, m in zip(its, mean) if std_by_it.get(i) is not None]
    if band:
        ax.fill_between([i for i, _, _ in band], [m - s for _, m, s in band], [m + s for _, m, s in band],
                        alpha=0.25, label="+-1 std")
    ax.legend()
    _save_figure(fig, path)
    return True


def plot_lines(rows: list[dict], keys: list[str], title: str, ylabel: str, path: str) -> bool:
    series = {key: _series(rows, key) for key in keys}
    if not any(its for its, _ in series.values()):
        return False
    fig, ax = _new_axes(title, ylabel)
    for key, (its, values) in series.items():
        if its:
            ax.plot(its, values, marker=".", label=key)
    ax.legend()
    _save_figure(fig, path)
    return True


def plot_panels(rows: list[dict], panels: list[tuple[str, list[str]]], title: str, path: str) -> bool:
    """One PNG of side-by-side panels (panel title, metric keys) against the iteration, panels without
    values left out; False when none has any."""
    drawn = [(name, keys) for name, keys in panels if any(_series(rows, key)[0] for key in keys)]
    if not drawn:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(drawn), 3.6), layout="constrained")
    fig.suptitle(title)
    for ax, (name, keys) in zip(fig.subplots(1, len(drawn), squeeze=False)[0], drawn):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        for key in keys:
            its, values = _series(rows, key)
            if its:
                ax.plot(its, values, marker=".", label=key)
        ax.legend()
    _save_figure(fig, path)
    return True


def write_plots(run_dir: str, rows: list[dict]) -> list[str]:
    """reward.png (reward/mean with a +-1 std band), kl.png (kl/mean) and, when both loss/first and
    loss/last were logged, loss.png; each written atomically. Returns the paths written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        warnings.warn(f"plots skipped: {e} (pip install matplotlib)", stacklevel=2)
        return []
    if len(rows) > 1:  # a replayed iteration keeps its last row
        rows = list({row["iteration"]: row for row in rows}.values())
        rows.sort(key=lambda row: row["iteration"])
    written = []
    path = os.path.join(run_dir, "reward.png")
    if _plot_reward(rows, path):
        written.append(path)
    path = os.path.join(run_dir, "kl.png")
    if plot_lines(rows, ["kl/mean"], "KL to the reference", "kl", path):
        written.append(path)
    has_loss = all(any(row.get(key) is not None for row in rows) for key in ("loss/first", "loss/last"))
    path = os.path.join(run_dir, "loss.png")
    if has_loss and plot_lines(rows, ["loss/first", "loss/last"], "REBEL loss (first / last step)", "loss", path):
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# What a user watches


def _format_number(value: Any) -> str:
    if isinstance(value, numbers.Integral):
        return str(int(value))
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """A tqdm bar over iterations: the description shows the iteration and its current phase
    ("iter 3/40 | generate"), the postfix a few key metrics, tqdm itself the rate and the ETA.
    With enabled=False (or without tqdm) it does nothing."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, file: TextIO | None = None):
        if not 0 <= initial <= total:
            raise ValueError(f"Progress needs 0 <= initial <= total, got initial={initial}, total={total}")
        self.total = total
        self.done = initial
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError as e:
            warnings.warn(f"progress bar disabled: {e} (pip install tqdm)", stacklevel=2)
            return
        self._bar = tqdm(total=total, initial=initial, unit="iter", dynamic_ncols=True,
                         file=sys.stderr if file is None else file, desc=self._description("start"))

    def _description(self, name: str) -> str:
        return f"iter {min(self.done + 1, self.total)}/{self.total} | {name}"

    def phase(self, name: str) -> None:
        """Shows `name` as the phase of the iteration in progress."""
        if self._bar is not None:
            self._bar.set_description_str(self._description(name), refresh=True)

    def advance(self, metrics: dict) -> None:
        """One iteration done: the postfix shows reward/mean, kl/mean, loss/last and time/iteration
        (those present), and the bar steps by one."""
        self.done += 1
        if self._bar is None:
            return
        shown = {label: metrics[key] for key, label in _POSTFIX_KEYS.items() if metrics.get(key) is not None}
        self._bar.set_postfix_str(", ".join(f"{k}={_format_number(v)}" for k, v in shown.items()), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PhaseTimer:
    """Wall time of each phase of an iteration, accumulated over repeated `with timer(name)` blocks
    until pop(). With sync_cuda, CUDA is synchronized before each clock read so that the time of
    queued kernels lands in the phase that launched them."""

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self._seconds: dict[str, float] = {}

    def _now(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + self._now() - start

    def pop(self) -> dict[str, float]:
        """{"time/<name>": seconds, ...} accumulated since the last pop, in first-use order; resets."""
        out = {f"time/{name}": seconds for name, seconds in self._seconds.items()}
        self._seconds = {}
        return out
