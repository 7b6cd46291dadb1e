"""Sampling from logits with temperature, top-k and top-p, in one sort-free pass: the native op
`torch.ops.rebel_kernels.sample_logits` (rebel_kernels._C, csrc/), its specification and its fake.

For row r of logits x [R, V] (read as float32) and the caller's uniform u_r in [0, 1):

    e_i      = exp((x_i - max x) / temperature)
    K        = the top_k largest entries; of the entries tied at the k-th value, the first ones in
               index order, so |K| = top_k exactly (top_k = 0: K = all V entries)
    S        = the entries of K with x_i >= t_p, t_p the largest value whose tail in K holds at least
               top_p of K's mass: the smallest head of K's descending order reaching top_p, plus every
               entry tied with its last member (top_p = 1: S = K)
    token_r  = the first i in S, in index order, with sum_{j in S, j <= i} e_j > u_r * sum_{j in S} e_j
    logprob_r = log softmax(x / temperature) restricted to S and renormalized, at token_r
              = (x_token - max x) / temperature - log sum_{j in S} e_j      (float32)

The log-probability is the one of the distribution actually sampled (DESIGN.md pitfall 5); with
truncation it differs from the model's full softmax. Temperature, then top-k, then top-p, as in
Hugging Face `generate`. The uniforms are drawn by the caller from a torch.Generator, so the native
code holds no random state and a seeded generator reproduces the tokens on any backend.

Layers: `reference_sample_logits` (sort-based, float64: the specification), the C++/CUDA kernels,
the op registration and its fake implementation (here, for torch.compile), and the public
`sample_logits`, which alone checks arguments. The kernels find the thresholds without sorting, by a
search over the 32-bit ordered keys of the values (a radix select on the CPU, a bitwise binary search
in the CUDA kernel), and must return exactly the reference's token for the same uniforms; they can
differ only where a running sum lands within rounding of a decision boundary (the reference and the
CPU kernel sum in float64, the CUDA kernel sums float32 exponentials in float64). Bad logits (a NaN,
+inf, or no finite value in a row) raise on the CPU; the CUDA kernel cannot raise without a host
sync, so it returns token -1 and a NaN log-probability for such rows.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _validate

__all__ = ["sample_logits", "reference_sample_logits", "reference_kept_mask"]

SAMPLING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    from . import _C  # noqa: F401  (registers torch.ops.rebel_kernels.sample_logits)
except ImportError as exc:  # not built: the reference stays usable
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def sample_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row of `logits` [R, V] (float32, float16 or bfloat16).

    temperature > 0 divides the logits; top_k in [0, V] (0 = off) keeps the k largest (exactly k,
    ties broken by lower index); top_p in (0, 1] (1 = off) then keeps the smallest head of the
    descending order whose probability reaches top_p (every entry tied with its last one included).
    Returns (tokens int64 [R], logprobs float32 [R]), the log-probability of each token under the
    truncated, renormalized distribution that was sampled. One uniform per row is drawn with
    `torch.rand(R, generator=generator)` on logits' device; no host synchronization.
    """
    temperature, top_k, top_p = _check(logits, temperature, top_k, top_p, generator)
    if _C is None:
        raise ImportError(
            "rebel_kernels._C, the native extension behind sample_logits, is not built "
            f"({_IMPORT_ERROR}). Reinstall the package from its source tree with torch already "
            "installed: `pip install --no-build-isolation -e .`"
        )
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float32)
    return torch.ops.rebel_kernels.sample_logits(logits.detach(), uniform, temperature, top_k, top_p)


def _check(logits, temperature, top_k, top_p, generator) -> tuple[float, int, float]:
    _validate.tensor("logits", logits)
    if logits.dtype not in SAMPLING_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [R, V], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        raise ValueError(f"logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    temperature = _validate.positive_finite("temperature", temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, {vocab}] (0 = off, {vocab} = vocabulary size), got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a real number, got {top_p!r}")
    if not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits is on {logits.device}")
    return temperature, int(top_k), float(top_p)


def reference_kept_mask(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The kept set S of every row (bool [R, V]), by a stable descending sort in float64.

    The stable sort puts tied values in index order, so taking the first top_k positions keeps the
    lower indices of a tie at the k-th value. The top-p cut is the first sorted position whose running
    mass reaches top_p of the total; every entry with the value found there is kept as well.
    """
    x = logits.float()  # the values the kernels compare; -0.0 == +0.0 ties, as in their keys
    rows, vocab = x.shape
    x_sorted, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [R, V]
    e_sorted = torch.exp((x_sorted.double() - x_sorted[:, :1].double()) / temperature)
    keep = torch.ones_like(x_sorted, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep[:, top_k:] = False
        e_sorted = e_sorted * keep
    if top_p < 1:
        cum = e_sorted.cumsum(-1)  # [R, V] float64
        cut = torch.searchsorted(cum, top_p * cum[:, -1:], right=False)  # first cum >= p * Z
        cut = cut.clamp_max(vocab - 1)  # only if rounding left the total below p * Z
        keep &= x_sorted >= x_sorted.gather(-1, cut)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def reference_sample_logits(
    logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[Tensor, Tensor]:
    """The specification of `sample_logits` for given uniforms [R] (float64 sums, sort-based).

    float64 because the token is decided by comparing running sums with u * W and the top-p mass
    with top_p * Z: summed in float64 (as the CPU kernel does, in index order), those sums agree
    with the kernel's to ~1e-16 relative, so a different token needs u to fall that close to a
    boundary. In float32 the gap would be ~1e-7 per term and visible over a 50k vocabulary.
    """
    x = logits.float().double()  # [R, V]
    m = x.max(-1, keepdim=True).values
    keep = reference_kept_mask(logits, temperature, top_k, top_p)
    w = torch.where(keep, torch.exp((x - m) / temperature), 0.0)  # [R, V]
    cum = w.cumsum(-1)  # index order, like the kernels
    total = cum[:, -1]
    token = torch.searchsorted(cum, (uniform.double() * total)[:, None], right=True)[:, 0]
    last = w.shape[1] - 1 - (w > 0).flip(-1).int().argmax(-1)  # last kept entry with mass
    token = torch.where(token < w.shape[1], token, last)
    logprob = (x.gather(-1, token[:, None])[:, 0] - m[:, 0]) / temperature - total.log()
    return token, logprob.float()


if _C is not None:

    @torch.library.register_fake("rebel_kernels::sample_logits")
    def _(logits, uniform, temperature, top_k, top_p):
        rows = logits.shape[0]
        return logits.new_empty((rows,), dtype=torch.int64), logits.new_empty((rows,), dtype=torch.float32)
