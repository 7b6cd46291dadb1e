"""A run's plan: its config on a device set -> memory per device by part, time per phase, the verdict."""
from __future__ import annotations

import dataclasses
import os

from engine.config import TrainConfig

from . import memory, timing
from .architecture import Architecture, architecture
from .devices import GIB, Device, device, kind_of
from .workload import Workload, workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    cfg: TrainConfig
    device: Device
    world: int
    gpus_per_node: int
    links: timing.Links
    arch: Architecture
    work: Workload
    persistent: dict[str, float]  # bytes per device
    generation: dict[str, float]
    training: dict[str, float]
    phases: dict[str, timing.Phase]
    memory_gib: float  # what one process may use

    @property
    def nodes(self) -> int:
        return -(-self.world // self.gpus_per_node)

    def peak(self, phase: str) -> float:
        """Predicted peak bytes per device in "generation" or "training"."""
        return sum(self.persistent.values()) + sum(getattr(self, phase).values())

    @property
    def peak_bytes(self) -> float:
        return max(self.peak("generation"), self.peak("training"))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.memory_gib * GIB

    @property
    def iteration_s(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Prompt + response tokens of every sample of the iteration, per second and process."""
        return self.work.iteration_tokens / self.iteration_s

    @property
    def bottleneck(self) -> tuple[str, str]:
        """(the longest phase, what it waits on)."""
        name = max(self.phases, key=lambda k: self.phases[k].seconds)
        return name, self.phases[name].bound


def resolve_device(cfg: TrainConfig, *, threads: int | None = None) -> Device:
    """plan.device ("auto": this machine's GPU kind, else the CPU), with plan.memory_gib applied."""
    kind = cfg.plan.device
    if kind == "auto":
        kind = _local_kind()
    dev = device(kind, threads=threads)
    if not dev.cuda:  # the machine's RAM, shared by the processes on it
        dev = dataclasses.replace(dev, memory_gib=dev.memory_gib / int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.plan.memory_gib:
        dev = dataclasses.replace(dev, memory_gib=cfg.plan.memory_gib)
    return dev


def _local_kind() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    kind = kind_of(name)
    if kind == "cpu":
        raise ValueError(f"plan.device: this GPU ({name}) is not in the planner's table; pass --plan.device with one "
                         f"of the known kinds (engine/plan/devices.py)")
    return kind


def feedback_models(cfg: TrainConfig) -> list[Architecture]:
    """The reward / preference models a run loads (functions and built-ins cost nothing)."""
    names = [cfg.reward.model] if cfg.reward.model and not cfg.algorithm.needs_preferences else []
    if cfg.algorithm.needs_preferences and cfg.reward.preference_model:
        names.append(cfg.reward.preference_model)
    return [architecture(name, classifier=True) for name in names]


def plan_run(cfg: TrainConfig, *, dev: Device | None = None, world: int | None = None,
             gpus_per_node: int | None = None) -> Plan:
    """The plan of `cfg` on `world` processes (default plan.gpus, else $WORLD_SIZE, else 1) of `dev`
    (default: plan.device resolved now). Reads configs only: no weights are loaded."""
    dev = dev or resolve_device(cfg)
    world = world or cfg.plan.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    per_node = gpus_per_node or cfg.plan.gpus_per_node
    arch = architecture(cfg.model.policy)
    feedback = feedback_models(cfg)
    num = memory.numerics(cfg, dev, world)
    work = workload(cfg, world=world, kv_bytes_per_token=arch.kv_bytes_per_token(num.generation))
    net = timing.links(dev, world, per_node, cfg.plan.link_gbs, cfg.plan.network_gbs)
    return Plan(cfg=cfg, device=dev, world=world, gpus_per_node=min(per_node, world), links=net, arch=arch, work=work,
                persistent=memory.persistent(cfg, arch, num, dev, world, feedback),
                generation=memory.generation(cfg, arch, work, num, dev),
                training=memory.training(cfg, arch, work, num, dev),
                phases=timing.phases(cfg, arch, work, num, dev, net, feedback), memory_gib=dev.memory_gib)
