"""The sections of a run's config: typed, keyword-only dataclasses, each field with its one line of help
(`option(default, help)`: the help of `--help` and of the docs has this one source), and `validate`.

Nothing here imports torch or another part of the engine but the algorithm dataclasses (engine/algorithms/),
so reading or checking a config loads no model code.
"""
from __future__ import annotations

import dataclasses
import math

from engine.algorithms import Algorithm, Rebel

ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def option(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A config field with its help text (read by `describe` for --help)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    policy: str = option("builtin:tiny-llama",
                         "a Hugging Face path / hub id, or builtin:NAME (random, engine/data/tasks.py)")
    reference: str | None = option(None, "the reference model (None: the policy's initial weights)")
    dtype: str = option("float32", "parameter dtype of the policy: float32 | bfloat16")
    train_top_layers: int = option(0, "> 0: train only the top k decoder layers, the final norm and the LM head")
    activation_checkpointing: bool = option(False, "recompute each decoder layer's activations in the backward")
    attn_implementation: str | None = option(
        None, "transformers' attention: sdpa | eager | flex_attention | flash_attention_2 (None: the family's "
              "default); packed micro-batches run SDPA/eager blockwise and flash-attention-2 through flash-attn's "
              "variable-length kernels (the `flash` extra)")
    liger_kernels: bool = option(False, "GPU: Liger-Kernel's RMSNorm / RoPE / SwiGLU in the policy body "
                                        "(off until measured)")
    lora_rank: int = option(0, "LoRA rank through peft (0: full fine-tuning); the reference is the policy with "
                               "its adapter disabled (model.reference must stay None)")
    lora_alpha: float = option(16.0, "LoRA scaling alpha (the update is scaled by alpha / rank)")
    lora_target_modules: str = option("all-linear", "peft's target_modules: 'all-linear' or comma-separated names")
    lora_modules_to_save: str = option("", "comma-separated modules trained in full beside the adapters "
                                           "(e.g. lm_head)")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    prompts: str = option("builtin:counting",
                          "builtin:NAME, a datasets directory, *.jsonl / *.json, or a hub dataset id")
    split: str = option("train", "dataset split read (datasets directories and hub datasets)")
    prompt_column: str = option("prompt", "the column holding the prompt (text, or a list of chat messages)")
    partner_column: str | None = option(None, "hybrid REBEL: y' read from this column instead of sampled")
    chosen_column: str | None = option(None, "offline preference data (DPO): the preferred response")
    rejected_column: str | None = option(None, "offline preference data (DPO): the dispreferred response")
    chat_template: bool = option(False, "wrap each prompt with the policy tokenizer's chat template")
    max_prompt_tokens: int = option(512, "longer prompts are skipped (and counted)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = option(53, "most tokens sampled per response")
    min_new_tokens: int = option(0, "EOS is masked before this many tokens")
    temperature: float = option(1.0, "sampling temperature (> 0; log-probabilities are taken at it too)")
    top_k: int = option(0, "sample among the k most likely tokens (0: off)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    samples_per_prompt: int = option(2, "responses per prompt (k; fixed by the algorithm)")
    check_every: int = option(8, "decode steps between checks whether every row has finished")
    compact_finished: bool = option(True, "move live rows into a smaller batch bucket once half have finished")
    kv_budget_bytes: int = option(8 * 2**30, "the static cache of one call never exceeds this")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


@dataclasses.dataclass(kw_only=True)
class RewardConfig:
    model: str | None = option(None, "a Hugging Face sequence-classification reward model")
    function: str | None = option(None, "'package.module:function' scoring (prompts, responses) -> list[float]")
    missing_eos_penalty: float = option(-1.0, "replaces the score of a response that never emitted EOS")
    kl_coef: float = option(0.05, "r = score - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), sequence level")
    batch_size: int = option(32, "responses per forward of the reward / preference model")
    preference_model: str | None = option(
        None, "REBEL from preferences: a pairwise sequence-classification model (one logit, P(y > y') = sigmoid, "
              "averaged over both orders) reading preference_template")
    preference_function: str | None = option(
        None, "'package.module:function' (prompts, responses, others) -> P(response > other)")
    preference_template: str = option("{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}",
                                      "how a pairwise preference model reads {prompt}, {a}, {b}")


@dataclasses.dataclass(kw_only=True)
class IterationConfig:
    """The iteration's batch and its optimizer steps, for every algorithm (k samples per prompt); the
    section `train` of the command line."""

    prompts_per_iteration: int = option(64, "prompts sampled per iteration (over all ranks)")
    num_epochs: int = option(4, "passes over each iteration's batch")
    minibatches: int = option(1, "optimizer steps per epoch (the paper: 1, i.e. accumulate the whole batch)")
    micro_batch_tokens: int = option(8192, "packed tokens per micro-batch, one padding-free row (0: padded rows, "
                                           "no packing); all k samples of a prompt stay in one micro-batch")
    micro_batch_prompts: int = option(16, "prompts per micro-batch when micro_batch_tokens = 0")
    shared_prefix: bool = option(True, "packed: each prompt forwarded once per pass with its k responses "
                                       "attending to it")
    fold_old_logprobs: bool = option(True, "with one optimizer step per epoch, the first epoch's forward records "
                                           "log pi_t instead of a separate no-grad pass")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    iterations: int = option(200, "iterations (collect + update) of the run; the LR decays linearly to 0 over them")
    lr: float = option(1e-3, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_eps: float = option(1e-5, "AdamW epsilon")
    warmup_iterations: int = option(0, "iterations of linear LR warm-up")
    max_grad_norm: float | None = option(None, "gradient clipping norm (None: no clipping, the paper's setting)")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    every: int = option(25, "iterations between checkpoints (0: only at the end and on SIGTERM)")
    keep: int = option(2, "checkpoints kept (older ones are deleted; corrupt ones are kept and not counted)")
    export_hf: bool = option(True, "save_pretrained of the final policy")
    allow_config_change: bool = option(
        False, "a resume whose config differs from the checkpoint's in a field that changes the trajectory (lr, "
               "iterations, seed, data, model, ...) stops and lists them; true accepts the new values")
    stop_grace_s: float = option(
        15.0, "SIGTERM / SIGINT: a checkpoint is on disk within this many seconds (the current iteration is "
              "finished only if it fits, else the last completed one is saved)")


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """Evaluation on held-out prompts (engine/evaluation/): one row of run_dir/eval.jsonl per evaluation."""

    prompts: str | None = option(None, "held-out prompts: builtin:NAME, a datasets directory, *.jsonl / *.json, or "
                                       "a hub dataset id (None: no evaluation)")
    split: str = option("test", "split read (datasets directories and hub datasets)")
    prompt_column: str | None = option(None, "the prompt column (None: data.prompt_column)")
    reference_column: str | None = option(None, "the reference response (a human summary, the chosen answer): "
                                                 "scored too, and the policy's win rate against it (optional)")
    max_prompts: int = option(256, "the first this many prompts of the split (0: all)")
    every: int = option(0, "iterations between evaluations (0: only before training and at the end)")
    before_training: bool = option(True, "evaluate the starting policy (the row of iteration 0)")
    temperature: float = option(0.0, "sampling temperature of the evaluation (0: greedy; the paper: 0.01); "
                                     "the KL is taken at it (at 1 when greedy)")
    max_new_tokens: int | None = option(None, "most tokens per response (None: generation.max_new_tokens)")
    seed: int = option(0, "seeds the evaluation's sampling (its own stream: training's is untouched)")
    batch_size: int = option(64, "prompts generated together (fixed groups: any process count gives the same rows)")
    judge: str | None = option(None, "'package.module:function' (prompts, responses, others) -> P(response > "
                                     "other), e.g. an LLM judge: the policy against the reference, both orders")
    logged_samples: int = option(4, "samples shown in TensorBoard's text tab per evaluation")


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = option(True, "write TensorBoard scalars under run_dir/tensorboard")
    plots: bool = option(True, "write reward.png, kl.png, loss.png at the end")
    progress: bool = option(True, "show a progress bar (main process)")
    wandb: bool = option(False, "mirror metrics, evaluation rows and samples tables to Weights & Biases (the "
                                "wandb package; WANDB_MODE=offline works without network)")
    wandb_project: str = option("rebel", "the wandb project")
    wandb_run_name: str | None = option(None, "the wandb run's name (None: the run directory's name)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Planning a run before it starts (engine/plan/): `--plan` prints the predicted memory per device and time
    per phase and exits; a normal start prints one line and refuses a config predicted not to fit."""

    gpus: int = option(0, "processes to plan for (GPUs, or CPU processes); 0: this launch's ($WORLD_SIZE, else 1)")
    gpus_per_node: int = option(8, "processes per node: collectives beyond one node run over the network")
    device: str = option("auto", "h100 | h200 | a100 | a6000 | cpu (measured now); auto: this machine's")
    memory_gib: float = option(0.0, "memory of one device in GiB (0: the device's own)")
    link_gbs: float = option(0.0, "intra-node bandwidth per GPU in GB/s (0: the device's NVLink / PCIe)")
    network_gbs: float = option(0.0, "inter-node bandwidth per GPU in GB/s (0: the device's default NIC)")
    prompt_tokens: int = option(0, "mean prompt length assumed (0: the built-in set's, else data.max_prompt_tokens)")
    response_tokens: int = option(0, "mean response length assumed (0: generation.max_new_tokens)")
    refuse: bool = option(True, "a normal start stops (exit 2) when the predicted peak exceeds the device's memory")

    def __post_init__(self):
        for key in ("gpus", "prompt_tokens", "response_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"plan.{key} must be >= 0, got {getattr(self, key)!r}")
        if self.gpus_per_node < 1:
            raise ValueError(f"plan.gpus_per_node must be >= 1, got {self.gpus_per_node!r}")
        for key in ("memory_gib", "link_gbs", "network_gbs"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"plan.{key} must be finite and >= 0, got {getattr(self, key)!r}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """A whole run: where it goes, its seed, and one section per part of the engine."""

    run_dir: str = option("runs/default", "the run directory: config, metrics, checkpoints, final export "
                                          "(a rerun resumes from it)")
    seed: int = option(0, "seeds weights of built-in models, prompt order, sampling and minibatch order")
    model: ModelConfig = option(factory=ModelConfig)
    data: DataConfig = option(factory=DataConfig)
    generation: SamplingConfig = option(
        factory=lambda: SamplingConfig(max_new_tokens=8, temperature=1.0, samples_per_prompt=2))
    reward: RewardConfig = option(factory=RewardConfig)
    train: IterationConfig = option(factory=IterationConfig)
    algorithm: Algorithm = option(factory=Rebel, help="the loss; presets construct others")
    optim: OptimConfig = option(factory=OptimConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    logging: LoggingConfig = option(factory=LoggingConfig)
    eval: EvalConfig = option(factory=EvalConfig)
    plan: PlanConfig = option(factory=PlanConfig)

    def __post_init__(self):
        validate(self)


def walk(obj, prefix: str = ""):
    """(section.key, value) of every leaf field of a config, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def validate(cfg: TrainConfig) -> None:
    """Every value, when the config is built (before anything is loaded); each error names the key and
    the value. No float anywhere may be NaN or infinite."""
    for key, value in walk(cfg):
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
    _validate_ranges(cfg)
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
    _validate_eval(cfg.eval)
    _validate_lora(cfg.model)
    if cfg.generation.greedy:
        raise ValueError("generation.temperature must be > 0: REBEL needs sampled responses")


def _validate_ranges(cfg: TrainConfig) -> None:
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


def _validate_eval(ev: EvalConfig) -> None:
    for key, value in {"eval.max_prompts": ev.max_prompts, "eval.every": ev.every, "eval.seed": ev.seed,
                       "eval.temperature": ev.temperature, "eval.logged_samples": ev.logged_samples}.items():
        if isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
    if ev.batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {ev.batch_size!r}")
    if ev.max_new_tokens is not None and ev.max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be >= 1 or None, got {ev.max_new_tokens!r}")
    if ev.prompts is not None and not ev.prompts.strip():
        raise ValueError("eval.prompts must name a dataset or be None")
    if ev.judge is not None and ":" not in ev.judge:
        raise ValueError(f"eval.judge must be 'package.module:function', got {ev.judge!r}")
    if ev.judge is not None and ev.reference_column is None:
        raise ValueError(f"eval.judge={ev.judge!r} compares the policy with the reference: set eval.reference_column")


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
