"""Time per phase of one iteration (every process works in parallel; one process's share is timed).

Each phase is a roofline with fixed costs: max(FLOPs / the device's matmul rate + the elementwise kernels'
activation traffic / its memory bandwidth, streamed bytes / the bandwidth, collective bytes / the link) + the
fixed costs of its calls (devices.OVERHEADS: a decoder
layer's launches and Python, a micro-batch pass's packing / head / loss, a decode step's sampling and
bookkeeping, an optimizer step's). FSDP2's all-gathers and reduce-scatters overlap the compute they feed
(prefetch), so a pass costs the larger of the two.
- generate: per chunk, a prefill of every (left-padded) prompt by FLOPs, then `max_new_tokens` decode
  steps, each reading the generation copy's weights and the whole static KV cache (the cache's length,
  masked) at the memory bandwidth, or its FLOPs if larger;
- score: the reward / preference model's forward over prompt + response (a function: free);
- logprobs: the no-grad passes (log pi_ref; log pi_t unless folded into the first epoch) over the packed
  micro-batches (shared prefix: each prompt once per pass), head FLOPs on response tokens only;
- update: epochs x micro-batches of forward + backward (2x the forward's FLOPs for trained layers, none for
  the frozen layers below them, 1x with LoRA (input gradients only); the head's backward 3x its forward:
  the op recomputes the logits), the
  forward again under activation checkpointing, FSDP2's all-gathers (forward; backward for the layers
  resharded after it) and the float32 gradient reduce-scatter per micro-batch, AdamW's pass over its states;
- sync: the trained weights gathered in float32 and copied into the generation copy.
"""
from __future__ import annotations

import dataclasses

from engine.config import TrainConfig

from .architecture import Architecture
from .devices import OVERHEADS, Device
from .memory import Numerics, grad_layers, saved_bytes_per_token, trained_params
from .workload import Workload

ADAMW_BYTES = 28  # per trained parameter and step: read param, grad, two states; write param and states (fp32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase:
    """A phase's seconds, the roofline terms they came from and its counts of fixed-cost calls (in the
    order of devices.OVERHEADS: decoder layer calls, micro-batch passes, decode steps, optimizer steps),
    summed over the phase's pieces."""

    seconds: float = 0.0
    compute_s: float = 0.0
    memory_s: float = 0.0
    comm_s: float = 0.0
    fixed_s: float = 0.0
    calls: tuple[float, ...] = (0.0,) * len(OVERHEADS)

    @classmethod
    def roofline(cls, dev: Device, *, compute_s: float = 0.0, memory_s: float = 0.0, comm_s: float = 0.0,
                 calls: tuple[float, ...] = (0.0,) * len(OVERHEADS)) -> Phase:
        """Work that overlaps (compute, memory traffic, collectives), then the calls' fixed costs."""
        fixed = sum(n * getattr(dev, name) for n, name in zip(calls, OVERHEADS)) * 1e-6
        return cls(seconds=max(compute_s, memory_s, comm_s) + fixed, compute_s=compute_s, memory_s=memory_s,
                   comm_s=comm_s, fixed_s=fixed, calls=tuple(calls))

    @property
    def bound(self) -> str:
        """What the phase waits on most."""
        terms = {"compute": self.compute_s, "memory bandwidth": self.memory_s, "communication": self.comm_s,
                 "per-call overhead": self.fixed_s}
        return max(terms, key=terms.get)

    def __add__(self, other: Phase) -> Phase:
        fields = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)
                  if f.name != "calls"}
        return Phase(**fields, calls=tuple(a + b for a, b in zip(self.calls, other.calls)))

    def times(self, n: float) -> Phase:
        fields = {f.name: getattr(self, f.name) * n for f in dataclasses.fields(self) if f.name != "calls"}
        return Phase(**fields, calls=tuple(c * n for c in self.calls))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Links:
    """The collective bandwidth one process sees (bytes/s): NVLink / PCIe within a node, the network
    between nodes (a ring over nodes runs at the slower of the two)."""

    world: int
    bus_bytes_s: float

    def seconds(self, full_bytes: float) -> float:
        """An all-gather or reduce-scatter of a tensor of `full_bytes` (ring: (n - 1) / n of it per rank)."""
        if self.world <= 1:
            return 0.0
        return full_bytes * (self.world - 1) / self.world / self.bus_bytes_s


def links(dev: Device, world: int, gpus_per_node: int, link_gbs: float = 0.0, network_gbs: float = 0.0) -> Links:
    link = (link_gbs or dev.link_gbs) * 1e9
    if world > gpus_per_node:
        link = min(link, (network_gbs or dev.network_gbs) * 1e9)
    return Links(world=world, bus_bytes_s=link * dev.comm_efficiency)


def forward_flops(arch: Architecture, tokens: float, keys: float, scored: float) -> float:
    """A forward over `tokens` packed tokens whose attention sums to `keys` keys, the head on `scored`."""
    q = arch.heads * arch.head_dim
    return 2 * arch.matmul_params() * tokens + 4 * arch.layers * q * keys + 2 * scored * arch.hidden * arch.vocab


def elementwise_s(arch: Architecture, tokens: float, e: int, dev: Device) -> float:
    """The norms, activations, rotary embeddings and residual sums of a forward over `tokens`: each layer's
    activations written and read once at the memory bandwidth, in sequence with the matmuls."""
    return 2 * tokens * arch.layers * saved_bytes_per_token(arch, e) / (dev.hbm_tbs * 1e12)


def phases(cfg: TrainConfig, arch: Architecture, w: Workload, num: Numerics, dev: Device, net: Links,
           feedback: list[Architecture]) -> dict[str, Phase]:
    return {"generate": generate(arch, w, num, dev), "score": score(cfg, w, dev, feedback),
            "logprobs": logprobs(cfg, arch, w, num, dev, net), "update": update(cfg, arch, w, num, dev, net),
            "sync": sync(cfg, arch, num, dev, net)}


def generate(arch: Architecture, w: Workload, num: Numerics, dev: Device) -> Phase:
    if not w.generates:
        return Phase()
    rate, bw = dev.flops_per_s(num.generation, generation=True), dev.hbm_tbs * 1e12
    prompts, rows = w.gen_chunk_prompts, w.gen_chunk_prompts * w.samples
    prefill = forward_flops(arch, prompts * w.prompt_max, prompts * w.prompt_max**2 / 2, prompts)
    q = arch.heads * arch.head_dim
    step_flops = (2 * rows * (arch.matmul_params() + arch.hidden * arch.vocab)
                  + 4 * arch.layers * q * rows * w.cache_length)
    step_bytes = ((arch.matmul_params() + arch.vocab * arch.hidden) * num.generation
                  + rows * w.cache_length * arch.kv_bytes_per_token(num.generation))
    steps = w.new_tokens - 1  # the prefill samples the first token
    layer_calls = arch.layers * (1 + (0 if dev.cuda else steps))  # CUDA graphs replay the decode step's layers
    prefill_s = prefill / rate + elementwise_s(arch, prompts * w.prompt_max, num.generation, dev)
    chunk = Phase.roofline(dev, compute_s=prefill_s + steps * step_flops / rate, memory_s=steps * step_bytes / bw,
                           calls=(layer_calls, 1, w.new_tokens, 0))
    return chunk.times(w.gen_chunks)


def score(cfg: TrainConfig, w: Workload, dev: Device, feedback: list[Architecture]) -> Phase:
    """The reward model on every response (the preference model on both orders of each compared pair)."""
    if not w.generates or not feedback:
        return Phase()
    rows = w.prompts * w.samples * (2 * (w.samples - 1) / w.samples if cfg.algorithm.needs_preferences else 1)
    tokens = rows * (w.prompt_mean + w.response)
    total = Phase()
    for m in feedback:
        calls = -(-rows // cfg.reward.batch_size)
        total = total + Phase.roofline(dev, compute_s=2 * m.matmul_params() * tokens / dev.flops_per_s(m.stored_bytes),
                                       calls=(calls * m.layers, calls, 0, 0))
    return total


def _forward(arch: Architecture, w: Workload) -> tuple[float, float]:
    """(body FLOPs, head FLOPs) of one no-grad forward over every group of the process."""
    head = 2 * w.prompts * w.group_scored * arch.hidden * arch.vocab
    return forward_flops(arch, w.prompts * w.group_tokens, w.prompts * w.group_keys, 0), head


def logprobs(cfg: TrainConfig, arch: Architecture, w: Workload, num: Numerics, dev: Device, net: Links) -> Phase:
    """The no-grad passes; FSDP2 gathers every layer for each micro-batch."""
    passes, micro = 1 + (not w.folded), w.micro_batches * w.minibatches
    body, head = _forward(arch, w)
    gathers = micro * net.seconds(arch.params() * num.compute)
    compute = (body + head) / dev.flops_per_s(num.compute) + elementwise_s(arch, w.prompts * w.group_tokens,
                                                                            num.compute, dev)
    one = Phase.roofline(dev, compute_s=compute, comm_s=gathers,
                         calls=(micro * arch.layers, micro, 0, 0))
    return one.times(passes)


def update(cfg: TrainConfig, arch: Architecture, w: Workload, num: Numerics, dev: Device, net: Links) -> Phase:
    """One epoch: forward + backward of every micro-batch, the collectives of each, the optimizer steps."""
    rate = dev.flops_per_s(num.compute)
    body, head = _forward(arch, w)
    layers = grad_layers(cfg, arch)
    trained_share = layers / arch.layers
    weight_grads = 0.0 if cfg.model.lora_rank else trained_share  # LoRA: input gradients only (adapters: tiny)
    recompute = trained_share if cfg.model.activation_checkpointing else 0.0
    flops = body * (1 + trained_share + weight_grads + recompute) + 4 * head  # the head's backward: 3x
    passes = 1 + 2 * trained_share + recompute  # elementwise work: forward, backward 2x, recompute
    micro = w.micro_batches * w.minibatches
    trained = trained_params(cfg, arch)
    comm = micro * (net.seconds(arch.params() * num.compute) + net.seconds(layers * arch.layer_params() * num.compute)
                    + net.seconds(trained * 4))
    layer_calls = micro * (arch.layers + (2 + cfg.model.activation_checkpointing) * layers)
    compute = flops / rate + passes * elementwise_s(arch, w.prompts * w.group_tokens, num.compute, dev)
    epoch = Phase.roofline(dev, compute_s=compute, comm_s=comm, calls=(layer_calls, 3 * micro, 0, 0))
    optimizer = Phase.roofline(dev, memory_s=ADAMW_BYTES * trained / w.world / (dev.hbm_tbs * 1e12),
                               calls=(0, 0, 0, 1))
    return (epoch + optimizer.times(w.minibatches)).times(w.epochs)


def sync(cfg: TrainConfig, arch: Architecture, num: Numerics, dev: Device, net: Links) -> Phase:
    if not num.separate_copy:
        return Phase()
    trained = trained_params(cfg, arch)
    return Phase.roofline(dev, memory_s=trained * (4 + num.generation) / (dev.hbm_tbs * 1e12),
                          comm_s=net.seconds(trained * 4))
