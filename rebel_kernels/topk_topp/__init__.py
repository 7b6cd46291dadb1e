"""Sampling from logits with temperature, top-k and top-p, in one sort-free pass: the native op
`torch.ops.rebel_kernels.sample_logits` (rebel_kernels._C, csrc/), its specification, its fake and
its PyTorch fallback.

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

The log-probability is the one of the distribution actually sampled (docs/design.md section 8,
pitfall 5); with truncation it differs from the model's full softmax. Temperature, then top-k, then
top-p, as in Hugging Face `generate`. The uniforms are drawn by the caller from a torch.Generator,
so the native code holds no random state and a seeded generator reproduces the tokens on any backend.

Layers: reference.py (`reference_sample_logits`, sort-based, float64: the specification), the
C++/CUDA kernels (csrc/, built as rebel_kernels._C), ops.py (loads the extension and registers the
op's fake implementation, for torch.compile), torch_impl.py (the PyTorch fallback used when the
extension is not built: the specification itself, slower), and api.py (the public `sample_logits`,
which alone checks arguments). The kernels find the thresholds without sorting, by a search over
the 32-bit ordered keys of the values (a radix select on the CPU, a bitwise binary search in the
CUDA kernel), and must return exactly the reference's token for the same uniforms; they can differ
only where a running sum lands within rounding of a decision boundary (the reference and the CPU
kernel sum in float64, the CUDA kernel sums float32 exponentials in float64). Bad logits (a NaN,
+inf, or no finite value in a row) raise on the CPU; the CUDA kernel cannot raise without a host
sync, so it returns token -1 and a NaN log-probability for such rows (the fallback does the same).
"""
from .api import sample_logits
from .reference import reference_kept_mask, reference_sample_logits

__all__ = ["sample_logits", "reference_sample_logits", "reference_kept_mask"]
