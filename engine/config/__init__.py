"""A run's configuration: typed keyword-only sections (sections.py), named presets (presets.py) and the
command line's overrides, --help and config.json (cli.py).

    python engine/train.py --preset tldr_pythia_1b4 --optim.lr 1e-6 --algorithm.eta 0.5

Imports nothing of the engine but the algorithm dataclasses (engine/algorithms/), and no torch: a config
is read, checked and printed without loading model code.
"""
from .cli import (
    ALGORITHMS,
    NOT_TRAJECTORY,
    RENAMED,
    apply_overrides,
    describe,
    from_json,
    help_text,
    to_json,
    trajectory_changes,
)
from .presets import (
    PRESETS,
    counting_lora,
    counting_with,
    default,
    pythia_1b4_random,
    tldr_pythia,
    ultrafeedback_dpo_llama3_8b,
    ultrafeedback_llama3_8b,
)
from .sections import (
    ATTENTION,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    IterationConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    validate,
)

__all__ = ["ALGORITHMS", "ATTENTION", "NOT_TRAJECTORY", "PRESETS", "RENAMED", "CheckpointConfig", "DataConfig",
           "EvalConfig", "IterationConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "PlanConfig", "RewardConfig",
           "SamplingConfig", "TrainConfig", "apply_overrides", "counting_lora", "counting_with", "default", "describe",
           "from_json", "help_text", "pythia_1b4_random", "tldr_pythia", "to_json", "trajectory_changes",
           "ultrafeedback_dpo_llama3_8b", "ultrafeedback_llama3_8b", "validate"]
