// rebel_kernels::sample_logits: declarations shared by the binding file and both implementations,
// and the small helpers that the CPU and CUDA code must compute identically.
//
// The op, per row r of logits x [R, V] (read as float32), with u = uniform[r]:
//   m   = max_i x_i;  e_i = exp((x_i - m) / temperature)        (softmax numerators)
//   K   = top-k set:  every x_i above t_k (the k-th largest value) and, of the entries equal to t_k,
//         the first in index order, so that |K| = k exactly. top_k = 0 (or V): K = everything.
//   Z   = sum_{i in K} e_i
//   t_p = the largest value t with  sum_{i in K, x_i >= t} e_i >= top_p * Z   (top_p = 1: t_p = -inf)
//   S   = {i in K : x_i >= t_p}: the smallest prefix of the descending order whose mass reaches
//         top_p, plus every entry tied with its last one (ties at t_p are all kept).
//   W   = sum_{i in S} e_i; token = the first i in S, in index order, whose running sum of e
//         over S exceeds u * W (inverse CDF in index order); logprob = (x_tok - m) / T - log W.
// Thresholds are found without sorting, by searching the 32-bit ordered keys of the values (a radix
// select on the CPU, a bitwise binary search on the GPU): O(V) per step, at most 32 steps.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__CUDACC__)
#define RK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RK_HOST_DEVICE inline
#endif

// Dispatch over the three logits dtypes the op accepts (float32, float16, bfloat16).
#define RK_DISPATCH_LOGITS(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace rebel_kernels {

// Monotone map float -> uint32: a < b  <=>  order_key(a) < order_key(b) for non-NaN values, with
// -0.0 and +0.0 mapped to the same key (they compare equal, so they tie). -inf maps above 0.
RK_HOST_DEVICE uint32_t order_key(float x) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  if (u == 0x80000000u) u = 0u;  // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Input checks shared by every backend (bindings.cpp); they raise c10::Error naming the argument.
void check_sample_inputs(const at::Tensor& logits, const at::Tensor& uniform, double temperature,
                         int64_t top_k, double top_p);

// Unchecked implementations: logits [R, V] contiguous, uniform [R] float32 contiguous, same device.
std::tuple<at::Tensor, at::Tensor> sample_logits_cpu_impl(const at::Tensor& logits,
                                                          const at::Tensor& uniform,
                                                          double temperature, int64_t top_k,
                                                          double top_p);

}  // namespace rebel_kernels
