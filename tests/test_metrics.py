"""engine.runtime.metrics: metrics.jsonl round trip and resume, TensorBoard, plots, progress bar, phase timer."""
import importlib.util
import io
import json
import math
import os
import time

import pytest
import torch

from engine.runtime.metrics import MetricsLogger, PhaseTimer, Progress, read_metrics

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _log_iterations(run_dir, iterations, **kwargs):
    with MetricsLogger(str(run_dir), **kwargs) as logger:
        for i in iterations:
            logger.log(i, {"reward/mean": 0.1 * i, "reward/std": 0.5, "kl/mean": 0.01 * i,
                           "loss/first": 1.0 / i, "loss/last": 0.5 / i, "skipped_batches": 0})


def test_jsonl_round_trip_with_non_finite_values(tmp_path):
    before = time.time()
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        logger.log(1, {"reward/mean": 0.25, "kl/mean": float("nan"), "loss/last": float("inf"),
                       "skipped_batches": 3, "memory/peak_gib": torch.tensor(1.5)})
        logger.log(2, {"reward/mean": -0.5, "kl/mean": 0.125})
    rows = read_metrics(str(tmp_path))
    assert [row["iteration"] for row in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.25 and rows[0]["kl/mean"] is None and rows[0]["loss/last"] is None
    assert rows[0]["skipped_batches"] == 3 and isinstance(rows[0]["skipped_batches"], int)
    assert rows[0]["memory/peak_gib"] == 1.5
    assert before <= rows[0]["time"] <= rows[1]["time"] <= time.time()
    with open(tmp_path / "metrics.jsonl") as f:  # strict JSON: no NaN / Infinity tokens
        for line in f:
            json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON constant {token}"))


def test_log_is_flushed_before_close(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    logger.log(1, {"reward/mean": 1.0})
    assert read_metrics(str(tmp_path))[0]["reward/mean"] == 1.0
    logger.close()
    logger.close()  # idempotent


def test_bad_metrics_are_rejected_with_their_name(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'reward/mean'"):
            logger.log(1, {"reward/mean": "high"})
        with pytest.raises(TypeError, match="'kl/mean'"):
            logger.log(1, {"kl/mean": torch.ones(3)})
        with pytest.raises(ValueError, match="'iteration' is reserved"):
            logger.log(1, {"iteration": 2})
        with pytest.raises(TypeError, match="iteration must be an int"):
            logger.log(1.0, {})
    with pytest.raises(ValueError, match="resume_from"):
        MetricsLogger(str(tmp_path), resume_from=-1)


def test_resume_drops_replayed_iterations(tmp_path):
    _log_iterations(tmp_path, range(1, 6), tensorboard=False)
    _log_iterations(tmp_path, range(3, 5), tensorboard=False, resume_from=2)
    rows = read_metrics(str(tmp_path))
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    MetricsLogger(str(tmp_path), tensorboard=False, resume_from=0).close()
    assert read_metrics(str(tmp_path)) == []


def test_interrupted_last_line_is_dropped(tmp_path):
    _log_iterations(tmp_path, [1, 2], tensorboard=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "rew')  # a crash in the middle of an append
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert [row["iteration"] for row in read_metrics(str(tmp_path))] == [1, 2]
    with pytest.warns(UserWarning, match="incomplete last line"):
        _log_iterations(tmp_path, [3], tensorboard=False)  # not resuming: appends after the repair
    assert [row["iteration"] for row in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(str(tmp_path / "missing"))


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(str(run_dir), is_main=False, resume_from=3)
    logger.log(1, {"reward/mean": 1.0, "kl/mean": 0.1})
    assert logger.plot() == []
    logger.close()
    assert not run_dir.exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_events_written(tmp_path):
    _log_iterations(tmp_path, [1, 2])
    with MetricsLogger(str(tmp_path)) as logger:
        logger.log(3, {"kl/mean": float("nan"), "reward/mean": 0.3})
    files = os.listdir(tmp_path / "tensorboard")
    events = [name for name in files if name.startswith("events.out.tfevents")]
    assert events and all(os.path.getsize(tmp_path / "tensorboard" / name) > 0 for name in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("kl/mean")] == [1, 2]  # the NaN never reached TensorBoard


def test_tensorboard_can_be_turned_off(tmp_path):
    _log_iterations(tmp_path, [1], tensorboard=False)
    assert not (tmp_path / "tensorboard").exists()


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_are_valid_pngs(tmp_path):
    _log_iterations(tmp_path, range(1, 11), tensorboard=False)
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        logger.log(11, {"reward/mean": float("nan"), "kl/mean": 0.2})  # a null point is skipped
        paths = logger.plot()
    assert sorted(os.path.basename(p) for p in paths) == ["kl.png", "loss.png", "reward.png"]
    for path in paths:
        _assert_png(path)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_only_for_logged_metrics(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        for i in range(1, 4):
            logger.log(i, {"reward/mean": float(i), "kl/mean": 0.1, "loss/last": 0.5})  # no loss/first, no std
        paths = logger.plot()
    assert sorted(os.path.basename(p) for p in paths) == ["kl.png", "reward.png"]
    for path in paths:
        _assert_png(path)
    with MetricsLogger(str(tmp_path / "off"), tensorboard=False, plots=False) as logger:
        logger.log(1, {"reward/mean": 1.0})
        assert logger.plot() == []


def test_phase_timer_accumulates_and_pops():
    timer = PhaseTimer()
    with timer("generate"):
        time.sleep(0.02)
    with timer("train"):
        time.sleep(0.01)
    with timer("generate"):
        time.sleep(0.02)
    times = timer.pop()
    assert list(times) == ["time/generate", "time/train"]
    assert times["time/generate"] >= 0.04 and times["time/train"] >= 0.01
    assert times["time/generate"] < 2.0
    assert timer.pop() == {}
    with pytest.raises(RuntimeError):
        with timer("score"):
            raise RuntimeError("boom")
    assert set(timer.pop()) == {"time/score"}  # the failed phase is still timed


def test_phase_timer_sync_cuda_without_cuda():
    timer = PhaseTimer(sync_cuda=True)  # falls back to the plain clock when CUDA is absent
    with timer("generate"):
        pass
    assert timer.pop()["time/generate"] >= 0.0


def test_progress_disabled_is_silent(capsys):
    progress = Progress(5, initial=2, enabled=False)
    progress.phase("generate")
    progress.advance({"reward/mean": 1.0})
    progress.close()
    assert progress.done == 3
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_shows_phase_and_metrics():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    progress = Progress(4, initial=1, file=out)
    progress.phase("generate")
    assert "iter 2/4 | generate" in out.getvalue()
    progress.advance({"reward/mean": 0.123456, "kl/mean": float("nan"), "loss/last": None,
                      "time/iteration": 2.5, "eos_rate": 1.0})
    progress.phase("train")
    progress.close()
    text = out.getvalue()
    assert "iter 3/4 | train" in text
    assert "reward=0.1235" in text and "kl=nan" in text and "s/it=2.5" in text
    assert "loss=" not in text and "eos_rate" not in text
    assert "2/4" in text  # the bar itself counts from `initial`
    with pytest.raises(ValueError, match="initial"):
        Progress(3, initial=4, enabled=False)


def test_metrics_logger_accepts_numpy_and_bool(tmp_path):
    np = pytest.importorskip("numpy")
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        logger.log(1, {"eos_rate": np.float32(0.75), "skipped_batches": np.int64(2), "flag": True,
                       "response_length/mean": np.float64(math.inf)})
    row = read_metrics(str(tmp_path))[0]
    assert row["eos_rate"] == 0.75 and row["skipped_batches"] == 2 and row["flag"] == 1
    assert row["response_length/mean"] is None
