"""Both backends against the float64 reference: values and gradients, awkward shapes, low precision,
poisoned outputs and determinism (docs/design.md sections 4, 6 and 8).

Inputs come from the `seed` fixture: a fixed seed per test (the same on every run); REBEL_TEST_FUZZ=1
draws fresh ones, REBEL_TEST_SEED=<seed> replays the seed a failure reports.
Sizes stay tiny because the Triton kernels run in the interpreter on CPU.
"""
import dataclasses
import importlib.util

import pytest
import torch
from _inputs import EPS, assert_rel, make_batch, make_labels, rel_err, torch_lowp_token_logprobs, value_and_grads

from rebel_kernels import fused_rebel_loss, fused_token_logprobs
from rebel_kernels._alloc import poisoned
from rebel_kernels.reference import (
    reference_rebel_loss,
    reference_rebel_loss_from_logprobs,
    reference_token_logprobs,
)

TOL = 1e-4  # float32 inputs vs the float64 reference, relative (norm) error

# The Triton backward designs under test (rebel_kernels/logprobs/triton_kernels.py): the default
# gemm backward as configured (one chunk at these sizes), the same with the smallest chunks in
# each orientation and in both at once (many chunks: the float32 accumulation across chunks of
# d hidden and of d weight), and the atomic backward.
TRITON_BACKWARDS = {
    "triton": {},
    "triton-token-chunks": dict(CHUNKS="tokens", DZ_BUDGET_BYTES=1),
    "triton-vocab-chunks": dict(CHUNKS="vocab", DZ_BUDGET_BYTES=1),
    "triton-blocks-and-chunks": dict(CHUNKS="auto", DZ_BUDGET_BYTES=1),
    "triton-atomic": dict(REBEL_KERNELS_BWD="atomic"),
}
# The chunked torch path as configured (one tile at these sizes), and with tiny chunks: many token
# blocks and vocab tiles (its online log-sum-exp, the in-place tiles, the softcap's half-width tiles).
TORCH_PATHS = {
    "torch": {},
    "torch-chunks": dict(TOKEN_CHUNK=4, VOCAB_CHUNK=32),
}


@pytest.fixture(params=[*TORCH_PATHS, *TRITON_BACKWARDS])
def backend(request, monkeypatch):
    """Overrides tests/conftest.py's: the backend (REBEL_KERNELS_BACKEND), its chunks on the torch path
    and on Triton each backward design. Returns "torch" or "triton"."""
    name = request.param
    if name in TORCH_PATHS:
        from rebel_kernels.logprobs import torch_impl

        monkeypatch.setenv("REBEL_KERNELS_BACKEND", "torch")
        for key, value in TORCH_PATHS[name].items():
            monkeypatch.setattr(torch_impl, key, value)
        return "torch"
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable")
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    from rebel_kernels.logprobs import triton_kernels

    for key, value in TRITON_BACKWARDS[name].items():
        if key == "REBEL_KERNELS_BWD":
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.setattr(triton_kernels, key, value)
    return "triton"


@dataclasses.dataclass(frozen=True)
class Case:
    pairs: int
    T: int
    H: int
    V: int
    bias: bool = True
    temperature: float = 1.0
    old: str = "token"  # "token": [2B, T] (garbage where ignored), "seq": [2B]
    reduction: str = "mean"
    eta: float = 1.0
    ignore_index: int = -100
    masked_rows: tuple = ()
    logit_scale: float = 1.0  # the LM head's final transforms (the op's arguments)
    softcap: float | None = None
    spread: float = 2.0  # standard deviation of the raw head output h W^T


# Together these cover: one pair, T = 1, V = 1, V prime and above a tile (67, 131) with H = 17 / 40 / 48,
# fully masked rows (one member of a pair, and a whole pair), temperatures 0.7 / 1.0 / 1.3, bias or
# not, both old_logprobs forms, all three reductions, several eta, and ignore_index -100 / -1.
CASES = {
    "one_pair_T1_V1": Case(1, 1, 8, 1, bias=True, old="token", reduction="mean"),
    "V67_H40_t0.7_none": Case(2, 5, 40, 67, bias=False, temperature=0.7, reduction="none", masked_rows=(1,)),
    "V131_H17_t1.3_seq_sum": Case(3, 7, 17, 131, temperature=1.3, old="seq", reduction="sum", eta=0.5,
                                  ignore_index=-1, masked_rows=(2,)),
    "V131_H40_masked_pair": Case(2, 4, 40, 131, reduction="none", eta=2.0, ignore_index=-1, masked_rows=(0, 2)),
    "V67_H17_T1_seq": Case(3, 1, 17, 67, bias=False, temperature=1.3, old="seq", reduction="mean", masked_rows=(4,)),
    "one_pair_V131_H48": Case(1, 6, 48, 131, temperature=0.7, reduction="sum", eta=3.0),
    "V1_none_seq": Case(2, 3, 17, 1, bias=False, old="seq", reduction="none", ignore_index=-1),
    "V67_H40_seq_none_eta": Case(2, 7, 40, 67, temperature=0.7, old="seq", reduction="none", eta=0.25,
                                 masked_rows=(3,)),
    # The LM head's final transforms, with inputs scaled so that they matter (raw logits ~0.1-2 would
    # pass through a softcap of 30 unchanged): raw logits of spread 40 against softcap 30 (Gemma-2/3),
    # where tanh is far from linear; logit_scale 0.0625 (Granite's 1 / logits_scaling = 16) on raw
    # logits of spread 32; logit_scale 8 alone and with softcap 30 (u = 8 pre ~ 30). All reductions.
    "V131_H40_softcap30_none": Case(2, 5, 40, 131, temperature=0.7, reduction="none", masked_rows=(1,),
                                    softcap=30.0, spread=40.0),
    "V67_H17_scale1_16_seq_sum": Case(3, 4, 17, 67, temperature=1.3, old="seq", reduction="sum", eta=0.5,
                                      ignore_index=-1, logit_scale=0.0625, spread=32.0),
    "V131_H48_scale8_mean": Case(2, 6, 48, 131, bias=False, reduction="mean", masked_rows=(2,),
                                 logit_scale=8.0, spread=1.0),
    "V97_H33_scale8_softcap30_mean": Case(2, 5, 33, 97, temperature=1.3, reduction="mean", eta=2.0,
                                          logit_scale=8.0, softcap=30.0, spread=4.0),
}
TRANSFORM_CASES = [name for name, case in CASES.items() if case.logit_scale != 1.0 or case.softcap is not None]


def batch_for(case: Case, seed: int, device, dtype=torch.float32):
    return make_batch(seed, pairs=case.pairs, T=case.T, H=case.H, V=case.V, dtype=dtype, bias=case.bias,
                      old=case.old, ignore_index=case.ignore_index, masked_rows=case.masked_rows,
                      temperature=case.temperature, eta=case.eta, logit_scale=case.spread,
                      head=dict(logit_scale=case.logit_scale, softcap=case.softcap), device=device)


def loss_kwargs(case: Case, batch):
    return dict(eta=case.eta, bias=batch.bias, temperature=case.temperature, ignore_index=case.ignore_index,
                reduction=case.reduction, logit_scale=case.logit_scale, softcap=case.softcap)


def assert_transform_matters(b, grads, case: Case, b64, w, tag: str, seed: int):
    """Without the transforms, every gradient of the loss and the per-token log-probabilities (the
    op's own, with them) differ by far more than the tolerance: a kernel that ignored logit_scale /
    softcap could not pass. (Not the loss value: one scalar per pair may land near the other by chance.)"""
    plain = dict(loss_kwargs(case, b64), logit_scale=1.0, softcap=None)
    _, ref_grads = value_and_grads(reference_rebel_loss(*b64.loss_args(), **plain), b64.leaves(),
                                   None if w is None else w.double())
    kw = dict(bias=b.bias, temperature=case.temperature, ignore_index=case.ignore_index)
    with torch.no_grad():
        logp = fused_token_logprobs(b.hidden, b.weight, b.labels, logit_scale=case.logit_scale,
                                    softcap=case.softcap, **kw)
    ref_logp = reference_token_logprobs(b64.hidden.detach(), b64.weight.detach(), b.labels,
                                        **dict(kw, bias=None if b64.bias is None else b64.bias.detach()))
    for name, x, rx in zip(("logp", "d hidden", "d weight", "d bias"), [logp, *grads], [ref_logp, *ref_grads]):
        err = rel_err(x, rx, 1e-3)
        assert err > 100 * TOL, f"{tag} {name}: only {err:.1e} from the untransformed op (seed={seed})"


def grad_weights(case: Case, seed: int, device, dtype=torch.float32):
    """Random weighting of the per-pair losses for reduction='none' (None for scalar outputs)."""
    if case.reduction != "none":
        return None
    gen = torch.Generator().manual_seed(seed ^ 0x5EED)
    return torch.randn(case.pairs, generator=gen, dtype=dtype).to(device)


def check_loss_against_reference(case: Case, seed: int, device, tag: str):
    b = batch_for(case, seed, device)
    w = grad_weights(case, seed, device)
    out, grads = value_and_grads(fused_rebel_loss(*b.loss_args(), **loss_kwargs(case, b)), b.leaves(), w)
    b64 = b.to64()
    ref, ref_grads = value_and_grads(
        reference_rebel_loss(*b64.loss_args(), **loss_kwargs(case, b64)), b64.leaves(),
        None if w is None else w.double(),
    )
    want_shape = (case.pairs,) if case.reduction == "none" else ()
    assert out.dtype == torch.float32, f"{tag}: loss dtype {out.dtype}"
    assert out.shape == want_shape, f"{tag}: loss shape {tuple(out.shape)} != {want_shape}"
    assert_rel(out, ref, TOL, f"{tag} loss", seed)
    for name, g, rg, leaf in zip(("d hidden", "d weight", "d bias"), grads, ref_grads, b.leaves()):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{tag} {name}: {g.dtype} {tuple(g.shape)}"
        assert_rel(g, rg, TOL, f"{tag} {name}", seed)
    # Ignored positions get exactly zero gradient.
    ignored = b.labels == case.ignore_index
    assert torch.all(grads[0][ignored] == 0), f"{tag}: nonzero d hidden at ignored positions (seed={seed})"
    if case.logit_scale != 1.0 or case.softcap is not None:
        assert_transform_matters(b, grads, case, b64, w, tag, seed)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_reference(name, backend, seed, device):
    check_loss_against_reference(CASES[name], seed, device, f"{backend}/{name}")


def random_case(seed: int) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    pairs, T = pick([1, 2, 3]), pick([1, 2, 3, 4, 5, 6, 7])
    rows = 2 * pairs
    masked = tuple(r for r in range(rows) if float(torch.rand((), generator=gen)) < 0.15)
    # V = 2 is left out: its two gradient columns are exact negatives, sums over tokens cancel by chance
    # and the float32 relative error of such a cancelled sum has no useful bound (V = 1 stays: exact 0).
    return Case(pairs, T, pick([1, 5, 16, 17, 33, 40, 48]), pick([1, 3, 31, 32, 33, 64, 67, 97, 128, 131]),
                bias=pick([True, False]), temperature=pick([0.5, 0.7, 1.0, 1.3, 2.0]), old=pick(["token", "seq"]),
                reduction=pick(["mean", "sum", "none"]), eta=pick([0.1, 0.5, 1.0, 2.0, 10.0]),
                ignore_index=pick([-100, -1]), masked_rows=masked)


@pytest.mark.parametrize("draw", range(8))
def test_loss_matches_reference_random_shapes(draw, backend, seed, device):
    case = random_case(seed + draw)
    check_loss_against_reference(case, seed + draw, device, f"{backend}/random {case}")


@pytest.mark.parametrize("case_name", ["V67_H40_t0.7_none", "V131_H40_softcap30_none"])
@pytest.mark.parametrize("grad_of", ["hidden", "weight"])
def test_loss_partial_requires_grad(grad_of, case_name, backend, seed, device):
    """Only one of hidden / weight requires grad (a frozen head, or a frozen trunk)."""
    case = CASES[case_name]
    b = batch_for(case, seed, device)
    b.hidden.requires_grad_(grad_of == "hidden")
    b.weight.requires_grad_(grad_of == "weight")
    leaf = b.hidden if grad_of == "hidden" else b.weight
    w = grad_weights(case, seed, device)
    _, (g,) = value_and_grads(fused_rebel_loss(*b.loss_args(), **loss_kwargs(case, b)), [leaf], w)
    b64 = b.to64()
    leaf64 = b64.hidden if grad_of == "hidden" else b64.weight
    _, (rg,) = value_and_grads(reference_rebel_loss(*b64.loss_args(), **loss_kwargs(case, b64)), [leaf64], w.double())
    assert_rel(g, rg, TOL, f"{backend} d {grad_of} alone", seed)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a doubled last dim)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


@pytest.mark.parametrize("old", ["token", "seq"])
def test_non_contiguous_inputs(old, backend, seed, device):
    """hidden[:, :-1] of a model output, a transposed-storage weight, and strided views of bias,
    labels, old_logprobs and rewards (e.g. slices of bigger buffers)."""
    case = dataclasses.replace(CASES["V131_H40_masked_pair"], old=old)
    b = batch_for(case, seed, device)
    gen = torch.Generator().manual_seed(seed)
    full = torch.cat([b.hidden.detach(), torch.randn(b.hidden.shape[0], 1, case.H, generator=gen).to(device)], 1)
    full.requires_grad_(True)
    hidden = full[:, :-1]  # non-contiguous view, grads flow to `full`
    weight_t = b.weight.detach().t().contiguous().requires_grad_(True)  # [H, V] storage
    weight = weight_t.t()  # [V, H] view with strides (1, V)
    bias_2 = torch.stack([b.bias.detach(), torch.zeros_like(b.bias)], -1).requires_grad_(True)
    bias = bias_2[:, 0]  # [V] view with stride 2
    labels, old_lp, rewards = strided(b.labels), strided(b.old_logprobs), strided(b.rewards)
    for t in (hidden, weight, bias, labels, old_lp, rewards):
        assert not t.is_contiguous()
    kw = dict(loss_kwargs(case, b), bias=bias)
    w = grad_weights(case, seed, device)
    out, (g_full, g_wt, g_b2) = value_and_grads(
        fused_rebel_loss(hidden, weight, labels, old_lp, rewards, **kw), [full, weight_t, bias_2], w)
    b64 = b.to64()
    ref, (r_h, r_w, r_b) = value_and_grads(reference_rebel_loss(*b64.loss_args(), **loss_kwargs(case, b64)),
                                           b64.leaves(), w.double())
    assert_rel(out, ref, TOL, f"{backend} non-contiguous loss", seed)
    assert_rel(g_full[:, :-1], r_h, TOL, f"{backend} non-contiguous d hidden", seed)
    assert torch.all(g_full[:, -1] == 0), f"{backend}: gradient leaked outside the view (seed={seed})"
    assert_rel(g_wt.t(), r_w, TOL, f"{backend} non-contiguous d weight", seed)
    assert_rel(g_b2[:, 0], r_b, TOL, f"{backend} non-contiguous d bias", seed)
    logp = fused_token_logprobs(hidden, weight, labels, bias=bias, temperature=case.temperature,
                                ignore_index=case.ignore_index)
    ref_logp = reference_token_logprobs(b64.hidden, b64.weight, b.labels, bias=b64.bias,
                                        temperature=case.temperature, ignore_index=case.ignore_index)
    assert_rel(logp, ref_logp, TOL, f"{backend} non-contiguous logp", seed)


def test_auto_backend_matches_reference(monkeypatch, seed, device):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "auto")
    check_loss_against_reference(CASES["V131_H17_t1.3_seq_sum"], seed, device, "auto")


# ---- fused_token_logprobs ---------------------------------------------------------------------

TOKEN_CASES = {
    # leading shape, H, V, bias, temperature, ignore_index[, head: spread of h W^T (default 2) and the
    # op's logit_scale / softcap, with the spread chosen so that the transforms matter]
    "lead_3x2x5_V131": ((3, 2, 5), 17, 131, True, 0.7, -100),
    "flat_7_V67": ((7,), 40, 67, False, 1.0, -1),
    "lead_2x1_V1": ((2, 1), 8, 1, True, 1.3, -100),
    "lead_4x3_V33": ((4, 3), 48, 33, True, 1.0, -100),
    "lead_2x3x4_V131_softcap30": ((2, 3, 4), 40, 131, True, 0.7, -100, dict(spread=40.0, softcap=30.0)),
    "flat_9_V67_scale1_16": ((9,), 17, 67, False, 1.3, -1, dict(spread=32.0, logit_scale=0.0625)),
    "lead_3x4_V97_scale8_softcap30": ((3, 4), 33, 97, True, 1.0, -100,
                                      dict(spread=4.0, logit_scale=8.0, softcap=30.0)),
}


@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_token_logprobs_match_reference(name, backend, seed, device):
    lead, H, V, has_bias, temperature, ignore_index, *rest = TOKEN_CASES[name]
    head = dict(rest[0]) if rest else {}
    spread = head.pop("spread", 2.0)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=gen).to(device).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * (spread / H**0.5)).to(device).requires_grad_(True)
    bias = (torch.randn(V, generator=gen) * 0.5).to(device).requires_grad_(True) if has_bias else None
    labels = make_labels(gen, lead[0], lead[-1], V, ignore_index=ignore_index) if len(lead) == 2 else None
    if labels is None:
        labels = torch.randint(0, V, lead, generator=gen)
        labels[torch.rand(lead, generator=gen) < 0.3] = ignore_index
    labels = labels.to(device)
    leaves = [hidden, weight] + ([bias] if has_bias else [])
    w = torch.randn(lead, generator=gen).to(device)  # random upstream gradient

    logp, ent = fused_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=True, **head)
    tag = f"{backend}/{name}"
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32, tag
    assert logp.shape == labels.shape and ent.shape == labels.shape, tag
    _, grads = value_and_grads(logp, leaves, w)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_logp, ref_ent = reference_token_logprobs(
        leaves64[0], leaves64[1], labels, bias=leaves64[2] if has_bias else None, temperature=temperature,
        ignore_index=ignore_index, return_entropy=True, **head,
    )
    _, ref_grads = value_and_grads(ref_logp, leaves64, w.double())
    if head:  # the transforms matter at these inputs: values, entropy and every gradient move
        plain_logp, plain_ent = reference_token_logprobs(
            leaves64[0], leaves64[1], labels, bias=leaves64[2] if has_bias else None, temperature=temperature,
            ignore_index=ignore_index, return_entropy=True,
        )
        _, plain_grads = value_and_grads(plain_logp, leaves64, w.double())
        for what, x, px in zip(("logp", "entropy", "d hidden", "d weight", "d bias"),
                               [logp, ent, *grads], [plain_logp, plain_ent, *plain_grads]):
            assert rel_err(x, px, 1e-3) > 100 * TOL, f"{backend}/{name} {what}: the transforms changed nothing"
    assert_rel(logp, ref_logp, TOL, f"{tag} logp", seed)
    assert_rel(ent, ref_ent, TOL, f"{tag} entropy", seed)
    for gname, g, rg in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert_rel(g, rg, TOL, f"{tag} {gname}", seed)
    ignored = labels == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0), f"{tag}: nonzero at ignored (seed={seed})"

    plain = fused_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                                 **head)
    assert isinstance(plain, torch.Tensor), f"{tag}: return_entropy=False must return a tensor"
    assert torch.equal(plain.detach(), logp.detach()), f"{tag}: logp differs with/without entropy (seed={seed})"


# ---- low precision: at most 2x the error of plain PyTorch in the same dtype -------------------

def check_low_precision(ours, plain, ref, eps, what, seed):
    """Our error must be <= 2x plain PyTorch's, or <= eps of the dtype (a floor).

    The floor: our gradients come back in the input dtype, so even an exact kernel is off by the
    final rounding, up to eps/2 per element relative (bf16: 2^-8, fp16: 2^-11); a floor of one eps
    (2x that rounding) keeps a lucky near-exact PyTorch error on a tiny tensor from failing a
    correct kernel, while any real loss of precision (bf16 logits or accumulation) is far above it.
    """
    e_ours, e_plain = rel_err(ours, ref, 1e-3), rel_err(plain, ref, 1e-3)
    bound = max(2.0 * e_plain, eps)
    assert e_ours <= bound, f"{what}: error {e_ours:.3e} > max(2 x torch {e_plain:.3e}, eps {eps:.1e}) (seed={seed})"


# The soft-capped head in bf16 only (Gemma-2/3's dtype): with logits this large, fp16 overflows in
# plain PyTorch's gradients and in ours alike (|d hidden| ~ 1e5 > 65504).
LOWP_HEADS = {"plain": {}, "scale0.5_softcap30": dict(logit_scale=0.5, softcap=30.0, spread=60.0)}
LOWP_RUNS = [(torch.bfloat16, "plain"), (torch.float16, "plain"), (torch.bfloat16, "scale0.5_softcap30")]


@pytest.mark.parametrize("dtype,head", LOWP_RUNS, ids=["bf16", "fp16", "bf16-scale0.5_softcap30"])
@pytest.mark.parametrize("old", ["token", "seq"])
def test_low_precision_vs_plain_torch(dtype, old, head, backend, seed, device):
    case = Case(3, 7, 48, 131, temperature=0.7, old=old, reduction="none", eta=0.5, masked_rows=(5,),
                **LOWP_HEADS[head])
    b = batch_for(case, seed, device, dtype=dtype)
    w = grad_weights(case, seed, device, dtype=torch.float32)
    kw = dict(eta=case.eta, ignore_index=case.ignore_index, reduction="none", logit_scale=case.logit_scale,
              softcap=case.softcap)
    head_kw = dict(logit_scale=case.logit_scale, softcap=case.softcap)

    ours, ours_grads = value_and_grads(
        fused_rebel_loss(*b.loss_args(), bias=b.bias, temperature=case.temperature, **kw), b.leaves(), w)
    assert ours.dtype == torch.float32, f"loss dtype {ours.dtype}"
    # Plain PyTorch, everything in `dtype`: logits, log_softmax, the sums and the loss, and autograd.
    plain_logp = torch_lowp_token_logprobs(b, case.temperature, **head_kw)
    assert plain_logp.dtype == dtype
    plain = reference_rebel_loss_from_logprobs(plain_logp, b.labels, b.old_logprobs, b.rewards,
                                               eta=case.eta, ignore_index=case.ignore_index, reduction="none")
    plain, plain_grads = value_and_grads(plain, b.leaves(), w.to(dtype))
    b64 = b.to64()
    ref, ref_grads = value_and_grads(
        reference_rebel_loss(*b64.loss_args(), bias=b64.bias, temperature=case.temperature, **kw), b64.leaves(),
        w.double())

    eps = EPS[dtype]
    tag = f"{backend}/{dtype}/{old}"
    check_low_precision(ours, plain, ref, eps, f"{tag} loss", seed)
    names = ("d hidden", "d weight", "d bias")
    for name, g, pg, rg, leaf in zip(names, ours_grads, plain_grads, ref_grads, b.leaves()):
        assert g.dtype == dtype == leaf.dtype, f"{tag} {name} dtype {g.dtype}"
        check_low_precision(g, pg, rg, eps, f"{tag} {name}", seed)

    # fused_token_logprobs in the same dtype: float32 output, against plain PyTorch's log-probs.
    logp = fused_token_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, temperature=case.temperature, **head_kw)
    assert logp.dtype == torch.float32
    ref_logp = reference_token_logprobs(b64.hidden, b64.weight, b.labels, bias=b64.bias, temperature=case.temperature,
                                        **head_kw)
    check_low_precision(logp.detach(), plain_logp.detach(), ref_logp.detach(), eps, f"{tag} logp", seed)


# ---- poisoned allocations, determinism, exact zero ratio --------------------------------------

@pytest.mark.parametrize("old", ["token", "seq"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_poisoned_outputs_are_all_written(old, reduction, backend, seed, device):
    """With every op-allocated buffer starting as NaN, outputs and gradients must still be finite."""
    case = Case(3, 6, 40, 131, temperature=0.7, old=old, reduction=reduction, masked_rows=(0, 4))
    b = batch_for(case, seed, device)
    w = grad_weights(case, seed, device)
    with poisoned():
        loss, grads = value_and_grads(fused_rebel_loss(*b.loss_args(), **loss_kwargs(case, b)), b.leaves(), w)
        logp, ent = fused_token_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, temperature=0.7,
                                         return_entropy=True)
        _, tok_grads = value_and_grads(logp, b.leaves(), torch.ones_like(logp))
    msg = f"{backend} (seed={seed})"
    assert torch.isfinite(loss).all(), msg
    assert all(torch.isfinite(g).all() for g in grads + tok_grads), msg
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all(), msg
    ignored = b.labels == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0), msg
    assert torch.all(grads[0][ignored] == 0) and torch.all(tok_grads[0][ignored] == 0), msg


def test_forward_is_bitwise_deterministic(backend, seed, device):
    case = Case(3, 7, 40, 131, temperature=1.3, reduction="none", masked_rows=(2,))
    b = batch_for(case, seed, device)
    with torch.no_grad():
        runs = [
            (fused_rebel_loss(*b.loss_args(), **loss_kwargs(case, b)),
             fused_rebel_loss(*b.loss_args(), **dict(loss_kwargs(case, b), reduction="mean")),
             *fused_token_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, temperature=1.3, return_entropy=True))
            for _ in range(2)
        ]
    for i, (x, y) in enumerate(zip(*runs)):
        assert torch.equal(x, y), f"{backend}: output {i} differs between two identical calls (seed={seed})"


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_zero_ratio_when_old_equals_current(eta, backend, seed, device):
    """old_logprobs = fused_token_logprobs(same inputs): the ratios are exactly 0, so each pair's
    loss is exactly (r_i - r_{B+i})^2 in float32."""
    case = Case(3, 7, 40, 131, temperature=0.7, reduction="none", eta=eta, masked_rows=(1,))
    b = batch_for(case, seed, device)
    old = fused_token_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, temperature=0.7).detach()
    loss = fused_rebel_loss(b.hidden, b.weight, b.labels, old, b.rewards, **loss_kwargs(case, b))
    r = b.rewards.float()
    want = (r[: case.pairs] - r[case.pairs:]) ** 2
    assert torch.equal(loss.detach(), want), f"{backend}: {loss.tolist()} != {want.tolist()} (seed={seed})"
    mean = fused_rebel_loss(b.hidden, b.weight, b.labels, old, b.rewards,
                            **dict(loss_kwargs(case, b), reduction="mean"))
    torch.testing.assert_close(mean.detach(), want.mean(), rtol=1e-6, atol=0, msg=f"seed={seed}")
    # The gradient is then 2 (ratio/eta - rdiff) d ratio/eta = -2 rdiff d ratio / eta: still the reference's.
    _, grads = value_and_grads(loss, b.leaves(), torch.ones_like(loss))
    b64 = b.to64()
    ref = reference_rebel_loss(b64.hidden, b64.weight, b.labels, old.double(), b64.rewards, **loss_kwargs(case, b64))
    _, ref_grads = value_and_grads(ref, b64.leaves(), torch.ones_like(ref))
    for name, g, rg in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert_rel(g, rg, TOL, f"{backend} zero-ratio {name}", seed)


@pytest.mark.parametrize("head", [{}, dict(logit_scale=0.5, softcap=1.5), dict(logit_scale=3.0)],
                         ids=["plain", "scale0.5_softcap1.5", "scale3"])
@pytest.mark.parametrize("old_form", ["token", "seq"])
def test_gradcheck_float64(old_form, head, seed, monkeypatch):
    """Finite differences agree with the analytic backward (float64 runs on the chunked torch path),
    also through the logit scale and the softcap (raw logits ~N(0, 5) against a cap of 1.5: tanh saturates)."""
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "torch")
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(7, 5, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, generator=gen).requires_grad_()
    y = make_labels(gen, 4, 3, 7)
    old = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    old = old if old_form == "token" else old.sum(-1)
    r = torch.randn(4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_rebel_loss(h, w, y, old, r, bias=b, temperature=0.7, eta=0.5, reduction="none",
                                         **head), (h, w, b)
    )
    assert torch.autograd.gradcheck(lambda h, w, b: fused_token_logprobs(h, w, y, bias=b, temperature=1.3, **head),
                                    (h, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_from_logprobs_equals_fused_loss(backend, reduction, seed, device, monkeypatch):
    """fused_token_logprobs + rebel_loss_from_logprobs is fused_rebel_loss, values and gradients."""
    from rebel_kernels import rebel_loss_from_logprobs

    monkeypatch.setenv("REBEL_KERNELS_BACKEND", backend)
    b = make_batch(seed, pairs=2, T=5, H=16, V=67, device=device)
    kw = dict(bias=b.bias, temperature=0.8)
    fused, g_fused = value_and_grads(
        fused_rebel_loss(*b.loss_args(), eta=0.5, reduction=reduction, **kw).sum(), b.leaves())
    logp = fused_token_logprobs(b.hidden, b.weight, b.labels, **kw)
    split, g_split = value_and_grads(
        rebel_loss_from_logprobs(logp, b.labels, b.old_logprobs, b.rewards, eta=0.5, reduction=reduction).sum(),
        b.leaves())
    assert torch.equal(fused, split)
    for a, c in zip(g_fused, g_split):
        assert torch.equal(a, c)
