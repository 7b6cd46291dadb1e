// The one binding file of rebel_kernels._C: the operator schemas, the checks of every input, and the
// CPU registration. The CUDA registration lives in sampling_cuda.cu and calls the same checks.
//
//   torch.ops.rebel_kernels.sample_logits(Tensor logits, Tensor uniform, float temperature,
//                                         int top_k, float top_p) -> (Tensor token, Tensor logprob)
//
// The namespace `rebel_kernels` is shared with the Python custom ops (rebel_kernels/logprobs/ops.py),
// hence TORCH_LIBRARY_FRAGMENT. The fake (meta) implementation is registered in
// rebel_kernels/topk_topp/ops.py (the module named by set_python_module below).
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "sampling.h"

namespace rebel_kernels {

namespace {
bool is_sampling_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_sample_inputs(const at::Tensor& logits, const at::Tensor& uniform, double temperature,
                         int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2, "sample_logits: logits must be 2-D [R, V], got shape ",
              logits.sizes());
  TORCH_CHECK(is_sampling_dtype(logits.scalar_type()),
              "sample_logits: logits must be float32, float16 or bfloat16, got ",
              logits.scalar_type());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(R >= 1, "sample_logits: logits must have at least one row, got shape ",
              logits.sizes());
  TORCH_CHECK(V >= 1, "sample_logits: logits must have a non-empty vocabulary, got shape ",
              logits.sizes());
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(),
              "sample_logits: logits vocabulary must be < 2^31, got V = ", V);
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == R,
              "sample_logits: uniform must have shape [", R, "] (one per row of logits), got ",
              uniform.sizes());
  TORCH_CHECK(uniform.scalar_type() == at::kFloat, "sample_logits: uniform must be float32, got ",
              uniform.scalar_type());
  TORCH_CHECK(uniform.device() == logits.device(), "sample_logits: uniform is on ",
              uniform.device(), " but logits is on ", logits.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "sample_logits: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(top_k >= 0 && top_k <= V, "sample_logits: top_k must be in [0, ", V,
              "] (0 = off, V = vocabulary size), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "sample_logits: top_p must be in (0, 1] (1 = off), got ",
              top_p);
}

std::tuple<at::Tensor, at::Tensor> sample_logits_cpu(const at::Tensor& logits,
                                                     const at::Tensor& uniform, double temperature,
                                                     int64_t top_k, double top_p) {
  check_sample_inputs(logits, uniform, temperature, top_k, top_p);
  TORCH_CHECK(logits.device().is_cpu(), "sample_logits: CPU kernel called with logits on ",
              logits.device());
  return sample_logits_cpu_impl(logits, uniform, temperature, top_k, top_p);
}

}  // namespace rebel_kernels

TORCH_LIBRARY_FRAGMENT(rebel_kernels, m) {
  // Fake tensors look for the fake implementation in this module (imported on demand).
  m.set_python_module("rebel_kernels.topk_topp.ops");
  m.def(
      "sample_logits(Tensor logits, Tensor uniform, float temperature, int top_k, float top_p)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rebel_kernels, CPU, m) {
  m.impl("sample_logits", &rebel_kernels::sample_logits_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rebel_kernels native ops, registered as torch.ops.rebel_kernels.*";
#ifdef REBEL_KERNELS_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
