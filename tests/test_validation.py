"""Bad input raises ValueError / TypeError naming the argument, before any kernel runs (docs/design.md section 4)."""
import pytest
import torch
from _inputs import make_batch

from rebel_kernels import fused_rebel_loss, fused_token_logprobs
from rebel_kernels.reference import reference_rebel_loss

PAIRS, T, H, V = 2, 5, 8, 11  # 2B != T, so a transposed tensor has a wrong shape
NAN, INF = float("nan"), float("inf")
LOSS_POSITIONAL = ("hidden", "weight", "labels", "old_logprobs", "rewards")


def valid_args(old="token", device="cpu"):
    """A valid call of fused_rebel_loss as a dict of keyword arguments (positional ones included)."""
    b = make_batch(1234, pairs=PAIRS, T=T, H=H, V=V, old=old, device=device)
    return dict(hidden=b.hidden, weight=b.weight, labels=b.labels, old_logprobs=b.old_logprobs,
                rewards=b.rewards, bias=b.bias)


def to_device(args, device):
    """Every tensor argument moved to `device` (a no-op on CPU), so only the mutation is wrong."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def call_loss(args):
    kwargs = {k: v for k, v in args.items() if k not in LOSS_POSITIONAL}
    return fused_rebel_loss(*(args[k] for k in LOSS_POSITIONAL), **kwargs)


def call_logprobs(args):
    kwargs = {k: v for k, v in args.items() if k not in LOSS_POSITIONAL}
    return fused_token_logprobs(args["hidden"], args["weight"], args["labels"], **kwargs)


def first_valid(labels, ignore_index=-100):
    """(row, t) of the first response token."""
    r, t = (labels != ignore_index).nonzero()[0].tolist()
    return r, t


def with_label(value, ignore_index=-100):
    def f(a):
        labels = a["labels"].clone()
        labels[first_valid(labels, ignore_index)] = value
        return dict(a, labels=labels)

    return f


def set_(**changes):
    """A mutation replacing arguments; callables receive the current args."""

    def f(a):
        return dict(a, **{k: (v(a) if callable(v) else v) for k, v in changes.items()})

    return f


def old_at_valid(value):
    def f(a):
        old = a["old_logprobs"].clone()
        old[first_valid(a["labels"])] = value
        return dict(a, old_logprobs=old)

    return f


def reward_at(value):
    def f(a):
        r = a["rewards"].clone()
        r[1] = value
        return dict(a, rewards=r)

    return f


def rows(n):
    """Keep n rows of every per-row argument (n = 0: empty batch, n odd: unpaired rows)."""
    return set_(hidden=lambda a: a["hidden"].detach()[:n], labels=lambda a: a["labels"][:n],
                old_logprobs=lambda a: a["old_logprobs"][:n], rewards=lambda a: a["rewards"][:n])


# Cases valid for both ops: (id, mutation, exception, argument name the message must contain).
COMMON_CASES = [
    ("hidden_int64", set_(hidden=lambda a: torch.ones(a["hidden"].shape, dtype=torch.int64)), TypeError, "hidden"),
    ("hidden_int32_weight_int32", set_(hidden=lambda a: torch.ones(a["hidden"].shape, dtype=torch.int32),
                                       weight=lambda a: torch.ones(a["weight"].shape, dtype=torch.int32)),
     TypeError, "hidden"),
    ("hidden_not_tensor", set_(hidden=lambda a: a["hidden"].tolist()), TypeError, "hidden"),
    ("weight_float64", set_(weight=lambda a: a["weight"].detach().double()), TypeError, "weight"),
    ("weight_bf16", set_(weight=lambda a: a["weight"].detach().bfloat16()), TypeError, "weight"),
    ("weight_H_mismatch", set_(weight=lambda a: torch.randn(V, H + 1)), ValueError, "weight"),
    ("weight_1d", set_(weight=lambda a: torch.randn(V * H)), ValueError, "weight"),
    ("weight_3d", set_(weight=lambda a: torch.randn(1, V, H)), ValueError, "weight"),
    ("labels_int32", set_(labels=lambda a: a["labels"].int()), TypeError, "labels"),
    ("labels_float", set_(labels=lambda a: a["labels"].float()), TypeError, "labels"),
    ("labels_longer_T", set_(labels=lambda a: torch.zeros(2 * PAIRS, T + 1, dtype=torch.int64)), ValueError, "labels"),
    ("labels_transposed", set_(labels=lambda a: torch.zeros(T, 2 * PAIRS, dtype=torch.int64)), ValueError, "labels"),
    ("labels_1d", set_(labels=lambda a: torch.zeros(2 * PAIRS * T, dtype=torch.int64)), ValueError, "labels"),
    ("label_eq_V", with_label(V), ValueError, "labels"),
    ("label_huge", with_label(10**9), ValueError, "labels"),
    ("label_minus_1", with_label(-1), ValueError, "labels"),
    ("label_minus_5", with_label(-5), ValueError, "labels"),
    ("label_minus_100_with_ignore_minus_1",
     lambda a: dict(with_label(-100, ignore_index=-1)(dict(a, labels=a["labels"].where(a["labels"] != -100, -1))),
                    ignore_index=-1),
     ValueError, "labels"),
    ("bias_longer", set_(bias=lambda a: torch.randn(V + 1)), ValueError, "bias"),
    ("bias_2d", set_(bias=lambda a: torch.randn(1, V)), ValueError, "bias"),
    ("bias_H", set_(bias=lambda a: torch.randn(H)), ValueError, "bias"),
    ("bias_float64", set_(bias=lambda a: torch.randn(V, dtype=torch.float64)), TypeError, "bias"),
    ("temperature_0", set_(temperature=0.0), ValueError, "temperature"),
    ("temperature_negative", set_(temperature=-0.7), ValueError, "temperature"),
    ("temperature_nan", set_(temperature=NAN), ValueError, "temperature"),
    ("temperature_inf", set_(temperature=INF), ValueError, "temperature"),
    ("temperature_minus_inf", set_(temperature=-INF), ValueError, "temperature"),
    ("logit_scale_0", set_(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0, got 0.0"),
    ("logit_scale_negative", set_(logit_scale=-0.5), ValueError, "logit_scale must be finite and > 0, got -0.5"),
    ("logit_scale_nan", set_(logit_scale=NAN), ValueError, "logit_scale must be finite and > 0, got nan"),
    ("logit_scale_inf", set_(logit_scale=INF), ValueError, "logit_scale must be finite and > 0, got inf"),
    ("logit_scale_none", set_(logit_scale=None), TypeError, "logit_scale must be a real number, got None"),
    ("logit_scale_str", set_(logit_scale="0.5"), TypeError, "logit_scale must be a real number, got '0.5'"),
    ("logit_scale_bool", set_(logit_scale=True), TypeError, "logit_scale must be a real number, got True"),
    ("logit_scale_tensor", set_(logit_scale=lambda a: torch.tensor(0.5)), TypeError, "logit_scale must be a real"),
    ("softcap_0", set_(softcap=0.0), ValueError, "softcap must be finite and > 0, got 0.0"),
    ("softcap_negative", set_(softcap=-30.0), ValueError, "softcap must be finite and > 0, got -30.0"),
    ("softcap_nan", set_(softcap=NAN), ValueError, "softcap must be finite and > 0, got nan"),
    ("softcap_inf", set_(softcap=INF), ValueError, "softcap must be finite and > 0, got inf"),
    ("softcap_str", set_(softcap="30"), TypeError, "softcap must be a real number or None"),
    ("softcap_bool", set_(softcap=False), TypeError, "softcap must be a real number or None"),
]

LOSS_CASES = [
    ("hidden_2d", set_(hidden=lambda a: a["hidden"].detach()[0], labels=lambda a: a["labels"][0]),
     ValueError, "hidden"),
    ("hidden_4d", set_(hidden=lambda a: a["hidden"].detach()[None], labels=lambda a: a["labels"][None]),
     ValueError, "hidden"),
    ("odd_rows_3", rows(3), ValueError, "hidden"),
    ("odd_rows_1", rows(1), ValueError, "hidden"),
    ("empty_rows", rows(0), ValueError, "hidden|labels"),
    ("empty_T", set_(hidden=lambda a: a["hidden"].detach()[:, :0], labels=lambda a: a["labels"][:, :0],
                     old_logprobs=lambda a: a["old_logprobs"][:, :0]), ValueError, "hidden|labels"),
    ("old_longer_T", set_(old_logprobs=lambda a: torch.zeros(2 * PAIRS, T + 1)), ValueError, "old_logprobs"),
    ("old_B", set_(old_logprobs=lambda a: torch.zeros(PAIRS)), ValueError, "old_logprobs"),
    ("old_3d", set_(old_logprobs=lambda a: torch.zeros(2 * PAIRS, T, 1)), ValueError, "old_logprobs"),
    ("old_scalar", set_(old_logprobs=lambda a: torch.zeros(())), ValueError, "old_logprobs"),
    ("old_transposed", set_(old_logprobs=lambda a: torch.zeros(T, 2 * PAIRS)), ValueError, "old_logprobs"),
    ("old_nan_at_valid", old_at_valid(NAN), ValueError, "old_logprobs"),
    ("old_inf_at_valid", old_at_valid(INF), ValueError, "old_logprobs"),
    ("old_minus_inf_at_valid", old_at_valid(-INF), ValueError, "old_logprobs"),
    ("old_per_seq_nan", set_(old_logprobs=lambda a: torch.tensor([-1.0, NAN, -2.0, -3.0])), ValueError, "old_logprobs"),
    ("old_per_seq_inf", set_(old_logprobs=lambda a: torch.tensor([-1.0, -2.0, -INF, -3.0])),
     ValueError, "old_logprobs"),
    ("rewards_B", set_(rewards=lambda a: torch.zeros(PAIRS)), ValueError, "rewards"),
    ("rewards_2d", set_(rewards=lambda a: torch.zeros(2 * PAIRS, 1)), ValueError, "rewards"),
    ("rewards_per_token", set_(rewards=lambda a: torch.zeros(2 * PAIRS, T)), ValueError, "rewards"),
    ("rewards_scalar", set_(rewards=lambda a: torch.zeros(())), ValueError, "rewards"),
    ("rewards_nan", reward_at(NAN), ValueError, "rewards"),
    ("rewards_inf", reward_at(INF), ValueError, "rewards"),
    ("rewards_minus_inf", reward_at(-INF), ValueError, "rewards"),
    ("eta_0", set_(eta=0.0), ValueError, "eta"),
    ("eta_negative", set_(eta=-1.0), ValueError, "eta"),
    ("eta_nan", set_(eta=NAN), ValueError, "eta"),
    ("eta_inf", set_(eta=INF), ValueError, "eta"),
    ("reduction_avg", set_(reduction="avg"), ValueError, "reduction"),
    ("reduction_upper", set_(reduction="MEAN"), ValueError, "reduction"),
]

LOGPROB_CASES = [
    ("empty_tokens", set_(hidden=lambda a: torch.zeros(0, H), labels=lambda a: torch.zeros(0, dtype=torch.int64)),
     ValueError, "hidden|labels"),
    ("labels_leading_mismatch", set_(hidden=lambda a: torch.randn(3, 2, 5, H),
                                     labels=lambda a: torch.zeros(3, 5, 2, dtype=torch.int64)), ValueError, "labels"),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case", COMMON_CASES + LOSS_CASES, ids=_ids(COMMON_CASES + LOSS_CASES))
def test_loss_rejects(case, backend, device):
    _, mutate, exc, name = case
    with pytest.raises(exc, match=name):
        call_loss(to_device(mutate(valid_args()), device))


@pytest.mark.parametrize("case", COMMON_CASES + LOGPROB_CASES, ids=_ids(COMMON_CASES + LOGPROB_CASES))
def test_token_logprobs_rejects(case, backend, device):
    _, mutate, exc, name = case
    with pytest.raises(exc, match=name):
        call_logprobs(to_device(mutate(valid_args()), device))


@pytest.mark.parametrize("reduction", [None, 0])
def test_loss_rejects_reduction_not_a_string(reduction, backend, device):
    with pytest.raises((ValueError, TypeError), match="reduction"):
        call_loss(dict(valid_args(device=device), reduction=reduction))


def test_the_valid_base_case_passes(backend, device):
    """Guards the cases above: each differs from this valid call in one argument only."""
    assert torch.isfinite(call_loss(valid_args(device=device)))
    assert torch.isfinite(call_logprobs(valid_args(device=device))).all()
    assert torch.isfinite(call_loss(valid_args(old="seq", device=device)))
    # the transforms' valid values: ints and floats, softcap None (off)
    for head in (dict(logit_scale=2, softcap=30), dict(logit_scale=0.0625, softcap=None), dict(softcap=1e-3)):
        assert torch.isfinite(call_loss(dict(valid_args(device=device), **head))), head
        assert torch.isfinite(call_logprobs(dict(valid_args(device=device), **head))).all(), head


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_scale="8"), TypeError, "logit_scale must be a real number"),
    (dict(softcap=-1.0), ValueError, "softcap must be finite and > 0"),
    (dict(softcap=NAN), ValueError, "softcap must be finite and > 0"),
    (dict(softcap=[30.0]), TypeError, "softcap must be a real number or None"),
])
def test_module_rejects_bad_transforms_at_construction(kwargs, exc, match):
    from rebel_kernels import FusedRebelLoss

    with pytest.raises(exc, match=match):
        FusedRebelLoss(**kwargs)


@pytest.mark.parametrize("old", ["token", "seq"])
def test_garbage_old_logprobs_at_ignored_positions_are_allowed(old, backend, device):
    """NaN / +-inf / 1e30 where labels == ignore_index (and fully ignored rows) must not raise or leak."""
    b = make_batch(99, pairs=PAIRS, T=T, H=H, V=V, old=old, masked_rows=(1,), device=device)
    valid = b.labels != -100
    if old == "token":
        assert (~torch.isfinite(b.old_logprobs[~valid])).any(), "the batch should hold non-finite garbage"
    loss = fused_rebel_loss(*b.loss_args(), bias=b.bias, reduction="none")
    grads = torch.autograd.grad(loss.sum(), b.leaves())
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads)
    clean = torch.where(valid, b.old_logprobs, 0.0) if old == "token" else b.old_logprobs
    b64 = b.to64()
    ref = reference_rebel_loss(b64.hidden, b64.weight, b.labels, clean.double(), b64.rewards, bias=b64.bias,
                               reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    # Garbage and its clean replacement give bitwise the same loss.
    again = fused_rebel_loss(b.hidden, b.weight, b.labels, clean, b.rewards, bias=b.bias, reduction="none")
    assert torch.equal(loss.detach(), again.detach())


def test_ignore_index_positions_with_other_ignore_index_are_allowed(backend, device):
    """With ignore_index=-1, labels of -1 are skipped (not out of range)."""
    b = make_batch(7, pairs=1, T=T, H=H, V=V, ignore_index=-1, device=device)
    assert (b.labels == -1).any()
    assert torch.isfinite(fused_rebel_loss(*b.loss_args(), bias=b.bias, ignore_index=-1))
    assert torch.isfinite(fused_token_logprobs(b.hidden, b.weight, b.labels, ignore_index=-1)).all()


# hidden on one device, one other argument on another. The `meta` device needs no GPU: validation raises
# before any kernel (or any read of the data), so a meta tensor is never touched.
DEVICE_PAIRS = [("cpu", "meta"), ("meta", "cpu"), pytest.param(("cuda", "cpu"), marks=pytest.mark.cuda)]


@pytest.mark.parametrize("devices", DEVICE_PAIRS, ids=lambda d: f"hidden_{d[0]}-other_{d[1]}")
@pytest.mark.parametrize("name", ["weight", "labels", "bias", "old_logprobs", "rewards"])
def test_loss_rejects_mismatched_devices(name, devices, backend):
    hidden_device, other = devices
    args = {k: v.detach().to(other if k == name else hidden_device) for k, v in valid_args().items()}
    with pytest.raises(ValueError, match=rf"{name} is on {other}.* but hidden is on {hidden_device}"):
        call_loss(args)
    if name in ("weight", "labels", "bias"):
        with pytest.raises(ValueError, match=rf"{name} is on {other}.* but hidden is on {hidden_device}"):
            call_logprobs(args)


@pytest.fixture
def device_mesh():
    """A 1-D CPU device mesh over a one-process gloo group (an in-memory store: no port, no spawn)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without distributed (gloo)")
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_sharded_dtensor_weight_raises(name, device_mesh):
    """A sharded DTensor weight (or bias) would give logits of one shard: both ops refuse it, naming the
    argument; a replicated one is used as its local tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    args = valid_args()
    full = args[name].detach()
    args[name] = distribute_tensor(full, device_mesh, [Shard(0)])
    with pytest.raises(ValueError, match=rf"{name} is a DTensor sharded as .*Shard\(dim=0\).*{name}\.full_tensor\(\)"):
        call_loss(args)
    with pytest.raises(ValueError, match=rf"{name} is a DTensor sharded as"):
        call_logprobs(args)
    expected = call_logprobs(dict(args, **{name: full}))
    args[name] = distribute_tensor(full, device_mesh, [Replicate()])
    torch.testing.assert_close(call_logprobs(args), expected)

