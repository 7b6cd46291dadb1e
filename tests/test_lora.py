"""LoRA through peft: the reference is the policy with its adapters disabled (no second copy)."""
import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from engine import config as C
from engine.build import load_models
from engine.model.logprobs import PolicyLogprobs
from engine.model.lora import AdapterDisabled, adapter_disabled, add_lora
from engine.train import train
from tests._models import FAMILIES, tiny_model
from tests.test_train import REPO, _metrics, small_cfg

pytest.importorskip("peft")


def _inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (5, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left padding on two rows
    labels = ids[:, 6:].clone()
    labels[1, 4:] = -100  # a row that ended early
    return ids, mask, labels


def _train_adapters(lm, steps=3):
    """Move the adapters away from their zero init (lora_B = 0) with a few real optimizer steps."""
    lp = PolicyLogprobs(lm, temperature=1.0)
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
    ids, mask, labels = _inputs(lm.config.vocab_size, seed=1)
    for _ in range(steps):
        opt.zero_grad()
        (-lp(ids, mask, labels).sum()).backward()
        opt.step()


@pytest.mark.parametrize("family, save", [(f, "") for f in FAMILIES] + [("llama", "lm_head,embed_tokens")])
def test_disabled_adapter_reproduces_the_base_logprobs_exactly(family, save):
    base = tiny_model(family)
    ids, mask, labels = _inputs(base.config.vocab_size)
    with torch.no_grad():
        expected = PolicyLogprobs(base, temperature=0.7)(ids, mask, labels)
    policy = add_lora(copy.deepcopy(base), C.ModelConfig(lora_rank=4, lora_alpha=8.0, lora_modules_to_save=save))
    _train_adapters(policy)
    policy_lp = PolicyLogprobs(policy, temperature=0.7)
    reference_lp = AdapterDisabled(policy_lp, policy)
    with torch.no_grad():
        trained = policy_lp(ids, mask, labels)
        disabled = reference_lp(ids, mask, labels)
        again = policy_lp(ids, mask, labels)
    assert torch.equal(disabled, expected)  # bitwise: the base weights, adapters skipped
    assert (trained - expected).abs().max() > 1e-3  # the adapters did change the policy
    assert torch.equal(again, trained)  # and are back on afterwards
    assert list(reference_lp.parameters()) == []  # no weights of its own
    # only the adapters train; they are trainable again after the disabled pass
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable) == bool(save)


def test_adapters_are_re_enabled_after_an_exception():
    policy = add_lora(tiny_model("llama"), C.ModelConfig(lora_rank=2))
    with pytest.raises(RuntimeError), adapter_disabled(policy):
        raise RuntimeError("boom")
    assert all(not m.disable_adapters for m in policy.modules() if hasattr(m, "disable_adapters")
               and isinstance(m.disable_adapters, bool))
    with pytest.raises(ValueError, match="no LoRA layer"), adapter_disabled(tiny_model("llama")):
        pass


def test_load_models_holds_one_copy_of_the_weights(tmp_path):
    cfg = small_cfg(tmp_path, model=C.ModelConfig(lora_rank=4))
    policy, reference, _ = load_models(cfg, torch.device("cpu"))
    assert reference is None
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in policy.parameters())


@pytest.mark.parametrize("pairs, match", [
    ([("model.lora_rank", "4"), ("model.reference", "some/model")], "adapter disabled"),
    ([("model.lora_rank", "4"), ("model.train_top_layers", "1")], "cannot be combined"),
    ([("model.lora_rank", "-1")], "lora_rank"),
    ([("model.lora_rank", "4"), ("model.lora_alpha", "0")], "lora_alpha"),
])
def test_lora_config_errors_name_the_key(pairs, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.default(), pairs)


def test_lora_training_run_starts_at_zero_kl_and_exports_the_adapter(tmp_path):
    """In the loop: iteration 0's policy is the base model exactly (lora_B = 0), so log pi_t = log pi_ref
    and the KL is exactly 0; training moves it; the exported adapter loads with peft and reproduces
    the trained policy's log-probabilities."""
    from peft import PeftModel

    cfg = dataclasses.replace(C.PRESETS["counting_lora"](), run_dir=str(tmp_path / "run"),
                              optim=C.OptimConfig(iterations=3, lr=3e-3),
                              train=C.IterationConfig(prompts_per_iteration=8, micro_batch_prompts=4),
                              logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                              checkpoint=C.CheckpointConfig(every=0, export_hf=True))
    train(cfg)
    rows = _metrics(tmp_path / "run")
    assert rows[0]["kl/mean"] == 0.0 and rows[-1]["kl/mean"] != 0.0
    assert all(math.isfinite(r["loss/last"]) for r in rows)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8
    base, _, tok = load_models(dataclasses.replace(cfg, model=C.ModelConfig()), torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, str(final)).eval()
    ids, mask, labels = _inputs(len(tok))
    with torch.no_grad():
        via_peft = PolicyLogprobs(loaded.get_base_model(), temperature=1.0)(ids, mask, labels)
        with loaded.disable_adapter():
            via_base = PolicyLogprobs(loaded.get_base_model(), temperature=1.0)(ids, mask, labels)
    assert (via_peft - via_base).abs().max() > 1e-4  # the adapter holds the training
    # resuming is not needed: a fresh load of the same adapter gives the same numbers
    again = PeftModel.from_pretrained(load_models(dataclasses.replace(cfg, model=C.ModelConfig()),
                                                  torch.device("cpu"))[0], str(final)).eval()
    with torch.no_grad():
        assert torch.equal(PolicyLogprobs(again.get_base_model(), temperature=1.0)(ids, mask, labels), via_peft)


def test_lora_under_torchrun_two_processes(tmp_path):
    """FSDP2 with frozen base weights and trainable adapters; the reference pass disables adapters on
    the sharded module."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "engine/train.py", "--preset",
           "counting_lora", "--run_dir", str(tmp_path / "ddp"), "--optim.iterations", "2",
           "--train.prompts_per_iteration", "8", "--logging.progress", "false", "--logging.tensorboard", "false",
           "--checkpoint.every", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = _metrics(tmp_path / "ddp")
    assert len(rows) == 2 and rows[0]["kl/mean"] == 0.0 and math.isfinite(rows[1]["loss/last"])
    assert (tmp_path / "ddp" / "final" / "adapter_model.safetensors").exists()
