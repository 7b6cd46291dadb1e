"""Typed, keyword-only configuration of a training run, named presets, and `--section.key value` overrides.

    python engine/train.py --preset tldr_pythia_1b4 --optim.lr 1e-6 --algorithm.eta 0.5

A preset is a Python function returning a TrainConfig; overrides are applied on top, each checked
against the dataclass field's type; an unknown key or a bad value is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import types
import typing
from collections.abc import Callable

from engine.algorithms import DPO, RLOO, Algorithm, IterativeDPO, Rebel, RebelPreference, Reinforce
from engine.generate import SamplingConfig

ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    policy: str = "builtin:tiny-llama"  # a Hugging Face path / hub id, or builtin:NAME (random, engine/tasks.py)
    reference: str | None = None  # None: the policy's initial weights
    dtype: str = "float32"  # parameter dtype of the policy: float32 | bfloat16
    train_top_layers: int = 0  # > 0: train only the top k decoder layers, the final norm and the LM head
    activation_checkpointing: bool = False
    # transformers' attention: sdpa | eager | flex_attention | flash_attention_2 (None: the family's default).
    # Packed micro-batches run SDPA blockwise per prompt group and flash-attention-2 through flash-attn's
    # variable-length kernels (the `flash` extra).
    attn_implementation: str | None = None
    liger_kernels: bool = False  # GPU: Liger-Kernel's RMSNorm / RoPE / SwiGLU in the policy body (off until measured)
    # LoRA through peft (0: full fine-tuning). The reference is the same model with the adapter
    # disabled, so no second copy of the weights is held (model.reference must stay None).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_target_modules: str = "all-linear"  # peft's target_modules: "all-linear" or comma-separated names
    lora_modules_to_save: str = ""  # comma-separated modules trained in full beside the adapters (e.g. lm_head)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    prompts: str = "builtin:counting"  # builtin:NAME, a datasets directory, *.jsonl / *.json, or a hub dataset id
    split: str = "train"
    prompt_column: str = "prompt"
    partner_column: str | None = None  # hybrid REBEL: y' read from this column instead of sampled
    chosen_column: str | None = None  # offline preference data (DPO): the preferred response
    rejected_column: str | None = None  # ... and the dispreferred one
    chat_template: bool = False  # wrap each prompt with the policy tokenizer's chat template
    max_prompt_tokens: int = 512  # longer prompts are skipped (and counted)


@dataclasses.dataclass(kw_only=True)
class RewardConfig:
    model: str | None = None  # a Hugging Face sequence-classification reward model
    function: str | None = None  # "package.module:function" scoring (prompts, responses) -> list[float]
    missing_eos_penalty: float = -1.0  # replaces the score of a response that never emitted EOS
    kl_coef: float = 0.05  # r = score - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), sequence level
    batch_size: int = 32
    # REBEL from preferences: P(y > y' | x) from a pairwise sequence-classification model (one logit,
    # P = sigmoid, averaged over both orders) reading `preference_template`, or from a Python function
    # "package.module:function" (prompts, responses, other_responses) -> probabilities.
    preference_model: str | None = None
    preference_function: str | None = None
    preference_template: str = "{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}"


@dataclasses.dataclass(kw_only=True)
class TrainingConfig:
    """The iteration's batch and its optimizer steps, for every algorithm (k samples per prompt)."""

    prompts_per_iteration: int = 64
    num_epochs: int = 4  # passes over each iteration's batch
    minibatches: int = 1  # optimizer steps per epoch (the paper: 1, i.e. accumulate the whole batch)
    # Forwards and backwards by micro-batches, all k samples of a prompt in one; gradients accumulate.
    micro_batch_tokens: int = 8192  # packed tokens per micro-batch, one padding-free row (0: padded rows, no packing)
    micro_batch_prompts: int = 16  # prompts per micro-batch when micro_batch_tokens = 0
    shared_prefix: bool = True  # packed: each prompt forwarded once per pass with its k responses attending to it
    # With one optimizer step per epoch, the first epoch's forward records log pi_t instead of a separate
    # no-grad pass (the first ratio is exactly 0 either way).
    fold_old_logprobs: bool = True


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    iterations: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    warmup_iterations: int = 0
    max_grad_norm: float | None = None  # None: no clipping (the paper's setting)


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 25  # iterations between checkpoints (0: only at the end and on SIGTERM)
    keep: int = 2
    export_hf: bool = True  # save_pretrained of the final policy
    # A resume whose config differs from the checkpoint's in a field that changes the trajectory (lr,
    # iterations, seed, data, model, ...) stops and lists them; true accepts the new values.
    allow_config_change: bool = False
    # SIGTERM / SIGINT: a checkpoint is on disk within this many seconds (torchrun kills ~30 s after
    # SIGTERM): the current iteration is finished only if it fits, else the last completed one is saved.
    stop_grace_s: float = 15.0


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(max_new_tokens=8, temperature=1.0, samples_per_prompt=2))
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    train: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    algorithm: Algorithm = dataclasses.field(default_factory=Rebel)  # the loss; presets construct others
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        validate(self)


def _walk(obj, prefix: str = ""):
    """(section.key, value) of every leaf field of a config, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def validate(cfg: TrainConfig) -> None:
    """Every value, when the config is built (before anything is loaded); each error names the key and
    the value. No float anywhere may be NaN or infinite."""
    for key, value in _walk(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value!r}")
    if not cfg.run_dir.strip():
        raise ValueError("run_dir must not be empty")
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed!r}")
    if cfg.reward.preference_model:
        for name in ("{prompt}", "{a}", "{b}"):
            if name not in cfg.reward.preference_template:
                raise ValueError(f"reward.preference_template must contain {name}, got "
                                 f"{cfg.reward.preference_template!r}")
    positive = {"train.prompts_per_iteration": cfg.train.prompts_per_iteration,
                "train.num_epochs": cfg.train.num_epochs, "train.minibatches": cfg.train.minibatches,
                "train.micro_batch_prompts": cfg.train.micro_batch_prompts, "optim.iterations": cfg.optim.iterations,
                "optim.lr": cfg.optim.lr, "optim.adam_eps": cfg.optim.adam_eps, "checkpoint.keep": cfg.checkpoint.keep,
                "data.max_prompt_tokens": cfg.data.max_prompt_tokens, "reward.batch_size": cfg.reward.batch_size}
    for key, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be > 0, got {value!r}")
    for key, value in {"reward.kl_coef": cfg.reward.kl_coef, "optim.weight_decay": cfg.optim.weight_decay,
                       "optim.warmup_iterations": cfg.optim.warmup_iterations, "checkpoint.every": cfg.checkpoint.every,
                       "checkpoint.stop_grace_s": cfg.checkpoint.stop_grace_s,
                       "model.train_top_layers": cfg.model.train_top_layers,
                       "train.micro_batch_tokens": cfg.train.micro_batch_tokens}.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be >= 0, got {value!r}")
    if cfg.optim.max_grad_norm is not None and not cfg.optim.max_grad_norm > 0:
        raise ValueError(f"optim.max_grad_norm must be > 0 or None, got {cfg.optim.max_grad_norm!r}")
    if cfg.train.prompts_per_iteration % cfg.train.minibatches:
        raise ValueError(f"train.prompts_per_iteration ({cfg.train.prompts_per_iteration}) must be divisible by "
                         f"train.minibatches ({cfg.train.minibatches})")
    if cfg.train.shared_prefix and not cfg.train.micro_batch_tokens:
        raise ValueError("train.shared_prefix needs packing (train.micro_batch_tokens > 0); with "
                         "train.micro_batch_tokens=0 set train.shared_prefix=false")
    if cfg.model.attn_implementation is not None and cfg.model.attn_implementation not in ATTENTION:
        raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTENTION)}, "
                         f"got {cfg.model.attn_implementation!r}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {cfg.model.dtype!r}")
    k = cfg.algorithm.samples_per_prompt
    if cfg.generation.samples_per_prompt != k:
        raise ValueError(f"generation.samples_per_prompt must be {k} for {type(cfg.algorithm).__name__}, "
                         f"got {cfg.generation.samples_per_prompt}")
    if cfg.data.partner_column is not None and not isinstance(cfg.algorithm, Rebel):
        raise ValueError(f"data.partner_column (hybrid mode) needs the REBEL algorithm, "
                         f"got {type(cfg.algorithm).__name__}")
    if cfg.reward.model and cfg.reward.function:
        raise ValueError("set at most one of reward.model and reward.function")
    if cfg.reward.preference_model and cfg.reward.preference_function:
        raise ValueError("set at most one of reward.preference_model and reward.preference_function")
    _validate_feedback(cfg)
    _validate_lora(cfg.model)
    if cfg.generation.greedy:
        raise ValueError("generation.temperature must be > 0: REBEL needs sampled responses")


def _validate_feedback(cfg: TrainConfig) -> None:
    """The data columns and feedback the algorithm reads are configured, and nothing it ignores."""
    algo, name = cfg.algorithm, type(cfg.algorithm).__name__
    pair_columns = (cfg.data.chosen_column, cfg.data.rejected_column)
    builtin = cfg.data.prompts.startswith("builtin:")
    if algo.offline and None in pair_columns:
        raise ValueError(f"{name} trains on preference data: set data.chosen_column and data.rejected_column "
                         f"(got {pair_columns[0]!r}, {pair_columns[1]!r})")
    if not algo.offline and any(c is not None for c in pair_columns):
        raise ValueError(f"data.chosen_column / data.rejected_column are read by offline algorithms (DPO), "
                         f"not by {name}")
    preference = cfg.reward.preference_model or cfg.reward.preference_function
    if algo.needs_preferences and not preference and not builtin:
        raise ValueError(f"{name} needs a preference model: set reward.preference_model or reward.preference_function")
    if preference and not algo.needs_preferences:
        raise ValueError(f"reward.preference_model / reward.preference_function are read by RebelPreference, "
                         f"not {name}")


def _validate_lora(model: ModelConfig) -> None:
    if isinstance(model.lora_rank, bool) or not isinstance(model.lora_rank, int) or model.lora_rank < 0:
        raise ValueError(f"model.lora_rank must be an int >= 0, got {model.lora_rank!r}")
    if model.lora_rank == 0:
        return
    if not (math.isfinite(model.lora_alpha) and model.lora_alpha > 0):
        raise ValueError(f"model.lora_alpha must be > 0, got {model.lora_alpha!r}")
    if model.reference is not None:
        raise ValueError(f"model.reference={model.reference!r} with LoRA: the reference is the policy with its "
                         "adapter disabled; leave model.reference unset")
    if model.train_top_layers:
        raise ValueError("model.train_top_layers and model.lora_rank cannot be combined: LoRA trains the adapters only")
    if not model.lora_target_modules.strip():
        raise ValueError("model.lora_target_modules must name modules or be 'all-linear'")


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
def default() -> TrainConfig:
    """The embedded default: a tiny random Llama learns the built-in counting task on CPU."""
    return TrainConfig()


def tldr_pythia(size: str) -> TrainConfig:
    """TL;DR summarization with the paper's settings (appendix I.1.4); needs the hub."""
    return TrainConfig(
        run_dir=f"runs/tldr_pythia_{size}",
        model=ModelConfig(policy=f"vwxyzjn/EleutherAI_pythia-{size}-deduped__sft__tldr", dtype="bfloat16"),
        data=DataConfig(prompts="trl-lib/tldr", prompt_column="prompt", max_prompt_tokens=512),
        generation=SamplingConfig(max_new_tokens=53, temperature=0.7, samples_per_prompt=2),
        reward=RewardConfig(model=f"vwxyzjn/EleutherAI_pythia-{size}-deduped__reward__tldr", missing_eos_penalty=-1.0,
                            kl_coef=0.05),
        train=TrainingConfig(prompts_per_iteration=512, num_epochs=4, minibatches=1, micro_batch_prompts=8),
        optim=OptimConfig(iterations=228, lr=3e-6, adam_eps=1e-5),
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
        train=TrainingConfig(prompts_per_iteration=32, num_epochs=1, micro_batch_tokens=6144, micro_batch_prompts=2),
        optim=OptimConfig(iterations=1000, lr=1e-7),
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
        train=dataclasses.replace(base.train, prompts_per_iteration=64, num_epochs=1),
        optim=OptimConfig(iterations=950, lr=5e-6, warmup_iterations=10))


def pythia_1b4_random() -> TrainConfig:
    """The paper's TL;DR iteration shape (512 prompts, 2 x 53 new tokens, 4 epochs) on a random-weight
    Pythia-1.4B and the counting task: a GPU benchmark of one REBEL iteration that needs no hub."""
    return TrainConfig(
        run_dir="runs/pythia_1b4_random",
        model=ModelConfig(policy="builtin:pythia-1.4b-random", dtype="bfloat16"),
        generation=SamplingConfig(max_new_tokens=53, temperature=0.7, samples_per_prompt=2),
        train=TrainingConfig(prompts_per_iteration=512, num_epochs=4, minibatches=1, micro_batch_prompts=16),
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
ALGORITHMS = {cls.__name__: cls for cls in (Rebel, Reinforce, RLOO, IterativeDPO, DPO, RebelPreference)}  # from_json


# ----------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------
def _parse(key: str, text: str, annotation):
    """Convert a CLI string to the field's type (str, int, float, bool, or Optional of those)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"SamplingConfig": SamplingConfig})
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return annotation(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot read {text!r} as {annotation.__name__}") from None


# Keys of earlier releases (the REBEL-only `rebel` section): rejected with the new name.
RENAMED = {"rebel.kl_coef": "reward.kl_coef", "rebel.prompts_per_iteration": "train.prompts_per_iteration",
           "rebel.num_epochs": "train.num_epochs", "rebel.minibatches": "train.minibatches",
           "rebel.micro_batch_pairs": "train.micro_batch_prompts",
           "train.micro_batch_pairs": "train.micro_batch_prompts"}


def apply_overrides(cfg: TrainConfig, pairs: list[tuple[str, str]]) -> TrainConfig:
    """Return a new config with `section.key=value` overrides applied and re-validated."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    changes: dict[str, dict] = {}
    top: dict = {}
    for key, text in pairs:
        if key in RENAMED or key == "rebel":
            raise ValueError(f"--{key} was renamed: use --{RENAMED.get(key, 'train.<field>')}")
        name, _, field = key.partition(".")
        if name not in sections:
            raise ValueError(f"unknown config key --{key}{_suggest(name, sections)}")
        if not field:
            if dataclasses.is_dataclass(sections[name]):
                raise ValueError(f"--{key} is a section; set --{key}.<field>")
            top[name] = _parse(key, text, {f.name: f.type for f in dataclasses.fields(cfg)}[name])
            continue
        section = sections[name]
        fields = {f.name: f.type for f in dataclasses.fields(section)}
        if field not in fields:
            raise ValueError(f"unknown config key --{key}{_suggest(field, fields, prefix=name + '.')}")
        changes.setdefault(name, {})[field] = _parse(key, text, fields[field])
    new_sections = {n: dataclasses.replace(sections[n], **c) for n, c in changes.items()}
    return dataclasses.replace(cfg, **top, **new_sections)


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean --{prefix}{close[0]}?)" if close else ""


# Fields that do not change what is trained (where things go, what is shown, speed/memory knobs):
# a resume may change them freely. Every other field differing from the checkpoint's stops a resume.
NOT_TRAJECTORY = ("run_dir", "logging.", "checkpoint.", "generation.check_every", "generation.compact_finished",
                  "generation.kv_budget_bytes", "train.micro_batch_prompts", "reward.batch_size",
                  "model.activation_checkpointing")


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trajectory_changes(saved_json: str, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(key, old, new) for each field that changes the trajectory and differs between a checkpoint's
    saved config and `cfg` (fields the saved config does not know are not compared)."""
    old, new = _flatten(json.loads(saved_json)), _flatten(json.loads(to_json(cfg)))
    return [(key, old[key], new[key]) for key in sorted(new)
            if key in old and old[key] != new[key] and not key.startswith(NOT_TRAJECTORY)]


# Help of the fields whose definition carries no comment (engine/generate.py, engine/algorithms/, ...).
_HELP = {
    "run_dir": "the run directory: config, metrics, checkpoints, final export (a rerun resumes from it)",
    "seed": "seeds weights of built-in models, prompt order, sampling and minibatch order",
    "optim.iterations": "iterations (collect + update) of the run; the LR decays linearly to 0 over them",
    "optim.lr": "AdamW learning rate (peak, after warm-up)",
    "optim.weight_decay": "AdamW weight decay",
    "optim.adam_eps": "AdamW epsilon",
    "optim.warmup_iterations": "iterations of linear LR warm-up",
    "checkpoint.keep": "checkpoints kept (older ones are deleted; corrupt ones are kept and not counted)",
    "data.split": "dataset split read (datasets directories and hub datasets)",
    "data.prompt_column": "the column holding the prompt (text, or a list of chat messages)",
    "model.activation_checkpointing": "recompute each decoder layer's activations in the backward",
    "model.lora_alpha": "LoRA scaling alpha (the update is scaled by alpha / rank)",
    "reward.batch_size": "responses per forward of the reward / preference model",
    "reward.preference_template": "how a pairwise preference model reads {prompt}, {a}, {b}",
    "logging.tensorboard": "write TensorBoard scalars under run_dir/tensorboard",
    "logging.plots": "write reward.png, kl.png, loss.png at the end",
    "logging.progress": "show a progress bar (main process)",
    "generation.max_new_tokens": "most tokens sampled per response",
    "generation.min_new_tokens": "EOS is masked before this many tokens",
    "generation.temperature": "sampling temperature (> 0; log-probabilities are taken at it too)",
    "generation.top_k": "sample among the k most likely tokens (0: off)",
    "generation.top_p": "nucleus sampling mass (1: off)",
    "generation.samples_per_prompt": "responses per prompt (k; fixed by the algorithm)",
    "generation.check_every": "decode steps between checks whether every row has finished",
    "algorithm.samples_per_prompt": "responses per prompt the algorithm trains on (k)",
    "algorithm.eta": "REBEL's eta: the log-ratio difference is divided by it",
    "algorithm.beta": "DPO's beta: the implicit reward's scale",
    "train.prompts_per_iteration": "prompts sampled per iteration (over all ranks)",
    "reward.preference_function": "'package.module:function' (prompts, responses, others) -> P(response > other)",
}


def _field_comments(cls) -> dict[str, str]:
    """field -> its comment in the class's source (trailing, or the comment lines just above it)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, block = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("#").strip())
            continue
        code, _, comment = text.partition("  # ")
        name, colon, _ = code.partition(":")
        if colon and name.isidentifier() and not text.startswith(("def ", "class ", "return ", "@")):
            out[name] = comment.strip() or " ".join(block).split(". ")[0].rstrip(".")
        block = []
    return out


def describe(cfg: TrainConfig | None = None) -> list[tuple[str, str, object, str]]:
    """(section.key, type, default, one line of help) of every field of a config (default: `default()`)."""
    cfg = cfg or default()
    rows = []

    def visit(obj, prefix):
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                visit(value, f"{prefix}{f.name}.")
                continue
            key = f"{prefix}{f.name}"
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((key, kind, value, _HELP.get(key) or comments.get(f.name, "")))

    visit(cfg, "")
    return rows


def help_text(cfg: TrainConfig | None = None) -> str:
    """The --help listing: one line per --section.key with its type, default and help."""
    rows = describe(cfg)
    width = max(len(key) for key, *_ in rows) + 2
    lines = [f"  --{key:<{width}} {kind} = {value!r}" + (f"\n  {'':<{width + 2}} {text}" if text else "")
             for key, kind, value, text in rows]
    return "\n".join(lines)


def to_json(cfg: TrainConfig) -> str:
    raw = dataclasses.asdict(cfg)
    raw["algorithm"]["class"] = type(cfg.algorithm).__name__
    return json.dumps(raw, indent=2, sort_keys=True)


def from_json(text: str) -> TrainConfig:
    raw = _renamed_sections(json.loads(text))
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for name, value in raw.items():
        if name == "algorithm":
            value = dict(value)
            kwargs[name] = ALGORITHMS[value.pop("class")](**value)
        elif isinstance(value, dict):
            cls = SamplingConfig if name == "generation" else type(getattr(TrainConfig(), name))
            kwargs[name] = cls(**value)
        elif name in sections:
            kwargs[name] = value
    return TrainConfig(**kwargs)


def _renamed_sections(raw: dict) -> dict:
    """A config.json of an earlier release (a `rebel` section) in today's names."""
    old = raw.pop("rebel", None)
    if old is not None:
        for key, value in old.items():
            section, field = RENAMED[f"rebel.{key}"].split(".")
            raw.setdefault(section, {})[field] = value
    return raw
