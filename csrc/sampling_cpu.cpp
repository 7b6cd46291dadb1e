// CPU implementation of rebel_kernels::sample_logits (the rule is in sampling.h).
// Rows run in parallel (at::parallel_for); within a row everything is sequential, in index order,
// and in float64, so the result equals the float64 sort-based reference up to rounding of sums.
// Thresholds: radix select over the 32-bit ordered keys, 8 bits per pass (4 passes), by count for
// top-k and by probability mass for top-p. No sort, O(V) memory per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "sampling.h"

namespace rebel_kernels {
namespace {

// The k-th largest key (k in 1..V): built digit by digit from the top, with a 256-bin histogram of
// the keys that match the digits chosen so far.
uint32_t kth_largest_key(const std::vector<uint32_t>& keys, int64_t k) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<int64_t, 256> hist{};
    for (uint32_t key : keys) {
      if ((key & mask) == prefix) ++hist[(key >> shift) & 0xFFu];
    }
    int digit = 255;
    for (; digit > 0 && hist[digit] < k; --digit) k -= hist[digit];
    prefix |= static_cast<uint32_t>(digit) << shift;
    mask |= 0xFFu << shift;
  }
  return prefix;
}

// The largest key t with sum_{key_i >= t} w_i >= target (0 < target <= sum w). Same digit walk, the
// histograms holding mass instead of counts. Where rounding leaves a bin short of the target that
// the level above said it reaches, the lowest non-empty digit is taken (keeps more, never fewer).
uint32_t mass_threshold_key(const std::vector<uint32_t>& keys, const std::vector<double>& w,
                            double target) {
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;  // mass of the keys above every key matching `prefix`
  const size_t n = keys.size();
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<double, 256> hist{};
    for (size_t i = 0; i < n; ++i) {
      if ((keys[i] & mask) == prefix) hist[(keys[i] >> shift) & 0xFFu] += w[i];
    }
    int chosen = -1, lowest = -1;
    double acc = above, acc_lowest = above;
    for (int digit = 255; digit >= 0; --digit) {
      if (hist[digit] <= 0.0) continue;
      if (acc + hist[digit] >= target) {
        chosen = digit;
        break;
      }
      lowest = digit;
      acc_lowest = acc;
      acc += hist[digit];
    }
    if (chosen < 0) {  // rounding only: the bin's mass summed to just below the target
      chosen = lowest < 0 ? 0 : lowest;
      acc = acc_lowest;
    }
    prefix |= static_cast<uint32_t>(chosen) << shift;
    mask |= 0xFFu << shift;
    above = acc;
  }
  return prefix;
}

struct RowResult {
  int64_t token;
  double logprob;
};

template <typename scalar_t>
RowResult sample_row(const scalar_t* row, int64_t r, int64_t V, double u, double temperature,
                     int64_t top_k, double top_p, std::vector<uint32_t>& keys,
                     std::vector<double>& w) {
  // 1. max, and the values the op is defined on: no NaN, no +inf, at least one finite entry.
  float m = -INFINITY;
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) {
    const float x = static_cast<float>(row[i]);
    nan |= std::isnan(x);
    m = std::max(m, x);
  }
  TORCH_CHECK(!nan && std::isfinite(m), "sample_logits: logits row ", r,
              " must hold no NaN or +inf and at least one finite value (max is ", m,
              nan ? ", and it holds a NaN)" : ")");
  const double md = m;
  for (int64_t i = 0; i < V; ++i) {
    const float x = static_cast<float>(row[i]);
    keys[i] = order_key(x);
    w[i] = std::exp((static_cast<double>(x) - md) / temperature);  // exp(-inf) = 0
  }

  // 2. top-k: exactly k entries, ties at the k-th value kept in index order.
  uint32_t tk = 0;  // every key is >= 0
  if (top_k > 0 && top_k < V) {
    tk = kth_largest_key(keys, top_k);
    int64_t above = 0;
    for (uint32_t key : keys) above += key > tk;
    int64_t quota = top_k - above;  // >= 1 entries tied at tk are kept
    for (int64_t i = 0; i < V; ++i) {
      if (keys[i] > tk) continue;
      if (keys[i] == tk && quota > 0) {
        --quota;
        continue;
      }
      w[i] = 0.0;
    }
  }

  // 3. top-p over the top-k distribution: keep the keys >= the mass threshold (ties included).
  uint32_t tp = tk;
  if (top_p < 1.0) {
    double z = 0.0;
    for (int64_t i = 0; i < V; ++i) z += w[i];
    tp = std::max(tk, mass_threshold_key(keys, w, top_p * z));
  }

  // 4. inverse CDF over the kept set, in index order.
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (keys[i] < tp) w[i] = 0.0;
    total += w[i];
  }
  const double target = u * total;
  int64_t token = -1, last = -1;
  double c = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (w[i] <= 0.0) continue;
    last = i;
    c += w[i];
    if (c > target) {
      token = i;
      break;
    }
  }
  if (token < 0) token = last;  // unreachable for u in [0, 1): u * total < total
  const double logprob = (static_cast<double>(static_cast<float>(row[token])) - md) / temperature -
                         std::log(total);
  return {token, logprob};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_logits_cpu_impl(const at::Tensor& logits_in,
                                                          const at::Tensor& uniform_in,
                                                          double temperature, int64_t top_k,
                                                          double top_p) {
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor uniform = uniform_in.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({R}, logits.options().dtype(at::kFloat));
  const float* u = uniform.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / V);  // ~32k entries per task

  RK_DISPATCH_LOGITS(logits.scalar_type(), "sample_logits_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> keys(V);
      std::vector<double> w(V);
      for (int64_t r = begin; r < end; ++r) {
        TORCH_CHECK(u[r] >= 0.0f && u[r] < 1.0f, "sample_logits: uniform[", r,
                    "] must be in [0, 1), got ", u[r]);
        const RowResult res =
            sample_row<scalar_t>(x + r * V, r, V, u[r], temperature, top_k, top_p, keys, w);
        tok[r] = res.token;
        lp[r] = static_cast<float>(res.logprob);
      }
    });
  });
  return {tokens, logprobs};
}

}  // namespace rebel_kernels
