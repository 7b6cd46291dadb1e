// CUDA launcher and registration of rebel_kernels::sample_logits; the kernel is in
// sampling_cuda_kernel.cuh, the input checks in bindings.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sampling.h"
#include "sampling_cuda_kernel.cuh"

namespace rebel_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_logits_cuda(const at::Tensor& logits_in,
                                                      const at::Tensor& uniform_in,
                                                      double temperature, int64_t top_k,
                                                      double top_p) {
  check_sample_inputs(logits_in, uniform_in, temperature, top_k, top_p);
  TORCH_CHECK(logits_in.is_cuda(), "sample_logits: CUDA kernel called with logits on ",
              logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor uniform = uniform_in.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(R <= 2147483647LL, "sample_logits: logits must have < 2^31 rows, got ", R);
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({R}, logits.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_LOGITS(logits.scalar_type(), "sample_logits_cuda", [&] {
    cuda_kernel::sample_logits_kernel<scalar_t><<<static_cast<unsigned>(R), cuda_kernel::kBlock, 0, stream>>>(
        logits.data_ptr<scalar_t>(), uniform.data_ptr<float>(), V, static_cast<float>(temperature),
        temperature, top_k, top_p, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, logprobs};
}

}  // namespace
}  // namespace rebel_kernels

TORCH_LIBRARY_IMPL(rebel_kernels, CUDA, m) {
  m.impl("sample_logits", &rebel_kernels::sample_logits_cuda);
}
