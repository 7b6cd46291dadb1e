"""Temperature sampling straight from the last hidden state and the LM head, by the Gumbel-max trick.

For row r, with logits z = (h_r W^T + b) / T computed in float32 (float64 for float64 inputs):

    token_r   = argmax_v (z_v + G_{r,v}),   G_{r,v} = -log(-log U_{r,v}),  U_{r,v} ~ U[0, 1) i.i.d.
    logprob_r = z_{token_r} - logsumexp_v z_v

argmax of logits plus i.i.d. Gumbel(0, 1) noise is an exact sample of softmax(z) (Gumbel, 1954; the
"Gumbel-max trick"). Ties go to the smaller index; a noise of -inf (U = 0, probability 2^-31 per
entry in the Triton path) just removes that entry. This is plain temperature sampling without
top-k/top-p, what REBEL uses (docs/design.md section 8, pitfall 5: the log-probability returned is
the one of the distribution actually sampled). No [R, V] tensor is ever formed; the only
device-side state beyond the outputs is a [splits, R] table of partial results.

Layers, as for the other ops: reference.py (`reference_gumbel_sample`, the specification, with
explicit uniforms), triton_kernels.py (the Triton kernels and their launcher, imported only when
the Triton backend runs), torch_impl.py (the chunked PyTorch path), and api.py (the public
`sample_from_hidden`, which alone checks arguments and picks the backend).
"""
from .api import sample_from_hidden
from .reference import reference_gumbel_sample

__all__ = ["sample_from_hidden", "reference_gumbel_sample"]
