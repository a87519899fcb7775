// Per-row softmax work of one key tile, fused into as few passes over the row as the math allows.
// Scores arrive as raw q.k products; scale_log2 = scale * log2(e), so exponentials are base 2 and
// the running max m and the saved lse2 are in base-2 units. `bias` (0 or -inf per key: the key
// mask of this tile) may be null; keys at or beyond `valid` (causal limit of the row) count as
// masked, and the row is written out to `width` columns (zeros past `valid`). `keep` is the row's
// attention dropout (csrc/cpu/dropout.h).
#pragma once

#include <cstdint>

namespace perceiver_fast::cpu {

// Dropout of one row: key j is kept iff bit j of bits[j / 64] is set, its probability then scaled
// by `scale` (1 / (1 - p)); a dropped key's is 0. Null bits: no dropout.
template <typename acc_t>
struct KeepRow {
  const uint64_t* bits = nullptr;
  acc_t scale = 1;

  acc_t factor(int64_t j) const { return (bits[j >> 6] >> (j & 63)) & 1 ? scale : acc_t(0); }
};

// Forward online-softmax step: probs[j] = exp2(score*scale_log2 + bias - m_new) (times keep's
// factor), m (the row's reference value) and l (sum of the undropped probabilities relative to it)
// updated; returns the factor by which the row's output accumulator must be scaled. m is the
// running max in the portable steps; the vector ones (AVX-512, SIMD) let it lag the row's max by
// up to 8 (lazy rescaling, probabilities up to 2^8), so only m + log2(l) is the row's log-sum-exp
// (base 2).
// probs may alias scores when P is the accumulator type. A row that has seen no key keeps m = -inf,
// l = 0 and gets zero probabilities.
template <typename acc_t, typename P>
acc_t softmax_forward_step(acc_t* scores, P* probs, int64_t valid, int64_t width, acc_t scale_log2,
                           const acc_t* bias, acc_t& m, acc_t& l, KeepRow<acc_t> keep);

// Backward step, in place: with p = exp2(score*scale_log2 + bias - lse2) and z keep's factor (1
// without dropout): scores -> p z (the dropped probabilities, dV's operand) and
// dprobs -> ds = p * (dprobs z - delta) * scale. A row with lse2 = -inf (no key) gets zeros.
template <typename acc_t>
void softmax_backward_step(acc_t* scores, acc_t* dprobs, int64_t valid, int64_t width, acc_t scale_log2,
                           const acc_t* bias, acc_t lse2, acc_t delta, acc_t scale, KeepRow<acc_t> keep);

}  // namespace perceiver_fast::cpu
