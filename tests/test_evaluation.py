"""Evaluation on held-out prompts (engine/evaluation/, engine/evaluate.py): the metrics against a hand
computation, the rows a run writes (before training, every N, at the end), determinism, resume without
a lost or doubled row, 1 process = 2 processes, the standalone command on a final export, a checkpoint
and a model directory, and every bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import config as C
from engine.build import build
from engine.data.rewards import Feedback
from engine.evaluation import heldout
from engine.evaluation.evaluator import Evaluator, Models
from engine.evaluation.records import EVAL_FILE, read_rows, samples_path
from engine.evaluation.scoring import Record, both_orders, summarize, win
from engine.loop import train as loop_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = ("prompts", "score", "reference_score", "win_rate", "kl", "response_length", "eos_rate",
               "truncation_rate")


def eval_cfg(run_dir, *, iterations=2, every=1, **eval_kw) -> C.TrainConfig:
    ev = C.EvalConfig(**{"prompts": "builtin:counting_eval", "reference_column": "reference", "max_prompts": 10,
                         "batch_size": 4, "every": every, **eval_kw})
    return C.TrainConfig(run_dir=str(run_dir), train=C.IterationConfig(prompts_per_iteration=8, micro_batch_prompts=4),
                         optim=C.OptimConfig(iterations=iterations, lr=1e-3),
                         logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                         checkpoint=C.CheckpointConfig(every=1, keep=3, export_hf=True), eval=ev)


def _record(i, score, ref, kl, length, finished, preference=None, judge=None):
    return Record(index=i, prompt="p", response="r", reference="x", score=score, reference_score=ref,
                  preference=preference, judge=judge, kl=kl, length=length, finished=finished)


# ----------------------------------------------------------------------------------------------
# the metrics, by hand
# ----------------------------------------------------------------------------------------------
def test_summarize_by_hand():
    records = [_record(0, 1.0, 0.5, 0.2, 4, True, preference=0.9),  # a win
               _record(1, 0.5, 0.5, -0.1, 3, True, preference=0.5),  # a tie: counts half
               _record(2, -1.0, 0.25, 0.5, 8, False, preference=0.0),  # cut: the EOS penalty, a loss
               _record(3, 0.75, 1.0, 0.0, 5, True, preference=0.4)]  # a loss
    row = summarize(records)
    assert row["prompts"] == 4
    assert row["score"] == pytest.approx((1.0 + 0.5 - 1.0 + 0.75) / 4)
    assert row["reference_score"] == pytest.approx((0.5 + 0.5 + 0.25 + 1.0) / 4)
    assert row["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert row["kl"] == pytest.approx((0.2 - 0.1 + 0.5 + 0.0) / 4)
    assert row["response_length"] == pytest.approx(5.0)
    assert row["eos_rate"] == pytest.approx(0.75) and row["truncation_rate"] == pytest.approx(0.25)
    assert row["preference_win_rate"] == pytest.approx((0.9 + 0.5 + 0.0 + 0.4) / 4)
    assert "judge_win_rate" not in row
    assert (win(1, 0), win(0, 0), win(0, 1)) == (1.0, 0.5, 0.0)


def test_both_orders_cancels_position_bias():
    def first_wins(prompts, a, b):  # a judge that always prefers the first response shown
        return [0.8] * len(prompts)

    def by_length(prompts, a, b):
        return torch.tensor([1.0 if len(x) > len(y) else 0.0 for x, y in zip(a, b)])

    out = both_orders(first_wins, ["p", "q"], ["a", "b"], ["c", "d"], what="the judge", device="cpu")
    assert out.tolist() == pytest.approx([0.5, 0.5])
    out = both_orders(by_length, ["p", "q"], ["long", "b"], ["c", "longer"], what="the judge", device="cpu")
    assert out.tolist() == [1.0, 0.0]


def test_batches_do_not_depend_on_the_process_count():
    batches = heldout.batches(10, 4)
    assert [list(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert heldout.shard(batches, 0, 2) == [0, 2] and heldout.shard(batches, 1, 2) == [1]
    assert sorted(heldout.shard(batches, 0, 1)) == [0, 1, 2]


def test_samples_reach_tensorboard(tmp_path):
    from engine.evaluation.records import EvalLog, markdown_table

    records = [_record(0, 1.0, 0.5, 0.2, 4, True), _record(1, 0.5, 0.5, float("nan"), 3, False)]
    table = markdown_table(records)
    assert table.splitlines()[0].startswith("| # | prompt | response | reference |") and "| 1 | p | r | x |" in table
    log = EvalLog(str(tmp_path), is_main=True, keep_through=None, tensorboard=True, logged_samples=1)
    log.write(0, summarize(records), records)
    log.close()
    assert os.listdir(tmp_path / "tensorboard" / "eval")  # the event file
    with open(samples_path(str(tmp_path), 0)) as f:
        assert json.loads(f.readlines()[1])["kl"] is None  # NaN is written as null


def test_counting_eval_split():
    from engine.data.tasks import counting_eval, counting_reward

    rows = counting_eval()
    assert len(rows) == 200 and {len(r["prompt"]) for r in rows} == set(range(2, 8))
    scores = counting_reward([r["prompt"] for r in rows], [r["reference"] for r in rows])
    assert min(scores) >= 0.25 and max(scores) == 1.0


# ----------------------------------------------------------------------------------------------
# in a run
# ----------------------------------------------------------------------------------------------
def _rows_without_time(run_dir):
    return [{k: v for k, v in row.items() if k not in ("time", "seconds")} for row in read_rows(str(run_dir))]


def test_run_writes_rows_samples_and_phase_time(tmp_path):
    cfg = eval_cfg(tmp_path / "run", iterations=3, every=2)
    status = loop_train(build(cfg))
    rows = read_rows(cfg.run_dir)
    assert [row["iteration"] for row in rows] == [0, 2, 3]  # before training, every 2, the end
    for row in rows:
        assert set(METRIC_KEYS) <= set(row) and row["prompts"] == 10
        with open(samples_path(cfg.run_dir, row["iteration"])) as f:
            table = [json.loads(line) for line in f]
        assert [r["index"] for r in table] == list(range(10))
        columns = {"prompt", "response", "reference", "score", "reference_score", "kl", "length", "finished"}
        assert columns <= set(table[0])
        assert row["score"] == pytest.approx(sum(r["score"] for r in table) / 10)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert ["time/eval" in m for m in metrics] == [False, True, True]
    assert status.failure is None


def test_same_weights_same_rows_and_kl_zero_at_start(tmp_path):
    """Evaluation draws from its own seeded stream: the starting policy's row is the same in two runs, and
    its KL to the reference (its own copy) is exactly 0."""
    first = eval_cfg(tmp_path / "a", iterations=1, temperature=0.7)
    second = dataclasses.replace(first, run_dir=str(tmp_path / "b"), seed=0)
    loop_train(build(first))
    loop_train(build(second))
    a, b = _rows_without_time(first.run_dir), _rows_without_time(second.run_dir)
    assert a == b and a[0]["kl"] == 0.0


def test_preference_model_win_rate(tmp_path):
    """With a preference model configured (REBEL from preferences), the row holds its mean P(policy >
    reference), both orders, with the missing-EOS rule: a cut response loses to the finished reference."""
    base = eval_cfg(tmp_path / "run", iterations=1)
    pref = C.PRESETS["counting_rebel_preference"]()
    cfg = dataclasses.replace(base, algorithm=pref.algorithm, generation=pref.generation)
    run = build(cfg)
    row = run.evaluator(Models.of(run), 0)
    with open(samples_path(cfg.run_dir, 0)) as f:
        table = [json.loads(line) for line in f]
    assert row["preference_win_rate"] == pytest.approx(sum(r["preference"] for r in table) / len(table))
    assert all(r["preference"] == 0.0 for r in table if not r["finished"])
    assert all(0.0 <= r["preference"] <= 1.0 for r in table)
    run.lock.release()


def test_resume_keeps_rows_once(tmp_path):
    """A run killed after an evaluation row but before its checkpoint replays it once; a resumed run does
    not repeat the rows its checkpoint covers; a fresh run in the same directory starts clean."""
    cfg = eval_cfg(tmp_path / "run", iterations=2)
    loop_train(build(cfg))
    before = _rows_without_time(cfg.run_dir)
    assert [r["iteration"] for r in before] == [0, 1, 2]
    # as if killed after the row of iteration 3 was written, before the checkpoint of iteration 2
    with open(os.path.join(cfg.run_dir, EVAL_FILE), "a") as f:
        f.write(json.dumps({"iteration": 3, "time": 0.0, "score": 99.0}) + "\n")
    longer = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, iterations=4),
                                 checkpoint=dataclasses.replace(cfg.checkpoint, allow_config_change=True))
    loop_train(build(longer))
    after = _rows_without_time(cfg.run_dir)
    assert [r["iteration"] for r in after] == [0, 1, 2, 3, 4]
    assert after[:3] == before and after[3]["score"] != 99.0
    fresh = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), seed=1)
    import shutil

    shutil.rmtree(os.path.join(cfg.run_dir, "checkpoints"))
    loop_train(build(fresh))
    assert [r["iteration"] for r in read_rows(cfg.run_dir)] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# the standalone command
# ----------------------------------------------------------------------------------------------
def _evaluate(*args, torchrun: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    out = subprocess.run([*launcher, os.path.join(REPO, "engine", "evaluate.py"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    return out


def test_standalone_final_checkpoint_model_and_two_processes(tmp_path):
    cfg = eval_cfg(tmp_path / "run", iterations=2)
    loop_train(build(cfg))
    in_run = {r["iteration"]: r for r in _rows_without_time(cfg.run_dir)}
    run = ("--run_dir", cfg.run_dir)
    for args, name, iteration in (((*run,), "final", 2),
                                  ((*run, "--checkpoint", "step_00000000"), "step_00000000", 1),
                                  ((*run, "--model", "builtin:tiny-llama"), "builtin_tiny-llama", 0)):
        out = _evaluate(*args)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = _rows_without_time(os.path.join(cfg.run_dir, "evaluate", name))
        assert len(rows) == 1 and rows[0]["iteration"] == iteration
        for key in METRIC_KEYS:  # the same weights as the run's own evaluation at that point
            assert rows[0][key] == pytest.approx(in_run[iteration][key], rel=1e-5, abs=1e-6), (name, key)
    assert "| model |" in out.stdout and out.stdout.count("\n|") >= 4  # header, rule, three rows
    two = _evaluate("--run_dir", cfg.run_dir, "--out", str(tmp_path / "two"), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    (row,) = _rows_without_time(tmp_path / "two" / "final")
    for key in METRIC_KEYS:
        assert row[key] == pytest.approx(in_run[2][key], rel=1e-5, abs=1e-6), key


def test_standalone_lora_adapter_export(tmp_path):
    """A LoRA run's final export is the adapter: evaluated on the starting model with it loaded, it gives the
    run's own last row (the reference being the adapter off)."""
    base = eval_cfg(tmp_path / "run", iterations=2)
    lora = C.PRESETS["counting_lora"]()
    cfg = dataclasses.replace(base, model=lora.model, optim=dataclasses.replace(base.optim, lr=lora.optim.lr))
    loop_train(build(cfg))
    assert os.path.exists(os.path.join(cfg.run_dir, "final", "adapter_config.json"))
    out = _evaluate("--run_dir", cfg.run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = _rows_without_time(os.path.join(cfg.run_dir, "evaluate", "final"))
    last = _rows_without_time(cfg.run_dir)[-1]
    for key in METRIC_KEYS:
        assert row[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key


def test_standalone_hf_model_directory(tmp_path):
    from engine.data.tasks import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model_dir = tmp_path / "sft"
    tiny_llama(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = _evaluate("--model", str(model_dir), "--out", str(tmp_path / "out"), "--eval.max_prompts", "6",
                    "--eval.batch_size", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = read_rows(str(tmp_path / "out" / "sft"))  # a model directory's output is named after it
    assert row["prompts"] == 6 and row["kl"] == pytest.approx(0.0, abs=1e-5)  # the model is its own reference


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _build_evaluator(tmp_path, feedback=None, **eval_kw):
    from engine.data.tasks import char_tokenizer, counting_reward
    from engine.runtime.parallel import Dist

    cfg = eval_cfg(tmp_path / "run", **eval_kw)
    dist = Dist(rank=0, world=1, device=torch.device("cpu"), sharded=False)
    return Evaluator.build(cfg, char_tokenizer(), dist, feedback or Feedback(reward=counting_reward))


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_missing_reference_column_names_the_columns(tmp_path):
    data = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "123", "answer": "4567"}])
    with pytest.raises(ValueError, match=r"eval.reference_column 'reference' .* it has \['answer', 'prompt'\]"):
        _build_evaluator(tmp_path, prompts=data)


def test_empty_split_and_no_scorer(tmp_path):
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="eval.prompts .* is empty"):
        _build_evaluator(tmp_path, prompts=empty)
    with pytest.raises(ValueError, match="nothing scores the responses: set reward.model or reward.function"):
        _build_evaluator(tmp_path, feedback=Feedback(reward=None))
    with pytest.raises(ValueError, match="eval.judge=.* set eval.reference_column"):
        eval_cfg(tmp_path, judge="tests.test_evaluation:nan_judge", reference_column=None)
    with pytest.raises(ValueError, match="eval.every must be >= 0"):
        eval_cfg(tmp_path, every=-1)


def nan_judge(prompts, responses, others):
    return [float("nan")] * len(prompts)


def text_judge(prompts, responses, others):
    return ["yes"] * len(prompts)


def test_bad_judge_is_named(tmp_path, caplog):
    """A judge returning the wrong type stops the evaluation with its name; one returning NaN is named in a
    warning and its win rate is null (training goes on, as with a reward function's NaN)."""
    cfg = eval_cfg(tmp_path / "run", iterations=1, judge="tests.test_evaluation:text_judge")
    run = build(cfg)
    with pytest.raises(TypeError, match=r"the judge tests.test_evaluation:text_judge must return a list"):
        run.evaluator(Models.of(run), 0)
    run.evaluator.judge = nan_judge
    row = run.evaluator(Models.of(run), 0)
    assert "nan_judge returned 4 non-finite probabilities of 4" in caplog.text  # per batch of 4
    assert "left out of the evaluation's mean" in caplog.text
    assert read_rows(cfg.run_dir)[-1]["judge_win_rate"] is None and row["score"] == row["score"]


# ----------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ----------------------------------------------------------------------------------------------
def test_wandb_offline_mirrors_metrics_eval_rows_and_samples(tmp_path, monkeypatch):
    import glob

    import wandb  # noqa: F401  (an optional tracker; the test extra installs it)

    from engine.runtime import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = {}
    close = tracking.WandbTracker.close

    def keep_summary(self):  # an offline run keeps its summary in a binary log: read it before finish
        summary.update({key: self.run.summary[key] for key in self.run.summary.keys()})
        close(self)

    monkeypatch.setattr(tracking.WandbTracker, "close", keep_summary)
    cfg = eval_cfg(tmp_path / "run", iterations=1)
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=True, wandb_project="test"))
    loop_train(build(cfg))
    assert {"reward/mean", "time/eval", "eval/score", "eval/kl", "eval/samples"} <= set(summary)
    assert summary["eval/win_rate"] == pytest.approx(read_rows(cfg.run_dir)[-1]["win_rate"])
    tables = glob.glob(os.path.join(cfg.run_dir, "wandb", "offline-run-*", "files", "media", "table", "eval",
                                    "samples_*.table.json"))
    assert len(tables) == 2  # before training and after the one iteration
    with open(tables[0]) as f:
        table = json.load(f)
    assert {"prompt", "response", "reference", "score", "kl"} <= set(table["columns"]) and len(table["data"]) == 10
    assert os.path.exists(os.path.join(cfg.run_dir, "wandb_id.txt"))


def test_wandb_asked_for_but_missing(monkeypatch, capsys):
    from engine import train as train_cmd
    from engine.runtime import tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        train_cmd.main(["--logging.wandb", "true"])
    assert exit_info.value.code == 2
    assert "logging.wandb is true but the wandb package is not installed: pip install wandb" in capsys.readouterr().err
