"""engine/model/liger.py: the choice of Liger-Kernel's patch and its arguments, against a fake liger_kernel
(neither liger-kernel nor a GPU is needed); one CUDA test runs the real library where it is installed."""
import inspect
import sys
import types

import pytest
import torch
from torch import nn

from engine.model import liger


def _model(model_type: str) -> nn.Module:
    m = nn.Linear(4, 4)
    m.config = types.SimpleNamespace(model_type=model_type)
    return m


@pytest.fixture
def fake_liger(monkeypatch):
    """A fake liger_kernel.transformers(.monkey_patch) whose patch functions record their arguments."""
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, swiglu=True, model=None):
        calls.append(("llama", dict(locals())))

    def apply_liger_kernel_to_gemma(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, geglu=True, model=None):
        calls.append(("gemma", dict(locals())))

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama, "gemma": apply_liger_kernel_to_gemma}
    for name, module in [("liger_kernel", types.ModuleType("liger_kernel")),
                         ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                         ("liger_kernel.transformers.monkey_patch", patch)]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def calls(fake_liger, monkeypatch):
    """The fake liger_kernel, with the model counting as being on CUDA."""
    monkeypatch.setattr(liger, "_on_cuda", lambda model: True)
    return fake_liger


def test_family_patch_called_with_the_model_and_cross_entropy_off(calls):
    model = _model("llama")
    line = liger.apply(model)
    [(family, kwargs)] = calls
    assert family == "llama" and kwargs["model"] is model
    assert kwargs["cross_entropy"] is False and kwargs["fused_linear_cross_entropy"] is False
    assert kwargs["rope"] and kwargs["rms_norm"] and kwargs["swiglu"]
    assert "apply_liger_kernel_to_llama(rope, rms_norm, swiglu)" in line and "\n" not in line


def test_geglu_family_gets_geglu(calls):
    liger.apply(_model("gemma"))
    [(family, kwargs)] = calls
    assert family == "gemma" and kwargs["geglu"] and not kwargs["fused_linear_cross_entropy"]


def test_unsupported_family_names_it_and_the_supported_ones(calls):
    with pytest.raises(ValueError, match=r"model\.liger_kernels.*'gpt_neox'.*supported: gemma, llama"):
        liger.apply(_model("gpt_neox"))
    assert calls == []


def test_not_importable_gives_the_pip_hint(monkeypatch):
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError
    with pytest.raises(ValueError, match=r"model\.liger_kernels.*pip install liger-kernel"):
        liger.apply(_model("llama"))


def test_cpu_model_refused(fake_liger):
    model = _model("llama")
    assert not liger._on_cuda(model)
    with pytest.raises(ValueError, match=r"model\.liger_kernels.*CUDA"):
        liger.apply(model)
    assert fake_liger == []


def test_llama_attention_looks_rope_up_at_call_time():
    """The premise of patching after instantiation: Liger swaps modeling_llama.apply_rotary_pos_emb, which
    reaches existing attention modules only if their forward reads the module global when it runs."""
    from transformers.models.llama import modeling_llama

    forward = inspect.unwrap(modeling_llama.LlamaAttention.forward)
    assert "apply_rotary_pos_emb" in forward.__code__.co_names


@pytest.mark.cuda
def test_real_liger_matches_the_plain_body(monkeypatch):
    pytest.importorskip("liger_kernel.transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # restored after the test
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
        line = liger.apply(model)
        got = model(ids).logits
    assert "llama" in line
    # the layers really run Liger's code now (equal logits alone would also pass with nothing patched)
    layer = model.model.layers[0]
    patched = {"input_layernorm": layer.input_layernorm.forward, "mlp": layer.mlp.forward,
               "final norm": model.model.norm.forward, "rope": modeling_llama.apply_rotary_pos_emb}
    for name, fn in patched.items():
        where = getattr(getattr(fn, "__func__", fn), "__module__", "")
        assert where.startswith("liger_kernel"), f"{name} is not Liger's: {where}"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
