"""engine/train.py on tiny models saved locally: loading, one iteration's numbers against a
plain-PyTorch recomputation, pairs kept together, the EOS penalty, resume after SIGKILL, torchrun."""
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import config as C
from engine.build import build, make_optimizer
from engine.data.rewards import apply_eos_penalty
from engine.data.tasks import char_tokenizer, counting_prompts, tiny_llama
from engine.iteration.batch import Batch
from engine.iteration.collect import collect, rollout_stats
from engine.iteration.micro_batches import micro_batches
from engine.iteration.update import update
from engine.model.logprobs import PolicyLogprobs
from engine.model.packing import IGNORE
from engine.train import train
from rebel_kernels.reference import reference_rebel_loss_from_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(run_dir, **sections) -> C.TrainConfig:
    base = C.TrainConfig(run_dir=str(run_dir), train=C.IterationConfig(prompts_per_iteration=8, micro_batch_prompts=4),
                         optim=C.OptimConfig(iterations=2, lr=1e-3),
                         logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                         checkpoint=C.CheckpointConfig(every=1, keep=2, export_hf=True))
    return dataclasses.replace(base, **sections)


def test_apply_eos_penalty_replaces_the_score():
    raw = torch.tensor([0.5, -0.2, 0.9])
    out = apply_eos_penalty(raw, torch.tensor([True, False, False]), -1.0)
    assert out.tolist() == [0.5, -1.0, -1.0]


def test_batch_rows_keep_pairs_together():
    batch = Batch(input_ids=torch.zeros(8, 3), attention_mask=torch.zeros(8, 3), labels=torch.zeros(8, 2),
                          finished=torch.ones(8, dtype=torch.bool), sampler_logprobs=torch.zeros(8, 2),
                          sampled=torch.ones(8, dtype=torch.bool), prompts=[""] * 8, responses=[""] * 8)
    assert batch.rows(torch.tensor([2, 0])).tolist() == [2, 0, 6, 4]


def _iteration_inputs(tmp_path, **train):
    """A built run (the seam the loop uses), one collected batch of its first iteration (log pi_t
    computed by collect: not folded) and its rollout metrics."""
    cfg = small_cfg(tmp_path, optim=C.OptimConfig(iterations=1, lr=1e-2))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold_old_logprobs=False, **train))
    run = build(cfg)
    batch, gen_s = collect(run, run.order.take(cfg.train.prompts_per_iteration))
    return run, batch, rollout_stats(batch, gen_s, run.dist, cfg.reward.kl_coef)


def _with(run, cfg):
    """The run with another config and a fresh optimizer over its trained parameters."""
    opt, sched = make_optimizer(cfg, [p for p in run.policy_lp.parameters() if p.requires_grad],
                                cfg.train.num_epochs * cfg.train.minibatches)
    return dataclasses.replace(run, cfg=cfg, optimizer=opt, scheduler=sched,
                               shuffle_generator=torch.Generator().manual_seed(0))


def _plain_logprobs(lm, batch, temperature):
    """Materialized logits, plain log_softmax: the recomputation the fused path must match."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits.float()
    n = batch.labels.shape[1]
    logits = logits[:, -n - 1 : -1] / temperature
    lsm = torch.log_softmax(logits, -1)
    valid = batch.labels != IGNORE
    return torch.where(valid, lsm.gather(-1, batch.labels.clamp_min(0)[..., None])[..., 0], 0.0)


def test_one_iteration_matches_plain_pytorch(tmp_path):
    run, batch, stats = _iteration_inputs(tmp_path)
    cfg, policy = run.cfg, run.policy
    T = cfg.generation.temperature
    plain = _plain_logprobs(policy, batch, T).detach()
    torch.testing.assert_close(batch.old_logprobs, plain, rtol=1e-5, atol=1e-5)
    # the sampler's log-probabilities are those of the training forward (same temperature)
    valid = batch.labels != IGNORE
    torch.testing.assert_close(batch.sampler_logprobs[valid], plain[valid], rtol=1e-4, atol=1e-4)
    # reference == initial policy: KL 0, rewards = penalized scores
    torch.testing.assert_close(batch.rewards, batch.scores)
    assert stats["kl/mean"] == 0.0
    # one AdamW step on the whole batch equals the plain-PyTorch loss's step
    twin = copy.deepcopy(policy)
    one_epoch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_epochs=1))
    out = update(_with(run, one_epoch), batch).metrics
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=cfg.optim.lr, eps=cfg.optim.adam_eps, weight_decay=0.0)
    loss = reference_rebel_loss_from_logprobs(_plain_logprobs(twin, batch, T), batch.labels, batch.old_logprobs,
                                              batch.rewards, eta=cfg.algorithm.eta)
    loss.backward()
    ref_opt.step()
    assert out["loss/first"] == pytest.approx(loss.item(), rel=1e-5)
    # the first minibatch's ratio is exactly 0: its loss is mean((r_i - r_{B+i})^2)
    b = batch.groups
    assert out["loss/first"] == pytest.approx(((batch.rewards[:b] - batch.rewards[b:]) ** 2).mean().item(), rel=1e-6)
    # gradients agree (parameters are not compared: Adam's first step turns any rounding-level
    # gradient, e.g. 1e-12 against an exact 0, into a full learning-rate step)
    for (name, p), q in zip(policy.named_parameters(), twin.parameters()):
        scale = q.grad.norm().item() + 1e-12
        assert (p.grad - q.grad).norm().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("small, large", [
    (dict(micro_batch_tokens=0, shared_prefix=False, micro_batch_prompts=1),
     dict(micro_batch_tokens=0, shared_prefix=False, micro_batch_prompts=4)),
    (dict(micro_batch_tokens=12), dict(micro_batch_tokens=8192)),  # packed: by a token budget
], ids=["padded", "packed"])
def test_micro_batching_does_not_change_the_update(tmp_path, small, large):
    """Gradient accumulation over micro-batches of whole pairs (by prompt count, or packed by a token
    budget) equals one big batch."""
    run, batch, _ = _iteration_inputs(tmp_path)
    results, metrics = [], []
    for overrides in (small, large):
        c = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, num_epochs=1, **overrides))
        run_i = _with(dataclasses.replace(run, policy_lp=copy.deepcopy(run.policy_lp)), c)
        run_i.policy_lp.packed = run_i.policy_lp.shared = bool(overrides["micro_batch_tokens"])
        parts = micro_batches(run_i, batch, torch.arange(batch.groups))
        assert len(parts) > 1 if overrides is small else len(parts) <= 2
        metrics.append(update(run_i, batch).metrics)
        results.append([p.grad.clone() for p in run_i.policy_lp.parameters()])  # the step's accumulated gradient
    for a, b in zip(*results):
        assert (a - b).norm().item() <= 1e-5 * (b.norm().item() + 1e-12)
    # the algorithm's metrics are reduced over every micro-batch of the step, not the last one
    for key in ("algorithm/loss", "algorithm/reward/mean", "algorithm/kl/mean"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-7), key
    assert metrics[0]["algorithm/reward/mean"] == pytest.approx(batch.rewards.mean().item(), rel=1e-5)


def test_loads_saved_models_jsonl_prompts_and_function_reward(tmp_path):
    tok = char_tokenizer()
    tiny_llama(tok, seed=3).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for row in counting_prompts(50) + [{"prompt": ""}, {"other": "x"}]:  # two invalid rows, skipped
            f.write(json.dumps(row) + "\n")
    cfg = small_cfg(tmp_path / "run", model=C.ModelConfig(policy=str(tmp_path / "policy")),
                    data=C.DataConfig(prompts=str(tmp_path / "prompts.jsonl")),
                    reward=C.RewardConfig(function="engine.data.tasks:counting_reward"))
    stats = train(cfg)
    assert set(stats) >= {"reward/mean", "kl/mean", "loss/first", "loss/last", "eos_rate"}
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert exported.config.vocab_size == len(tok)


def _run_cli(run_dir, extra=(), nproc=None, wait=True):
    args = ["--run_dir", str(run_dir), "--optim.iterations", "6", "--train.prompts_per_iteration", "8",
            "--checkpoint.every", "2", "--logging.progress", "false", "--logging.tensorboard", "false",
            *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "engine/train.py", *args]
    else:
        cmd = [sys.executable, "engine/train.py", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return proc


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    _run_cli(tmp_path / "straight")
    proc = _run_cli(tmp_path / "killed", wait=False)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_00000003"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run_cli(tmp_path / "killed")  # same command: resumes from the last checkpoint
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert [r["iteration"] for r in b] == list(range(6))
    for key in ("reward/mean", "kl/mean", "loss/first", "loss/last", "eos_rate"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5, abs=1e-7), key


def test_torchrun_two_processes_fsdp2(tmp_path):
    """The same command on 2 processes (FSDP2 over gloo) runs, checkpoints and exports; packed by a token
    budget small enough that the ranks cut their prompts into different numbers of micro-batches (the
    fewer split until they pair up)."""
    _run_cli(tmp_path / "ddp", nproc=2, extra=["--train.micro_batch_tokens", "20"])
    rows = _metrics(tmp_path / "ddp")
    assert [r["iteration"] for r in rows] == list(range(6))
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()


def test_hybrid_mode_reads_partners_from_the_dataset(tmp_path):
    """Hybrid REBEL: y is sampled, y' is the dataset's response (tokenized, EOS appended)."""
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for row in counting_prompts(20):
            last = int(row["prompt"][-1])
            f.write(json.dumps({**row, "good": "".join(str((last + k + 1) % 10) for k in range(4))}) + "\n")
    cfg = small_cfg(tmp_path / "run", data=C.DataConfig(prompts=str(tmp_path / "pairs.jsonl"), partner_column="good"),
                    reward=C.RewardConfig(function="builtin:counting"))
    run = build(cfg)
    batch, stats = collect(run, run.order.take(cfg.train.prompts_per_iteration))
    b = batch.groups
    assert b == 8 and batch.sampled[:b].all() and not batch.sampled[b:].any()
    assert all(len(r) == 4 for r in batch.responses[b:])  # the dataset's answers
    assert (batch.scores[b:] == 1.0).all()  # a perfect count, EOS included
    train(cfg)  # and the loop runs in hybrid mode


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "term"
    proc = _run_cli(run, extra=["--optim.iterations", "500", "--checkpoint.every", "0"], wait=False)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]  # "interrupted", resumable
    assert "interrupted by signal 15" in out
    last = _metrics(run)[-1]["iteration"]
    assert (run / "checkpoints" / f"step_{last:08d}").exists()
    assert last < 499 and not (run / "final").exists()


def nan_reward(prompts, responses):
    return [float("nan")] * len(prompts)


def test_non_finite_reward_skips_the_update_and_a_run_that_trained_nothing_fails(tmp_path, capsys):
    from engine.train import main

    run_dir = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_:
        main(["--run_dir", str(run_dir), "--optim.iterations", "2", "--train.prompts_per_iteration", "8",
              "--reward.function", "test_train:nan_reward", "--checkpoint.every", "0", "--logging.progress", "false",
              "--logging.tensorboard", "false", "--logging.plots", "false"])
    assert exit_.value.code == 1
    assert "every update was skipped (2 skipped" in capsys.readouterr().err
    assert [row["skipped_batches"] for row in _metrics(run_dir)] == [1, 2]
    assert not (run_dir / "final").exists()  # no untrained export


def test_reward_model_rescores_with_its_own_tokenizer(tmp_path):
    """A sequence-classification reward model saved locally, with a different tokenizer than the policy's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engine.data.rewards import RewardModel

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "rm")
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    scorer = RewardModel(str(tmp_path / "rm"), device="cpu", batch_size=2)
    scores = scorer(["12", "345", "9"], ["34", "6", "0123"])
    singles = torch.cat([scorer([p], [r]) for p, r in zip(["12", "345", "9"], ["34", "6", "0123"])])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, singles, rtol=1e-5, atol=1e-5)  # padding does not change a score
    cfg = small_cfg(tmp_path / "run", reward=C.RewardConfig(model=str(tmp_path / "rm")),
                    optim=C.OptimConfig(iterations=1))
    assert math.isfinite(train(cfg)["reward/mean"])


def test_top_layers_only_and_activation_checkpointing(tmp_path):
    from engine.runtime import parallel

    policy = tiny_llama(char_tokenizer())
    parallel.train_only_top_layers(policy, 1)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in policy.named_parameters()
                         if n.startswith(("model.layers.1.", "model.norm", "lm_head"))}
    cfg = small_cfg(tmp_path / "ac", model=C.ModelConfig(train_top_layers=1, activation_checkpointing=True),
                    optim=C.OptimConfig(iterations=1))
    stats = train(cfg)
    assert math.isfinite(stats["loss/last"])


@pytest.mark.parametrize("preset", ["counting_reinforce", "counting_rloo2", "counting_rloo4", "counting_iterative_dpo",
                                    "counting_dpo", "counting_rebel_preference", "counting_lora"])
def test_comparison_algorithms_run_in_the_loop(preset, tmp_path):
    """The paper's peers train through the same loop: k samples per prompt, their own loss."""
    cfg = C.PRESETS[preset]()
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / preset), optim=C.OptimConfig(iterations=2),
                              train=dataclasses.replace(cfg.train, prompts_per_iteration=8, micro_batch_prompts=4),
                              logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                              checkpoint=C.CheckpointConfig(every=0, export_hf=False))
    stats = train(cfg)
    assert math.isfinite(stats["loss/last"]) and math.isfinite(stats["reward/mean"])
    rows = _metrics(tmp_path / preset)
    assert len(rows) == 2


def test_autocast_policy_logprobs_keep_float32_parameters():
    """One unsharded GPU process with model.dtype bfloat16 runs the policy under autocast (exercised
    here on CPU): log-probs within bf16 error of float32, gradients reach the float32 parameters."""
    lm = tiny_llama(char_tokenizer())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 15, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = ids[:, 5:].clone()
    exact = PolicyLogprobs(lm, temperature=1.0)(ids, mask, labels).detach()
    mixed = PolicyLogprobs(lm, autocast_dtype=torch.bfloat16, temperature=1.0)(ids, mask, labels)
    torch.testing.assert_close(mixed.float(), exact, rtol=0, atol=0.1)
    assert (mixed - exact).abs().max() > 0  # computed in bf16
    mixed.float().sum().backward()
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    assert lm.lm_head.weight.grad is not None and lm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_two_nodes_on_localhost_match_one_node_with_two_processes(tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on localhost, one process per "node", two launchers) trains
    the same iterations as one node with two processes: the same metrics."""
    import socket

    args = ["--optim.iterations", "3", "--train.prompts_per_iteration", "8", "--checkpoint.every", "0",
            "--logging.progress", "false", "--logging.tensorboard", "false", "--logging.plots", "false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", REBEL_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "engine/train.py",
                          "--run_dir", str(tmp_path / "one"), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=test-two-nodes",
              "engine/train.py", "--run_dir", str(tmp_path / "two"), *args]
    nodes = [subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n----\n".join(out[-2000:] for out in outs)
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["iteration"] for r in b] == [0, 1, 2]
    for row_a, row_b in zip(a, b):
        for key in ("reward/mean", "kl/mean", "loss/first", "loss/last", "eos_rate", "response_length/mean"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-5, abs=1e-7), (row_a["iteration"], key)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
