"""Named presets: Python functions returning a TrainConfig (`--preset NAME`; overrides apply on top).

    python engine/train.py --preset tldr_pythia_1b4 --optim.lr 1e-6 --algorithm.eta 0.5
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.algorithms import DPO, RLOO, Algorithm, IterativeDPO, RebelPreference, Reinforce

from .sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    IterationConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)


def default() -> TrainConfig:
    """The embedded default: a tiny random Llama learns the built-in counting task on CPU, evaluated
    greedily on its held-out split (200 prompts with references) before training, every 50 iterations
    and at the end."""
    return TrainConfig(eval=EvalConfig(prompts="builtin:counting_eval", reference_column="reference", every=50))


def tldr_pythia(size: str) -> TrainConfig:
    """TL;DR summarization with the paper's settings (appendix I.1.4); needs the hub."""
    return TrainConfig(
        run_dir=f"runs/tldr_pythia_{size}",
        model=ModelConfig(policy=f"vwxyzjn/EleutherAI_pythia-{size}-deduped__sft__tldr", dtype="bfloat16"),
        data=DataConfig(prompts="trl-lib/tldr", prompt_column="prompt", max_prompt_tokens=512),
        generation=SamplingConfig(max_new_tokens=53, temperature=0.7, samples_per_prompt=2),
        reward=RewardConfig(model=f"vwxyzjn/EleutherAI_pythia-{size}-deduped__reward__tldr", missing_eos_penalty=-1.0,
                            kl_coef=0.05),
        train=IterationConfig(prompts_per_iteration=512, num_epochs=4, minibatches=1, micro_batch_prompts=8),
        optim=OptimConfig(iterations=228, lr=3e-6, adam_eps=1e-5),
        eval=EvalConfig(prompts="trl-lib/tldr", split="validation", reference_column="completion", temperature=0.01,
                        every=25, max_prompts=512, batch_size=64),
    )


def ultrafeedback_llama3_8b() -> TrainConfig:
    """Chat: Llama-3-8B-Instruct on UltraFeedback prompts (the paper's section 5.2 settings)."""
    return TrainConfig(
        run_dir="runs/ultrafeedback_llama3_8b",
        model=ModelConfig(policy="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16", train_top_layers=4),
        data=DataConfig(prompts="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", prompt_column="prompt",
                        chat_template=True, max_prompt_tokens=1024),
        generation=SamplingConfig(max_new_tokens=1024, temperature=0.5, samples_per_prompt=2),
        reward=RewardConfig(model="RLHFlow/ArmoRM-Llama3-8B-v0.1", missing_eos_penalty=-4.0, batch_size=8,
                            kl_coef=0.0),
        train=IterationConfig(prompts_per_iteration=32, num_epochs=1, micro_batch_tokens=6144, micro_batch_prompts=2),
        optim=OptimConfig(iterations=1000, lr=1e-7),
        eval=EvalConfig(prompts="HuggingFaceH4/ultrafeedback_binarized", split="test_prefs", reference_column="chosen",
                        temperature=0.01, every=100, max_prompts=256, batch_size=32),
    )


def ultrafeedback_dpo_llama3_8b() -> TrainConfig:
    """Offline DPO on UltraFeedback's preference pairs (HuggingFaceH4/ultrafeedback_binarized: a "prompt"
    string and chat-transcript "chosen"/"rejected" columns), LoRA r = 16 so the reference costs no second
    copy of the weights; a peer for the REBEL preset above on the same prompts."""
    base = ultrafeedback_llama3_8b()
    return dataclasses.replace(
        base, run_dir="runs/ultrafeedback_dpo_llama3_8b", algorithm=DPO(beta=0.1),
        model=ModelConfig(policy=base.model.policy, dtype="bfloat16", lora_rank=16, lora_alpha=32.0),
        data=dataclasses.replace(base.data, chosen_column="chosen", rejected_column="rejected"),
        reward=RewardConfig(kl_coef=0.0),  # offline: no reward model (none is loaded, nothing is sampled)
        eval=EvalConfig(),  # nothing scores responses: evaluate with --eval.prompts ... --eval.judge pkg.mod:fn
        train=dataclasses.replace(base.train, prompts_per_iteration=64, num_epochs=1),
        optim=OptimConfig(iterations=950, lr=5e-6, warmup_iterations=10))


def pythia_1b4_random() -> TrainConfig:
    """The paper's TL;DR iteration shape (512 prompts, 2 x 53 new tokens, 4 epochs) on a random-weight
    Pythia-1.4B and the counting task: a GPU benchmark of one REBEL iteration that needs no hub."""
    return TrainConfig(
        run_dir="runs/pythia_1b4_random",
        model=ModelConfig(policy="builtin:pythia-1.4b-random", dtype="bfloat16"),
        generation=SamplingConfig(max_new_tokens=53, temperature=0.7, samples_per_prompt=2),
        train=IterationConfig(prompts_per_iteration=512, num_epochs=4, minibatches=1, micro_batch_prompts=16),
        optim=OptimConfig(iterations=3, lr=3e-6),
        checkpoint=CheckpointConfig(every=0, export_hf=False),
    )


def counting_with(algorithm: Algorithm, *, epochs: int) -> TrainConfig:
    """The embedded default's task and budget with another algorithm (the paper's comparison).
    Offline algorithms train on the built-in preference pairs of the same prompts."""
    base = default()
    data = DataConfig(prompts="builtin:counting_preferences", chosen_column="chosen",
                      rejected_column="rejected") if algorithm.offline else base.data
    return dataclasses.replace(
        base, run_dir=f"runs/counting_{type(algorithm).__name__.lower()}{algorithm.samples_per_prompt}",
        algorithm=algorithm, data=data,
        generation=dataclasses.replace(base.generation, samples_per_prompt=algorithm.samples_per_prompt),
        train=dataclasses.replace(base.train, num_epochs=epochs))


def counting_lora() -> TrainConfig:
    """The embedded default with LoRA adapters (rank 8 on every linear layer of the decoder); the tiny
    character embeddings and LM head (15 x 64) are trained in full beside them: with those frozen, even
    full fine-tuning of every decoder matrix stalls on this task. Reference = the adapters off."""
    base = default()
    return dataclasses.replace(base, run_dir="runs/counting_lora",
                               model=dataclasses.replace(base.model, lora_rank=8, lora_alpha=16.0,
                                                         lora_modules_to_save="embed_tokens,lm_head"),
                               optim=dataclasses.replace(base.optim, lr=3e-3))


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "pythia_1b4_random": pythia_1b4_random,
    "default": default,
    "tldr_pythia_1b4": lambda: tldr_pythia("1.4b"),
    "tldr_pythia_2b8": lambda: tldr_pythia("2.8b"),
    "tldr_pythia_6b9": lambda: tldr_pythia("6.9b"),
    "ultrafeedback_llama3_8b": ultrafeedback_llama3_8b,
    "ultrafeedback_dpo_llama3_8b": ultrafeedback_dpo_llama3_8b,
    "counting_reinforce": lambda: counting_with(Reinforce(samples_per_prompt=2), epochs=1),
    "counting_rloo2": lambda: counting_with(RLOO(samples_per_prompt=2), epochs=1),
    "counting_rloo4": lambda: counting_with(RLOO(samples_per_prompt=4), epochs=1),
    "counting_iterative_dpo": lambda: counting_with(IterativeDPO(), epochs=4),
    "counting_dpo": lambda: counting_with(DPO(), epochs=4),
    "counting_rebel_preference": lambda: counting_with(RebelPreference(), epochs=4),
    "counting_lora": counting_lora,
}
