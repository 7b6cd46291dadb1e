"""One RL iteration end to end, per phase, in a fresh process: ours (engine/train.py, REBEL) and, as
the peer, TRL's RLOOTrainer with k = 2 configured from the same TrainConfig.

    python -m bench._iteration '{"provider": "ours", "case": "cpu-tiny", "iterations": 2}'

prints one line "ITERATION_RESULT <json list>", one row per iteration (`measure` runs this in a
subprocess, so each provider's peak memory is its own).

Accounting, the same for both providers:
- generate: sampling both responses of every prompt (ours: Sampler.generate; TRL: `_generate`,
  i.e. prompt tokenization, HF `model.generate` and decoding to text);
- score: the reward function on all responses (the missing-EOS penalty included);
- logprobs: the no-grad log pi_t and log pi_ref forwards over the batch (TRL: the rest of
  `_generate_and_score_completions`, padding and advantages included);
- update: `num_epochs` passes over the batch, `minibatches` AdamW steps each (TRL: from the end of
  collection to the end of the iteration's last optimizer step);
- sync: copying the trained weights into the generation model (ours only; TRL generates with
  the trained model itself);
- iteration_s: wall time of the iteration (setup, model loading and checkpoints excluded; TRL:
  from the start of collection to the iteration's last optimizer step);
- peak_gib: CUDA max allocated bytes since the iteration began (reset at its start), or on CPU
  the process's max RSS so far (it includes setup);
- tokens: response tokens sampled, the EOS included, padding after it not;
- precision: parameter dtypes of the trained, reference and generating models, with the autocast
  their forward runs under, read from the models the run built.
On CUDA every phase boundary synchronizes the device.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "ITERATION_RESULT "
PHASES = ("generate", "score", "logprobs", "update", "sync")


@dataclasses.dataclass(frozen=True)
class IterCase:
    name: str
    preset: str  # engine.config.PRESETS key
    overrides: tuple[tuple[str, str], ...]  # on top of the preset
    cuda: bool
    timeout_s: float  # per provider run (a fresh process: imports, model build, all iterations)
    threads: int | None = None  # torch CPU threads (None: torch's default)


_QUIET = (("checkpoint.every", "0"), ("checkpoint.export_hf", "false"), ("logging.tensorboard", "false"),
          ("logging.plots", "false"), ("logging.progress", "false"), ("eval.prompts", "none"))  # the iteration alone
CASES = {c.name: c for c in (
    # CPU, seconds: the tiny random Llama on the counting task, 16 prompts x 2 samples x 8 new tokens; one
    # thread (tiny ops gain nothing from more, and it keeps a busy 2-core CI machine from oversubscribing).
    IterCase("cpu-tiny", "default", (("train.prompts_per_iteration", "16"), ("generation.max_new_tokens", "8"),
                                     ("generation.temperature", "0.7"), ("train.num_epochs", "4")), cuda=False,
             timeout_s=120, threads=1),
    # The paper's TL;DR iteration shape: 512 prompts x 2 x 53 new tokens, 4 epochs, random Pythia-1.4B.
    # Estimated at about a minute an iteration on an H100; the first includes CUDA graph capture.
    IterCase("pythia-1.4b-random", "pythia_1b4_random", (), cuda=True, timeout_s=250),
    # The same model and shape with 128 prompts: what bench/gpu_session.py fits into its 8-minute call.
    IterCase("pythia-1.4b-random-128", "pythia_1b4_random", (("train.prompts_per_iteration", "128"),), cuda=True,
             timeout_s=50),
    # Prompt-heavy (bench/prompt_heavy.py): 16 prompts of 64..256 tokens (fixed seed) x 2 x 24 new tokens,
    # a random Llama (H 256, 4 layers, 4 heads, MLP 688) with a 32000-token head, float32, 4 epochs of
    # one optimizer step over the whole batch, one thread.
    IterCase("cpu-prompt-heavy", "default", (
        ("model.policy", "builtin:llama-32k-random"), ("data.prompts", "builtin:counting_long"),
        ("data.max_prompt_tokens", "300"), ("train.prompts_per_iteration", "16"),
        ("train.micro_batch_prompts", "16"), ("train.num_epochs", "4"), ("train.minibatches", "1"),
        ("generation.max_new_tokens", "24"), ("generation.min_new_tokens", "24")), cuda=False, timeout_s=600,
        threads=1),
)}


def train_config(case: IterCase, iterations: int, run_dir: str):
    from engine import config as config_mod

    pairs = [*_QUIET, *case.overrides, ("optim.iterations", str(iterations)), ("run_dir", run_dir)]
    return config_mod.apply_overrides(config_mod.PRESETS[case.preset](), pairs)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _describe(cfg, case: IterCase, provider: str) -> dict:
    return dict(suite="iteration", case=case.name, provider=provider, model=cfg.model.policy.removeprefix("builtin:"),
                prompts=cfg.train.prompts_per_iteration, samples_per_prompt=cfg.generation.samples_per_prompt,
                new_tokens=cfg.generation.max_new_tokens, epochs=cfg.train.num_epochs,
                minibatches=cfg.train.minibatches,
                micro_batch_rows=cfg.generation.samples_per_prompt * cfg.train.micro_batch_prompts,
                micro_batch_tokens=cfg.train.micro_batch_tokens, shared_prefix=cfg.train.shared_prefix,
                fold_old_logprobs=cfg.train.fold_old_logprobs,
                dtype=cfg.model.dtype, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def _dtype(module) -> str | None:
    p = next(module.parameters(), None) if module is not None else None
    return None if p is None else str(p.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# ours


@contextlib.contextmanager
def _patched(module, **attrs):
    """Set a peer module's attributes for the duration of the block (TRL's setup hooks only, never the
    timed code)."""
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# "ours-off": the engine without prefix sharing, packing and folding (engine/model/packing.py): padded rows of
# train.micro_batch_prompts prompts, each prompt forwarded once per response, a separate log pi_t pass.
UNPACKED = (("train.micro_batch_tokens", "0"), ("train.shared_prefix", "false"), ("train.fold_old_logprobs", "false"))


def run_ours_off(case: IterCase, iterations: int, run_dir: str) -> list[dict]:
    """`run_ours` with sharing, packing and folding off."""
    return run_ours(dataclasses.replace(case, overrides=case.overrides + UNPACKED), iterations, run_dir,
                    provider="ours-off")


def run_ours(case: IterCase, iterations: int, run_dir: str, provider: str = "ours") -> list[dict]:
    """The engine's loop on the case's config (engine.build.build -> engine.loop.train); phases from the
    run's metrics.jsonl (PhaseTimer). The built run's checkpointer is swapped for one that writes nothing
    (Pythia-1.4B: about 22 GB of disk and time a checkpoint); precision is read off the built models."""
    from engine import loop
    from engine.build import build
    from engine.runtime.metrics import read_metrics

    class NoCheckpoint:
        def save(self, *a, **kw):
            pass

    cfg = train_config(case, iterations, run_dir)
    run = build(cfg)
    run.checkpointer = NoCheckpoint()
    forwarded = _count_forwarded_positions(run)
    loop.train(run)
    reference = getattr(run.reference_lp, "lm", None)
    amp = run.precision.autocast_dtype
    autocast = f" ({str(amp).removeprefix('torch.')} autocast)" if amp is not None else ""
    precision = (f"train {_dtype(run.policy)}{autocast}, reference {_dtype(reference)}, "
                 f"generate {_dtype(run.inference)}")
    n_rows = cfg.train.prompts_per_iteration * cfg.generation.samples_per_prompt
    return [_describe(cfg, case, provider) | {f"{p}_s": m.get(f"time/{p}") for p in PHASES} | dict(
        iteration=m["iteration"], iteration_s=m["time/iteration"], peak_gib=m["memory/peak_gib"],
        tokens=round(m["response_length/mean"] * n_rows), optimizer_steps=cfg.train.num_epochs * cfg.train.minibatches,
        tokens_forwarded=forwarded.get(m["iteration"]),
        precision=precision, note="REBEL loss; engine/train.py in one process") for m in read_metrics(run_dir)]


def _count_forwarded_positions(run) -> dict:
    """Token positions the training passes put through the transformer body (log pi_t, log pi_ref,
    every epoch; padding included, a packed row counted as its packed tokens), per iteration: hooks
    on the built run's log-probability modules and their bodies (generation is not counted)."""
    per_iteration, count, inside = {}, [0], [False]

    def enter(module, args):
        inside[0] = True

    def leave(module, args, output):
        inside[0] = False

    def body(module, args, kwargs):
        if inside[0]:
            count[0] += (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).numel()

    from engine.model.logprobs import PolicyLogprobs

    modules = [run.policy_lp]
    if isinstance(run.reference_lp, PolicyLogprobs):  # LoRA's reference runs through policy_lp itself
        modules.append(run.reference_lp)
    for module in modules:
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
        module.lm.base_model.register_forward_pre_hook(body, with_kwargs=True)
    log = run.metrics.log

    def logged(iteration, metrics):
        per_iteration[iteration], count[0] = count[0], 0
        log(iteration, metrics)

    run.metrics.log = logged
    return per_iteration


# ----------------------------------------------------------------------------------------------
# TRL RLOO (k = 2)


def _trl_reward(cfg, eos_id: int):
    """The task's reward with the engine's missing-EOS penalty, in TRL's reward-function signature."""
    from engine.data.rewards import build_reward

    default = cfg.data.prompts if cfg.data.prompts.startswith("builtin:") else None
    score = build_reward(cfg.reward, default=default, device=torch.device("cpu"))

    def counting(prompts, completions, completion_ids, **_):
        raw = torch.as_tensor(score(prompts, completions), dtype=torch.float32).tolist()
        return [s if eos_id in ids else cfg.reward.missing_eos_penalty for s, ids in zip(raw, completion_ids)]

    return counting


class _Clock:
    """Per-iteration phase times of a TRL trainer, from wrappers around its own methods."""

    def __init__(self):
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            row = self.rows[-1]
            row[name] = row.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, obj, method: str, phase: str, *, starts_iteration: bool = False, tokens=None):
        """Time obj.method as `phase`; `tokens(output)` counts the response tokens it sampled."""
        inner = getattr(obj, method)

        def timed(*a, **kw):
            if starts_iteration:
                _sync()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                self.rows.append(dict(start=time.perf_counter(), tokens=0, steps=0))
            with self.phase(phase):
                out = inner(*a, **kw)
            if tokens is not None:
                self.rows[-1]["tokens"] += tokens(out)
            return out

        setattr(obj, method, timed)

    def step_end(self):
        """An optimizer step is done: the iteration so far ends here."""
        _sync()
        if self.rows:
            self.rows[-1].update(end=time.perf_counter(), peak_gib=_peak_gib(), steps=self.rows[-1]["steps"] + 1)


def _trl_dtype(trainer, model) -> str | None:
    """Parameter dtype, plus the autocast accelerate wraps the model's forward in (mixed precision)."""
    wrapped = getattr(model, "_original_forward", None) is not None and trainer.accelerator.mixed_precision != "no"
    return f"{_dtype(model)}{f' ({trainer.accelerator.mixed_precision} autocast)' if wrapped else ''}"


def trl_config(cfg, iterations: int, output_dir: str):
    """RLOOConfig doing the work of `iterations` REBEL iterations of `cfg`. TRL counts batches in
    completions: one generation batch = all prompts x k; per_device_train_batch_size = the engine's
    micro-batch (rows); gradient accumulation over a minibatch; num_iterations = epochs (each reuses
    the generation batch); max_steps counts optimizer steps."""
    from trl import RLOOConfig

    k, rows = cfg.generation.samples_per_prompt, cfg.train.prompts_per_iteration * cfg.generation.samples_per_prompt
    micro = min(k * cfg.train.micro_batch_prompts, rows // cfg.train.minibatches)
    cuda = torch.cuda.is_available()
    return RLOOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=cfg.seed, use_cpu=not cuda, bf16=cuda and cfg.model.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=cfg.model.activation_checkpointing, disable_dropout=True,
        num_generations=k, max_completion_length=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature, top_k=cfg.generation.top_k, top_p=cfg.generation.top_p,
        per_device_train_batch_size=micro, gradient_accumulation_steps=rows // cfg.train.minibatches // micro,
        generation_batch_size=rows, num_iterations=cfg.train.num_epochs,
        max_steps=iterations * cfg.train.num_epochs * cfg.train.minibatches,
        beta=cfg.reward.kl_coef, learning_rate=cfg.optim.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=cfg.optim.weight_decay, adam_epsilon=cfg.optim.adam_eps,
        max_grad_norm=cfg.optim.max_grad_norm or 0.0, use_vllm=False, dataloader_num_workers=0,
    )


def run_trl(case: IterCase, iterations: int, run_dir: str) -> list[dict]:
    """trl.RLOOTrainer on the same model, tokenizer, prompts, reward, batch and epochs."""
    import datasets
    import trl
    from transformers import TrainerCallback
    from trl.trainer import rloo_trainer

    from engine.data import prompts
    from engine.data.tasks import BUILTIN_MODELS

    cfg = train_config(case, iterations, run_dir)
    make_tokenizer, make_model = BUILTIN_MODELS[cfg.model.policy.removeprefix("builtin:")]
    tokenizer = make_tokenizer()
    policy = make_model(tokenizer, seed=cfg.seed)
    rows = prompts.load_rows(cfg.data)[: cfg.train.prompts_per_iteration * iterations]
    dataset = datasets.Dataset.from_list([{"prompt": r[cfg.data.prompt_column]} for r in rows])
    clock = _Clock()

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    # TRL reloads the reference from the policy's hub path; random weights have none: a copy instead.
    def reference(*a, **kw):
        return copy.deepcopy(policy).to(kw.get("dtype") or policy.dtype)

    with _patched(rloo_trainer, create_model_from_path=reference):
        trainer = trl.RLOOTrainer(model=policy, reward_funcs=_trl_reward(cfg, tokenizer.eos_token_id),
                                  args=trl_config(cfg, iterations, os.path.join(run_dir, "trl")),
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[StepEnd()])
    clock.wrap(trainer, "_generate_and_score_completions", "collect", starts_iteration=True)
    # _generate returns (prompt_ids, completion_ids, completions), completions cut after the first EOS
    clock.wrap(trainer, "_generate", "generate", tokens=lambda out: sum(len(ids) for ids in out[1]))
    clock.wrap(trainer, "_calculate_rewards", "score")
    trainer.train()
    precision = (f"train {_trl_dtype(trainer, trainer.model)}, reference {_trl_dtype(trainer, trainer.ref_model)}, "
                 f"generate {_trl_dtype(trainer, trainer.model)}")  # HF generate calls the same forward
    out = []
    for i, r in enumerate(clock.rows):
        total = r["end"] - r["start"]
        out.append(_describe(cfg, case, "trl-rloo") | dict(
            iteration=i, generate_s=r["generate"], score_s=r["score"],
            logprobs_s=r["collect"] - r["generate"] - r["score"], update_s=total - r["collect"], sync_s=None,
            iteration_s=total, peak_gib=r["peak_gib"], tokens=r["tokens"], optimizer_steps=r["steps"],
            precision=precision,
            note=f"trl {trl.__version__} RLOOTrainer k={cfg.generation.samples_per_prompt}: clipped policy-gradient "
                 f"loss instead of REBEL's regression (same forwards/backwards); epochs = num_iterations reusing "
                 f"one generation batch, shuffled once (ours: reshuffled each epoch); HF model.generate; "
                 f"reference = a copy of the initial policy; missing-EOS penalty in the reward function"))
    return out


RUNNERS = {"ours": run_ours, "ours-off": run_ours_off, "trl-rloo": run_trl}


# ----------------------------------------------------------------------------------------------
# the subprocess


def measure(provider: str, case: str, iterations: int = 2, timeout: float = 600) -> list[dict]:
    """Run `provider` on `case` for `iterations` iterations in a fresh Python process; its rows."""
    args = json.dumps(dict(provider=provider, case=case, iterations=iterations))
    env = os.environ if CASES[case].cuda else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU cases stay on CPU
    proc = subprocess.run([sys.executable, "-m", "bench._iteration", args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{provider} on {case} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(MARK):])


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    case = CASES[args["case"]]
    if case.threads:
        torch.set_num_threads(case.threads)
    with tempfile.TemporaryDirectory(prefix="rebel_iteration_") as run_dir:
        rows = RUNNERS[args["provider"]](case, int(args.get("iterations", 2)), run_dir)
    print(MARK + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
