"""The engine under faults and bad input (issue 12): feedback functions returning the wrong thing,
non-finite log-probabilities, corrupt checkpoints, a second run in the same directory, a changed config
on resume, signals, the command line. Each test names what it guards."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine import config as C
from engine.data import rewards


def returns_strings(prompts, responses):
    return ["good"] * len(prompts)


def returns_none(prompts, responses):
    return None


def returns_dict(prompts, responses):
    return {"score": [1.0] * len(prompts)}


def returns_too_few(prompts, responses):
    return [1.0] * (len(prompts) - 1)


def returns_nested(prompts, responses):
    return [[1.0, 2.0]] * len(prompts)


def returns_nan(prompts, responses):
    return [float("nan")] * len(prompts)


def prefers_strings(prompts, responses, others):
    return ["a"] * len(prompts)


@pytest.mark.parametrize("fn, error, match", [
    (returns_strings, TypeError, r"test_faults:returns_strings must return a list of 2 scores .*item 0 is str"),
    (returns_none, TypeError, r"test_faults:returns_none must return a list of 2 scores or a 1-D tensor, got NoneType"),
    (returns_dict, TypeError, r"test_faults:returns_dict must return .* got dict"),
    (returns_too_few, ValueError, r"test_faults:returns_too_few returned 1 scores for 2 responses"),
    (returns_nested, TypeError, r"test_faults:returns_nested must return .*item 0 is list"),
])
def test_reward_output_is_checked_and_the_error_names_the_function(fn, error, match):
    with pytest.raises(error, match=match):
        rewards.score(fn, ["1", "2"], ["3", "4"], "cpu")


def test_reward_output_accepts_lists_arrays_and_tensors_and_warns_on_non_finite(caplog):
    for out in ([1, 0.5], (1.0, 2.0), np.array([1.0, 2.0]), torch.tensor([[1.0], [2.0]]),
                [torch.tensor(1.0), torch.tensor(2.0)]):
        got = rewards.score(lambda p, r, out=out: out, ["1", "2"], ["3", "4"], "cpu")
        assert got.dtype == torch.float32 and got.shape == (2,)
    with caplog.at_level("WARNING", logger="rebel"):
        got = rewards.score(returns_nan, ["1", "2"], ["3", "4"], "cpu")
    assert torch.isnan(got).all()
    assert "test_faults:returns_nan returned 2 non-finite scores" in caplog.text


def test_preference_output_is_checked_and_names_the_function():
    with pytest.raises(TypeError, match=r"test_faults:prefers_strings must return a list of 1 probabilities"):
        rewards.preferences(prefers_strings, ["1"], ["2"], ["3"], "cpu")


def test_configured_reward_function_is_named_by_its_import_path():
    fn = rewards.build_reward(C.RewardConfig(function="test_faults:returns_none"), default=None, device="cpu")
    with pytest.raises(TypeError, match="test_faults:returns_none"):
        rewards.score(fn, ["1"], ["2"], "cpu")


# ----------------------------------------------------------------------------------------------
# resume with a changed config (item 7)
# ----------------------------------------------------------------------------------------------
def small_cfg(run_dir, **sections):
    import dataclasses

    base = C.TrainConfig(run_dir=str(run_dir), train=C.IterationConfig(prompts_per_iteration=8, micro_batch_prompts=4,
                                                                      num_epochs=1),
                         optim=C.OptimConfig(iterations=1, lr=1e-3),
                         logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                         checkpoint=C.CheckpointConfig(every=1, keep=2, export_hf=False))
    return dataclasses.replace(base, **sections)


def _override(cfg, *pairs):
    return C.apply_overrides(cfg, list(pairs))


def test_resume_with_a_changed_config_stops_and_lists_the_fields(tmp_path):
    from engine import loop
    from engine.build import ConfigChanged, build
    from engine.train import train

    cfg = small_cfg(tmp_path)
    train(cfg)
    stored = tmp_path / "checkpoints" / "step_00000000" / "config.json"
    assert json.loads(stored.read_text())["optim"]["lr"] == 1e-3
    changed = _override(cfg, ("optim.lr", "0.002"), ("optim.iterations", "2"), ("model.train_top_layers", "1"))
    with pytest.raises(ConfigChanged) as err:
        build(changed)
    message = str(err.value)
    for line in ("model.train_top_layers: 0 -> 1", "optim.iterations: 1 -> 2", "optim.lr: 0.001 -> 0.002",
                 "--checkpoint.allow_config_change true", "new --run_dir"):
        assert line in message, line
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3  # not overwritten
    # fields that do not change the trajectory may change freely
    build(_override(cfg, ("logging.progress", "true"), ("checkpoint.keep", "3"), ("train.micro_batch_prompts", "2")))
    # accepted explicitly: the new lr is the scheduler's base, not the checkpoint's
    accepted = _override(changed, ("model.train_top_layers", "0"), ("checkpoint.allow_config_change", "true"))
    r = build(accepted)
    loop.train(r)
    assert r.scheduler.base_lrs == [0.002] and r.optimizer.param_groups[0]["initial_lr"] == 0.002
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.002
    assert not [n for n in os.listdir(tmp_path) if n.startswith("config.json.")]  # atomic write left no temp


def test_a_run_resumes_from_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    from engine.build import build
    from engine.train import train

    cfg = small_cfg(tmp_path, optim=C.OptimConfig(iterations=2))
    train(cfg)
    shard = next((tmp_path / "checkpoints" / "step_00000001").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="rebel"):
        r = build(_override(cfg, ("optim.iterations", "2")))
    assert r.resume_from == 0 and "step_00000001 is corrupt" in caplog.text


# ----------------------------------------------------------------------------------------------
# SIGTERM / SIGINT within a grace (item 8)
# ----------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slow_reward(prompts, responses):
    """The built-in task's reward after a 2 s pause: an iteration long enough to signal inside."""
    from engine.data.tasks import counting_reward

    time.sleep(2.0)
    return counting_reward(prompts, responses)


def _start(run_dir, *extra):
    cmd = [sys.executable, "engine/train.py", "--run_dir", str(run_dir), "--optim.iterations", "50",
           "--train.prompts_per_iteration", "8", "--train.num_epochs", "1", "--checkpoint.every", "0",
           "--checkpoint.export_hf", "true", "--logging.progress", "false", "--logging.tensorboard", "false",
           "--logging.plots", "false", "--reward.function", "test_faults:slow_reward", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_inside_the_second_iteration(proc, run_dir, sig):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    time.sleep(0.5)  # inside iteration 1's reward
    proc.send_signal(sig)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return out, time.monotonic() - sent, rows


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_checkpoints_the_last_completed_iteration_when_the_current_one_cannot_finish(tmp_path, sig):
    signum = getattr(signal, sig)
    proc = _start(tmp_path, "--checkpoint.stop_grace_s", "1")
    out, took, rows = _signal_inside_the_second_iteration(proc, tmp_path, signum)
    assert proc.returncode == 128 + signum, out[-3000:]
    assert [r["iteration"] for r in rows] == [0]  # iteration 1 abandoned before its update
    assert (tmp_path / "checkpoints" / "step_00000000").is_dir() and "iteration 1 abandoned" in out
    assert not (tmp_path / "checkpoints" / "step_00000001").exists() and not (tmp_path / "final").exists()
    assert took < 10, took


def test_sigterm_finishes_the_current_iteration_when_it_fits_in_the_grace(tmp_path):
    proc = _start(tmp_path, "--checkpoint.stop_grace_s", "20")
    out, took, rows = _signal_inside_the_second_iteration(proc, tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, out[-3000:]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert (tmp_path / "checkpoints" / "step_00000001").is_dir() and "interrupted by signal 15" in out
    assert took < 20, took


# ----------------------------------------------------------------------------------------------
# the command line (item 9)
# ----------------------------------------------------------------------------------------------
def test_help_lists_every_key_with_type_default_and_help(capsys):
    from engine.train import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    rows = C.describe()
    assert len(rows) > 50 and all(text for *_, text in rows), [key for key, *_, text in rows if not text]
    for key, kind, value, _ in rows:
        assert f"--{key}" in out and f"{kind} = {value!r}" in out, key
    assert "--threads" in out


def test_threads_per_process(monkeypatch):
    from engine.train import threads_per_process

    for var in ("REBEL_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert threads_per_process() == (cores, f"{cores} cores / 1 local process(es)")
    assert threads_per_process(3) == (3, "--threads")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's own default: not read under torchrun
    assert threads_per_process()[0] == max(1, cores // 2)
    monkeypatch.setenv("REBEL_THREADS", "5")
    assert threads_per_process() == (5, "$REBEL_THREADS")


def warning_reward(prompts, responses):
    """The built-in task's reward, emitting a library-style deprecation warning on every call."""
    import warnings

    from engine.data.tasks import counting_reward

    warnings.warn("some_library.old_api is deprecated", FutureWarning, stacklevel=2)
    return counting_reward(prompts, responses)


def test_cli_states_directory_threads_and_summary_and_a_finished_run_exits_0(tmp_path):
    args = [sys.executable, "engine/train.py", "--run_dir", str(tmp_path), "--optim.iterations", "1",
            "--train.prompts_per_iteration", "8", "--logging.tensorboard", "false", "--logging.plots", "false",
            "--reward.function", "test_faults:warning_reward"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), REPO]))
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0] == f"run directory: {tmp_path}" and lines[1] == "threads per process: 1 ($OMP_NUM_THREADS)"
    assert "run finished: 1 of 1 iterations" in first.stdout and f"export: {tmp_path / 'final'}" in first.stdout
    assert "reward: " in first.stdout and "KL: " in first.stdout
    assert "FutureWarning" not in first.stderr + first.stdout  # library warnings: in the log only
    assert "some_library.old_api is deprecated" in (tmp_path / "train.log").read_text()
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "run already finished: 1 of 1 iterations" in again.stdout
    assert "iter 1/1" not in again.stderr  # no progress bar


# ----------------------------------------------------------------------------------------------
# one run per directory; no worker outliving its launcher (item 6)
# ----------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_a_second_run_in_the_same_directory_fails_fast_naming_the_holder(tmp_path):
    import socket

    first = _start(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    started = time.monotonic()
    second = _start(tmp_path)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out[-3000:]
    assert f"in use by another run (pid {first.pid} on host {socket.gethostname()})" in out
    assert time.monotonic() - started < 30
    first.send_signal(signal.SIGTERM)  # the first run was not disturbed: it checkpoints and stops normally
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert (tmp_path / "checkpoints" / f"step_{rows[-1]['iteration']:08d}").is_dir()
    from engine.runtime.guard import RunLock  # released: a later run may take it

    RunLock.acquire(str(tmp_path)).release()


def test_a_worker_exits_when_its_launcher_dies(tmp_path):
    launcher = ("import os, subprocess, sys, time\n"
                f"p = subprocess.Popen(sys.argv[1:], env=dict(os.environ, LOCAL_RANK='0'), cwd={REPO!r})\n"
                "print(p.pid, flush=True)\n"
                "time.sleep(600)\n")
    cmd = [sys.executable, "engine/train.py", "--run_dir", str(tmp_path), "--optim.iterations", "500",
           "--train.prompts_per_iteration", "8", "--checkpoint.every", "0", "--checkpoint.stop_grace_s", "5",
           "--logging.progress", "false", "--logging.tensorboard", "false", "--logging.plots", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", launcher, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True)
    worker = int(parent.stdout.readline())
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    parent.kill()  # the launcher dies without a word to its worker
    parent.wait()
    deadline = time.time() + 60
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its launcher"
    assert list((tmp_path / "checkpoints").glob("step_*"))  # it checkpointed on the way out


# ----------------------------------------------------------------------------------------------
# non-finite log-probabilities and KL (item 4)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True])
def test_non_finite_reference_logprobs_are_named_and_the_update_skipped(tmp_path, caplog, fold):
    """Screened before the update; folded, log pi_t (and so the KL and the shaped reward) is not computed."""
    from engine import loop
    from engine.build import build

    cfg = small_cfg(tmp_path)
    r = build(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold_old_logprobs=fold)))
    with torch.no_grad():
        r.reference_lp.lm.get_input_embeddings().weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in r.policy_lp.named_parameters()}
    with caplog.at_level("WARNING", logger="rebel"):
        stats = loop.iteration(r, loop.Status(), 0)
    assert stats["skipped_batches"] == 1 and "loss/first" not in stats
    chain = "" if fold else " -> KL (log pi_t - log pi_ref) -> shaped reward (score - kl_coef * KL)"
    assert f"non-finite log pi_ref (the reference's log-probabilities){chain} at iteration 0" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in r.policy_lp.named_parameters())


def test_non_finite_folded_policy_logprobs_skip_the_update(tmp_path, caplog):
    """Folded log pi_t comes from the first epoch's forward: screened there, before the first step."""
    from engine import loop
    from engine.build import build

    r = build(small_cfg(tmp_path))
    forward = r.policy_lp.forward
    r.policy_lp.forward = lambda *args, **kwargs: forward(*args, **kwargs) * float("nan")
    before = {n: p.detach().clone() for n, p in r.policy_lp.named_parameters()}
    with caplog.at_level("WARNING", logger="rebel"):
        stats = loop.iteration(r, loop.Status(), 0)
    assert stats["skipped_batches"] == 1 and "loss/first" not in stats
    assert "non-finite log pi_t (the policy's log-probabilities) -> KL" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in r.policy_lp.named_parameters())
