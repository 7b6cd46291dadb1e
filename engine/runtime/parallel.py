"""Processes and sharding: torchrun's process group (gloo on CPU, NCCL on GPU), FSDP2 per decoder
layer, freezing all but the top layers, and the unsharded inference copy used for generation."""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    sharded: bool  # launched by torchrun: FSDP2 wraps the models

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One plain process, or torchrun's group: the same code path runs both."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(rank=0, world=1, device=device, sharded=False)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, sharded=True)


def all_reduce(value: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    if d.sharded and d.world > 1:
        dist.all_reduce(value, op=op or dist.ReduceOp.SUM)
    return value


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Hugging Face causal LM (the largest ModuleList of its base model)."""
    lists = [m for m in lm.base_model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(lm).__name__}: no decoder layer list found")
    return max(lists, key=len)


def train_only_top_layers(lm: nn.Module, k: int) -> None:
    """Freeze everything but the top k decoder layers, the final norm and the LM head (k = 0: train all).

    The final norm is whatever parameter of the base model lives outside the layers and the input
    embeddings; with tied embeddings the shared matrix is trained (it is the LM head)."""
    if k <= 0:
        return
    layers = decoder_layers(lm)
    if k > len(layers):
        raise ValueError(f"model.train_top_layers={k} but the model has {len(layers)} layers")
    for p in lm.parameters():
        p.requires_grad_(False)
    inside_layers = {id(p) for p in layers.parameters()}
    embed = {id(p) for p in lm.get_input_embeddings().parameters()}
    for p in lm.base_model.parameters():
        if id(p) not in inside_layers and id(p) not in embed:
            p.requires_grad_(True)
    for layer in list(layers)[-k:]:
        layer.requires_grad_(True)
    lm.get_output_embeddings().requires_grad_(True)


def apply_activation_checkpointing(lm: nn.Module, context_fn=None) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them. `context_fn`:
    torch.utils.checkpoint's pair of (forward, recompute) contexts (the engine passes the one that
    recomputes under the forward's packed-attention plan, engine/model/forward.py)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {} if context_fn is None else {"context_fn": context_fn}
    layers = decoder_layers(lm)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, **kwargs)


def shard(wrapper: nn.Module, lm: nn.Module, d: Dist, *, mp_policy=None) -> None:
    """FSDP2 (torchrun only): one group per decoder layer, the rest (embeddings, final norm, LM head;
    tied embeddings included) in the wrapper's root group, whose forward gathers them for the fused
    loss. `mp_policy`: FSDP2's MixedPrecisionPolicy (see engine/runtime/precision.py), None for full precision."""
    if not d.sharded:
        return
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in decoder_layers(lm):
        fully_shard(layer, **kw)
    fully_shard(wrapper, **kw)


def global_mean_std(x: torch.Tensor, d: Dist) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of x over all ranks' elements."""
    x = x.detach().double().reshape(-1)
    count = torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)
    sums = all_reduce(torch.stack([x.sum(), (x * x).sum(), count]), d)
    n = max(sums[2].item(), 1.0)
    mean = sums[0].item() / n
    var = max(sums[1].item() / n - mean * mean, 0.0) * n / max(n - 1, 1.0)
    return mean, var**0.5


@torch.no_grad()
def refresh_inference_copy(inference: nn.Module, trained: nn.Module) -> None:
    """Copy the (gathered) trained weights into the unsharded generation model. Parameter names match
    after stripping the wrapper's 'lm.' prefix and activation-checkpoint wrappers. Frozen parameters
    (LoRA's base weights, the layers below train_top_layers) are skipped: the copy was made from the
    same initial weights and they never change."""
    if inference is trained or inference is getattr(trained, "lm", None):
        return  # one unsharded process generates with the trained module itself

    def plain(name: str) -> str:
        return name.removeprefix("lm.").replace("_checkpoint_wrapped_module.", "")

    target = {plain(n): p for n, p in inference.named_parameters()}
    for name, param in trained.named_parameters():
        if not param.requires_grad:
            continue
        key = plain(name)
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        target[key].copy_(full.to(target[key].dtype))
