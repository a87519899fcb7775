#include "softmax_rows.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "rows_simd.h"
#include "softmax_rows_avx512.h"
#include "vector_paths.h"

namespace perceiver_fast::cpu {
namespace {


// The scaled score of key j: score * scale_log2, or the bias (-inf) where the key mask masks the key,
// whose score is then never read, even when NaN or infinite.
template <typename acc_t>
acc_t scaled_score(const acc_t* scores, const acc_t* bias, int64_t j, acc_t scale_log2) {
  return bias && bias[j] != acc_t(0) ? bias[j] : scores[j] * scale_log2;
}

// Portable versions: float64, and float32 on CPUs without a SIMD level (vector_paths.h).
template <typename acc_t, typename P>
acc_t forward_step_portable(acc_t* scores, P* probs, int64_t valid, int64_t width, acc_t scale_log2,
                            const acc_t* bias, acc_t& m, acc_t& l, KeepRow<acc_t> keep) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t row_max = neg_inf;
  bool unordered = false;
  for (int64_t j = 0; j < valid; ++j) {
    const acc_t x = scaled_score(scores, bias, j, scale_log2);
    scores[j] = x;
    row_max = std::max(row_max, x);
    unordered |= std::isnan(x);
  }
  // A NaN score makes the running max NaN, hence the row's sum and output: max alone would drop it.
  const acc_t m_new = unordered ? std::numeric_limits<acc_t>::quiet_NaN() : std::max(m, row_max);
  if (m_new == neg_inf) {
    std::fill(probs, probs + width, P(0));
    return acc_t(1);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < valid; ++j) {
    const acc_t p = std::exp2(scores[j] - m_new);
    sum += p;
    probs[j] = static_cast<P>(keep.bits ? p * keep.factor(j) : p);
  }
  std::fill(probs + valid, probs + width, P(0));
  const acc_t alpha = std::exp2(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

template <typename acc_t>
void backward_step_portable(acc_t* scores, acc_t* dprobs, int64_t valid, int64_t width, acc_t scale_log2,
                            const acc_t* bias, acc_t lse2, acc_t delta, acc_t scale, KeepRow<acc_t> keep) {
  if (std::isinf(lse2) && lse2 < 0) valid = 0;
  for (int64_t j = 0; j < valid; ++j) {
    // p <= 1: the recomputed scores may round a few ulps above the forward's. min keeps a NaN.
    const acc_t p = std::exp2(std::min(scaled_score(scores, bias, j, scale_log2) - lse2, acc_t(0)));
    const acc_t z = keep.bits ? keep.factor(j) : acc_t(1);
    scores[j] = p * z;
    dprobs[j] = p * (dprobs[j] * z - delta) * scale;
  }
  std::fill(scores + valid, scores + width, acc_t(0));
  std::fill(dprobs + valid, dprobs + width, acc_t(0));
}

}  // namespace

template <typename acc_t, typename P>
acc_t softmax_forward_step(acc_t* scores, P* probs, int64_t valid, int64_t width, acc_t scale_log2,
                           const acc_t* bias, acc_t& m, acc_t& l, KeepRow<acc_t> keep) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_avx512_bf16_rows()) return avx512::softmax_forward_step(scores, probs, valid, width, scale_log2, bias, m, l, keep);
    if constexpr (std::is_same_v<P, float>) {
      if (use_simd_rows()) return simd::softmax_forward_step(scores, probs, valid, width, scale_log2, bias, m, l, keep);
    }
  }
  return forward_step_portable(scores, probs, valid, width, scale_log2, bias, m, l, keep);
}

template <typename acc_t>
void softmax_backward_step(acc_t* scores, acc_t* dprobs, int64_t valid, int64_t width, acc_t scale_log2,
                           const acc_t* bias, acc_t lse2, acc_t delta, acc_t scale, KeepRow<acc_t> keep) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_avx512_bf16_rows()) {
      avx512::softmax_backward_step(scores, dprobs, valid, width, scale_log2, bias, lse2, delta, scale, keep);
      return;
    }
    if (use_simd_rows()) {
      simd::softmax_backward_step(scores, dprobs, valid, width, scale_log2, bias, lse2, delta, scale, keep);
      return;
    }
  }
  backward_step_portable(scores, dprobs, valid, width, scale_log2, bias, lse2, delta, scale, keep);
}

template float softmax_forward_step(float*, float*, int64_t, int64_t, float, const float*, float&, float&,
                                    KeepRow<float>);
template float softmax_forward_step(float*, c10::BFloat16*, int64_t, int64_t, float, const float*, float&, float&,
                                    KeepRow<float>);
template double softmax_forward_step(double*, double*, int64_t, int64_t, double, const double*, double&, double&,
                                     KeepRow<double>);
template void softmax_backward_step(float*, float*, int64_t, int64_t, float, const float*, float, float, float,
                                    KeepRow<float>);
template void softmax_backward_step(double*, double*, int64_t, int64_t, double, const double*, double, double, double,
                                    KeepRow<double>);

}  // namespace perceiver_fast::cpu
