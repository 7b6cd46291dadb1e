"""The paper's comparison algorithms as small loss modules on top of the policy's per-token
log-probabilities (one file each; see base.py for the interface):

    Rebel, Reinforce, RLOO (k = 2 or 4), IterativeDPO, DPO (offline), RebelPreference (Appendix D.2).

Each is a frozen dataclass: `algo.samples_per_prompt`, `algo.rewards(...)` (how feedback becomes the
rewards it regresses on) and `algo.loss(logprobs, batch) -> (loss, metrics)` with an `AlgoBatch`
(engine/algorithms/inputs.py). A preset picks one by constructing it; there is no string dispatch here.
Importing this package loads no torch (the config constructs algorithms); `inputs` does.
"""
from .base import Algorithm
from .dpo import DPO
from .iterative_dpo import IterativeDPO
from .rebel import Rebel
from .rebel_preference import RebelPreference, anchor_preferences
from .reinforce import Reinforce
from .rloo import RLOO
from .shaping import sequence_kl, shape_rewards

__all__ = ["Algorithm", "DPO", "IterativeDPO", "Rebel", "RebelPreference", "Reinforce", "RLOO",
           "anchor_preferences", "sequence_kl", "shape_rewards"]
