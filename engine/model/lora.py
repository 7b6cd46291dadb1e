"""LoRA training through peft, with the reference model obtained by switching the adapter off.

The paper trains its 1.4B and 2.8B TL;DR policies with LoRA; log pi_ref then needs no second copy of
the weights: it is the same module with every LoRA layer disabled (base weights untouched, adapter
contributions skipped), so the KL term and the REBEL targets see exactly the base model.

    policy = add_lora(hf_model, cfg.model)                # the HF model with LoRA layers injected
    reference_lp = AdapterDisabled(policy_lp, policy)     # log pi_ref through the policy's own weights
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn


def add_lora(lm: nn.Module, cfg) -> nn.Module:
    """Inject LoRA adapters (rank cfg.lora_rank, alpha cfg.lora_alpha, no dropout: REBEL regresses
    onto exact log-ratios) into the target linear layers and freeze everything else. Returns the
    Hugging Face model itself, now holding the adapters (and their config as `peft_config`)."""
    from peft import LoraConfig, get_peft_model

    spec = cfg.lora_target_modules.strip()
    targets = spec if spec == "all-linear" else _names(spec)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=_names(cfg.lora_modules_to_save) or None, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, config).get_base_model()


def _names(spec: str) -> list[str]:
    return [name.strip() for name in spec.split(",") if name.strip()]


def _lora_layers(lm: nn.Module) -> list[nn.Module]:
    """LoRA layers, and the wrappers of fully trained copies (modules_to_save), whose disabled state
    is the original, frozen module."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in lm.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapter_disabled(lm: nn.Module) -> Iterator[None]:
    """Inside: every LoRA layer of `lm` computes its base layer only; the adapters are re-enabled
    (and trainable again) on exit, also after an exception."""
    layers = _lora_layers(lm)
    if not layers:
        raise ValueError(f"{type(lm).__name__} has no LoRA layer to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterDisabled(nn.Module):
    """log pi_ref as the policy's log-probability module with its adapters off. Holds no weights of
    its own (the policy is kept out of its parameters, so optimizers and checkpoints never see it twice)."""

    def __init__(self, policy_logprobs: nn.Module, lm: nn.Module):
        super().__init__()
        self._inner = (policy_logprobs, lm)  # a tuple: not registered as submodules

    def forward(self, *args, **kwargs):
        policy_logprobs, lm = self._inner
        with adapter_disabled(lm):
            return policy_logprobs(*args, **kwargs)


def adapter_saver(lm: nn.Module):
    """`save` for checkpoint.export_hf: writes the adapter only (adapter_config.json and
    adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained(base_model, path))."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def save(directory: str, state_dict: dict) -> None:
        weights = get_peft_model_state_dict(lm, state_dict=state_dict)  # adapter tensors, adapter name removed
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        lm.peft_config["default"].save_pretrained(directory)

    return save


def load_adapter(lm: nn.Module, directory: str) -> None:
    """Load an adapter written by `adapter_saver` into `lm` (which `add_lora` gave the same adapters)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(lm, {k.removeprefix("base_model.model."): v for k, v in weights.items()})
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{directory}: adapter weights that match no adapter of the model: {missing[:5]}")
