// The CUDA kernel of rebel_kernels::sample_logits (the rule is in sampling.h; the launcher and the
// registration are in sampling_cuda.cu). Plain CUDA C++ with no ATen dependency beyond the dtype
// conversions, so the same code can also be compiled for the host under a thread emulation.
//
// One block of kBlock threads per row; the row is read from global memory (L2) on every pass, no
// scratch buffer. Passes, each closed by a deterministic block reduction (fixed order, no atomics):
//   1. max and NaN flag (strided loads);
//   2. top-k: the k-th largest ordered key by a bitwise binary search, 32 counting passes, then the
//      count and mass above it (ties at the k-th value: the first `quota` in index order are kept,
//      their mass is quota * e(t_k) since tied entries have the same value);
//   3. top-p: the largest key t with mass(key >= t) >= top_p * Z, by binary search on [t_k, max]
//      (at most 32 mass passes);
//   4. inverse CDF in index order: each thread owns a contiguous chunk; block exclusive scans give
//      each chunk the count of tied entries and the kept mass before it; the first chunk whose
//      running mass passes u * W walks its entries to the token.
// Exponentials are float32, every sum of them float64 (cheap next to the loads; it keeps the token
// equal to the float64 reference's except within ~1e-7 relative of a boundary).
// A row with a NaN, +inf or no finite value gets token -1 and a NaN log-probability (no host sync).
#pragma once

#include <cmath>
#include <cstdint>

#include "sampling.h"

namespace rebel_kernels {
namespace cuda_kernel {

#ifndef REBEL_KERNELS_SAMPLE_BLOCK
#define REBEL_KERNELS_SAMPLE_BLOCK 512  // threads per row; a multiple of 32, at most 1024
#endif
constexpr int kBlock = REBEL_KERNELS_SAMPLE_BLOCK;
constexpr int kWarps = kBlock / 32;
static_assert(kBlock % 32 == 0 && kBlock <= 1024, "REBEL_KERNELS_SAMPLE_BLOCK: a multiple of 32, <= 1024");
constexpr unsigned kFull = 0xffffffffu;

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct MaxIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Per-block shared scratch for reductions and scans; each helper starts with __syncthreads() so the
// previous helper's readers are done before it is overwritten.
struct Shared {
  double d[kWarps];
  float f[kWarps];
  long long ll[kWarps];
  int i[kWarps];
};

template <typename T>
__device__ __forceinline__ T* slot(Shared& s);
template <> __device__ __forceinline__ double* slot<double>(Shared& s) { return s.d; }
template <> __device__ __forceinline__ float* slot<float>(Shared& s) { return s.f; }
template <> __device__ __forceinline__ long long* slot<long long>(Shared& s) { return s.ll; }
template <> __device__ __forceinline__ int* slot<int>(Shared& s) { return s.i; }

// Block-wide reduction, result returned to every thread. Warps reduce by butterfly, then every
// thread folds the kWarps partials in the same order: deterministic, and no broadcast step.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  T* buf = slot<T>(sh);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = buf[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, buf[w]);
  return r;
}

// Block-wide exclusive prefix sum in thread order; *total receives the block's sum (every thread).
template <typename T>
__device__ __forceinline__ T block_exclusive_sum(T v, Shared& sh, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  T excl = __shfl_up_sync(kFull, incl, 1);
  if (lane == 0) excl = T(0);
  T* buf = slot<T>(sh);
  __syncthreads();
  if (lane == 31) buf[warp] = incl;
  __syncthreads();
  T before = T(0), all = T(0);
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = all;
    all += buf[w];
  }
  *total = all;
  return before + excl;
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename scalar_t>
__device__ __forceinline__ float load(const scalar_t* x, int64_t i) {
  return static_cast<float>(x[i]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
sample_logits_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ uniform,
                     int64_t V, float temperature, double temperature_d, int64_t top_k,
                     double top_p, int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  __shared__ Shared sh;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* x = logits + row * V;

  // 1. max and NaN flag.
  float lmax = -INFINITY;
  int lnan = 0;
  for (int64_t i = tid; i < V; i += kBlock) {
    const float v = load(x, i);
    lnan |= isnan(v) ? 1 : 0;
    lmax = fmaxf(lmax, v);
  }
  const float m = block_reduce(lmax, MaxOp(), sh);
  const int nan = block_reduce(lnan, MaxIntOp(), sh);
  if (nan || !isfinite(m)) {  // uniform across the block: every thread returns
    if (tid == 0) {
      tokens[row] = -1;
      logprobs[row] = NAN;
    }
    return;
  }
  auto weight = [&](float v) { return expf((v - m) / temperature); };  // exp(-inf) = 0

  // 2. top-k: tk = the k-th largest key, i.e. the largest t with count(key >= t) >= k.
  uint32_t tk = 0;
  long long quota = -1;  // entries tied at tk that are kept, in index order (-1: all)
  double z;              // mass of the top-k set
  if (top_k > 0 && top_k < V) {
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = prefix | (1u << bit);
      long long c = 0;
      for (int64_t i = tid; i < V; i += kBlock) c += order_key(load(x, i)) >= cand;
      if (block_reduce(c, SumOp(), sh) >= top_k) prefix = cand;
    }
    tk = prefix;
    long long above = 0;
    double above_mass = 0.0;
    float tie_weight = 0.f;
    for (int64_t i = tid; i < V; i += kBlock) {
      const float v = load(x, i);
      const uint32_t key = order_key(v);
      if (key > tk) {
        ++above;
        above_mass += weight(v);
      } else if (key == tk) {
        tie_weight = weight(v);  // every tied entry has the same value
      }
    }
    above = block_reduce(above, SumOp(), sh);
    above_mass = block_reduce(above_mass, SumOp(), sh);
    tie_weight = block_reduce(tie_weight, MaxOp(), sh);
    quota = top_k - above;  // >= 1
    z = above_mass + static_cast<double>(quota) * static_cast<double>(tie_weight);
  } else {
    double s = 0.0;
    for (int64_t i = tid; i < V; i += kBlock) s += weight(load(x, i));
    z = block_reduce(s, SumOp(), sh);
  }

  // 3. top-p: thr = the largest key t with mass(K, key >= t) >= top_p * z. mass(K, key >= tk) = z,
  // and above tk the top-k set holds every entry, so the search runs on keys in (tk, key(m)].
  uint32_t thr = tk;
  if (top_p < 1.0) {
    const double target = top_p * z;
    uint32_t lo = tk, hi = order_key(m) + 1u;  // mass(lo) >= target > mass(hi) = 0
    while (hi - lo > 1u) {
      const uint32_t mid = lo + (hi - lo) / 2u;
      double s = 0.0;
      for (int64_t i = tid; i < V; i += kBlock) {
        const float v = load(x, i);
        if (order_key(v) >= mid) s += weight(v);
      }
      if (block_reduce(s, SumOp(), sh) >= target) lo = mid; else hi = mid;
    }
    thr = lo;
  }
  const bool limited = quota >= 0 && thr == tk;  // ties at thr capped by the top-k quota

  // 4. inverse CDF in index order over contiguous chunks.
  const int64_t chunk = (V + kBlock - 1) / kBlock;
  const int64_t begin = imin(V, tid * chunk), end = imin(V, begin + chunk);
  long long ties_before = 0;
  if (limited) {
    long long t = 0, all;
    for (int64_t i = begin; i < end; ++i) t += order_key(load(x, i)) == thr;
    ties_before = block_exclusive_sum(t, sh, &all);
  }
  auto kept = [&](uint32_t key, long long& ties) {
    if (key > thr) return true;
    if (key < thr) return false;
    return !limited || ties++ < quota;
  };
  double s = 0.0;
  {
    long long ties = ties_before;
    for (int64_t i = begin; i < end; ++i) {
      const float v = load(x, i);
      if (kept(order_key(v), ties)) s += weight(v);
    }
  }
  double total;
  const double excl = block_exclusive_sum(s, sh, &total);
  const float uf = fminf(fmaxf(uniform[row], 0.f), 0x1.fffffep-1f);  // clamp into [0, 1); NaN -> 0
  const double target = static_cast<double>(uf) * total;
  const bool passes = s > 0.0 && target < excl + s;
  int winner = block_reduce(passes ? tid : kBlock, MinOp(), sh);
  const bool fallback = winner == kBlock;  // rounding only: no chunk reached the target
  if (fallback) winner = block_reduce(s > 0.0 ? tid : -1, MaxIntOp(), sh);
  if (tid != winner) return;
  const double local = fallback ? INFINITY : target - excl;
  long long ties = ties_before;
  int64_t token = -1;
  double c = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const float v = load(x, i);
    if (!kept(order_key(v), ties)) continue;
    const float e = weight(v);
    if (e <= 0.f) continue;
    token = i;  // the last kept entry with mass, if the target is never passed
    c += e;
    if (c > local) break;
  }
  tokens[row] = token;
  logprobs[row] = static_cast<float>(
      (static_cast<double>(load(x, token)) - static_cast<double>(m)) / temperature_d - log(total));
}

}  // namespace cuda_kernel
}  // namespace rebel_kernels
