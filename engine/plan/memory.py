"""Memory per device of one process under FSDP2, by part, and the two peaks (generation, training).

Persistent (both peaks): the policy's float32 master weights, its float32 gradients (kept from the last
step until the next iteration's first zero_grad) and AdamW's two float32 states, all sharded over the
processes (trained parameters only for the last two); the frozen reference (sharded float32, bf16 when one
GPU process computes in bf16, none with LoRA); the unsharded generation copy in the compute dtype; the
reward / preference model (unsharded, in its checkpoint's dtype); the runtime (CUDA context and NCCL, or
the CPU process's interpreter and libraries).
Generation: the sampler's static KV cache of one chunk (engine/model/generate.py sizes chunks by
`generation.kv_budget_bytes`), the smaller batch buckets compaction keeps beside it, the prefill's
cache and working set.
Training: one micro-batch's saved activations (every trained layer's, or only layer inputs plus one
layer's with activation checkpointing), the fused op's d hidden, float32 d weight and the plan's working
memory (rebel_kernels/logprobs/plan.py), FSDP2's gathered root group (embeddings, final norm, head) and
two decoder layers in flight with their unsharded gradients, autocast's weight casts (one GPU process).
The precision rules are engine/runtime/precision.py's.
"""
from __future__ import annotations

import dataclasses

from engine.config import TrainConfig
from rebel_kernels.logprobs import plan as op_plan

from .architecture import Architecture
from .devices import GIB, Device
from .workload import Workload

# Bytes saved for the backward per token and decoder layer, in elements of the compute dtype: the layer
# input, two norm outputs, the attention output, the residual sum (5 H), q and k before and after the
# rotary embedding and v (2 q + 3 kv), the MLP's intermediate tensors (gate, up, activation, product: 4 I;
# GPT-NeoX: up and activation, 2 I). bf16 RMSNorm models also keep each norm's float32 input (2 x 4 H bytes).
NORM_FP32_BYTES = 8
TORCH_TILE_BYTES = 512 * 1024 * 4 * 2  # the op's CPU path: a logits tile and its gradient (torch_impl.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics:
    """The dtypes a run ends up with (engine/runtime/precision.py `decide`)."""

    compute: int  # element bytes of the training forward (bf16 only on GPU)
    generation: int  # of the generation copy (model.dtype)
    reference: int  # of the frozen reference's parameters
    separate_copy: bool  # the sampler runs on its own copy
    autocast: bool  # one GPU process in bf16: autocast caches bf16 casts of the weights
    sharded: bool


def numerics(cfg: TrainConfig, dev: Device, world: int) -> Numerics:
    low = cfg.model.dtype != "float32"
    sharded = world > 1
    autocast = low and dev.cuda and not sharded
    return Numerics(compute=2 if (low and dev.cuda) else 4, generation=2 if low else 4, reference=2 if autocast else 4,
                    separate_copy=sharded or low or cfg.model.activation_checkpointing, autocast=autocast,
                    sharded=sharded)


def trained_params(cfg: TrainConfig, arch: Architecture) -> int:
    """Parameters with gradients: all, the top layers + final norm + head, or LoRA's adapters (+ modules
    saved in full, counted as the embeddings and head when named)."""
    if cfg.model.lora_rank:
        saved = cfg.model.lora_modules_to_save
        full = arch.embedding_params() if ("lm_head" in saved or "embed" in saved) else 0
        return arch.lora_params(cfg.model.lora_rank) + full
    if cfg.model.train_top_layers:
        top = min(cfg.model.train_top_layers, arch.layers)
        return top * arch.layer_params() + arch.embedding_params() - arch.vocab * arch.hidden * (not arch.tied)
    return arch.params()


def trained_root_frozen(cfg: TrainConfig, arch: Architecture) -> int:
    """Parameters of the root group (embeddings, final norm, head) that get no gradient."""
    if cfg.model.lora_rank:
        saved = cfg.model.lora_modules_to_save
        return 0 if ("lm_head" in saved or "embed" in saved) else arch.embedding_params()
    if cfg.model.train_top_layers and not arch.tied:
        return arch.vocab * arch.hidden  # the input embedding is frozen, the head trained
    return 0


def grad_layers(cfg: TrainConfig, arch: Architecture) -> int:
    """Decoder layers that save activations for a backward (frozen bottom layers build no graph)."""
    return min(cfg.model.train_top_layers, arch.layers) if cfg.model.train_top_layers else arch.layers


def persistent(cfg: TrainConfig, arch: Architecture, num: Numerics, dev: Device, world: int,
               feedback: list[Architecture]) -> dict[str, float]:
    p, t = arch.params() + arch.lora_params(cfg.model.lora_rank), trained_params(cfg, arch)
    return {"weights (fp32 master)": 4 * p / world,
            "gradients (fp32)": 4 * t / world,
            "AdamW states (fp32)": 8 * t / world,
            "reference": 0 if cfg.model.lora_rank else arch.params() * num.reference / (world if num.sharded else 1),
            "generation copy": p * num.generation if num.separate_copy else 0,
            "reward / preference model (checkpoint dtype)": sum(m.params() * m.stored_bytes for m in feedback),
            "runtime": dev.runtime_gib * GIB}


def generation(cfg: TrainConfig, arch: Architecture, w: Workload, num: Numerics, dev: Device) -> dict[str, float]:
    if not w.generates:
        return {}
    per_token = arch.kv_bytes_per_token(num.generation)
    rows = w.gen_chunk_prompts * w.samples
    cache = rows * w.cache_length * per_token
    # compaction moves live rows into power-of-two buckets of at most half the rows, and the sampler keeps
    # every bucket's cache it made: at most 1 + 2 + 4 + ... + rows / 2 more rows
    largest = _power_of_two_below(rows // 2)
    buckets = 2 * largest - 1 if (cfg.generation.compact_finished and largest) else 0
    prefill_tokens = w.gen_chunk_prompts * w.prompt_max
    working = prefill_tokens * (2 * arch.hidden + 2 * arch.intermediate) * num.generation
    return {"KV cache (static, one chunk)": cache,
            "KV cache (compaction buckets)": buckets * w.cache_length * per_token,
            "prefill (its cache and working set)": prefill_tokens * per_token + working}


def training(cfg: TrainConfig, arch: Architecture, w: Workload, num: Numerics, dev: Device) -> dict[str, float]:
    e, layers = num.compute, grad_layers(cfg, arch)
    tokens, scored = w.micro_batch_tokens, w.micro_batch_scored
    per_layer = tokens * saved_bytes_per_token(arch, e)
    if cfg.model.activation_checkpointing:
        activations = tokens * layers * arch.hidden * e + per_layer
    else:
        activations = layers * per_layer
    parts = {"activations (one micro-batch)": activations,
             "fused op (d hidden, d weight, plan)": _op(cfg, arch, scored, e, dev)}
    if num.sharded:  # the root group stays gathered through forward and backward; two layers in flight
        root, layer = arch.embedding_params(), arch.layer_params()
        root_grads = root - trained_root_frozen(cfg, arch)
        parts["FSDP2 gathered params and grads"] = (root + 2 * layer) * e + (root_grads + layer) * (e + 4)
    if num.autocast:
        parts["autocast weight casts"] = trained_params(cfg, arch) * 2
    return parts


def saved_bytes_per_token(arch: Architecture, e: int) -> float:
    """Bytes one token's decoder layer saves for the backward (see NORM_FP32_BYTES)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    elements = 5 * arch.hidden + 2 * q + 3 * kv + (4 if arch.gated else 2) * arch.intermediate
    rms_upcast = e == 2 and not arch.biases  # RMSNorm families compute their norms in float32
    return elements * e + (2 * arch.hidden * NORM_FP32_BYTES if rms_upcast else 0)


def _op(cfg: TrainConfig, arch: Architecture, scored: float, e: int, dev: Device) -> float:
    """The fused op's backward beyond its inputs: d hidden, d weight in float32 and its cast (when the
    head is trained) and the working memory of its walk (GPU: the plan; CPU: one tile pair)."""
    head_trained = not cfg.model.lora_rank or "lm_head" in cfg.model.lora_modules_to_save
    d_weight = arch.vocab * arch.hidden * (4 + (e if e != 4 else 0)) if head_trained else 0
    if dev.cuda:
        walk = op_plan.gemm_plan(max(int(scored), 1), arch.vocab, arch.hidden, e, gather=True)
        working = walk.memory_bytes(arch.hidden, e, gather=True)
    else:
        working = TORCH_TILE_BYTES + 512 * arch.hidden * 4
    return scored * arch.hidden * e + d_weight + working


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (0 for n < 1)."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0
