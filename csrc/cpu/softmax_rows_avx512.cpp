#include "softmax_rows_avx512.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)  // GCC and clang
#include <immintrin.h>
#define PF_HAVE_AVX512 1
#endif

#include "isa_target.h"

namespace perceiver_fast::cpu::avx512 {

#ifdef PF_HAVE_AVX512
PF_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace {

// 2^x: split x = n + f with f in [-0.5, 0.5], a polynomial for 2^f, and scalef for 2^n. Inputs
// below -160 (masked keys: -inf) give exactly 0; NaN and +inf give NaN (the clamp keeps x's NaN:
// max returns its second operand when either is NaN). Degree 5 (relative error 8e-8, float32's own
// rounding) for float32 results; degree 4 (2.6e-6) where the result is rounded to bfloat16 (2^-9)
// or feeds only bfloat16 operands. Minimax coefficients for the relative error on [-0.5, 0.5].
template <int Degree>
inline __m512 exp2(__m512 x) {
  static_assert(Degree == 4 || Degree == 5);
  x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (Degree == 5) {
    p = _mm512_set1_ps(1.3276369126913237e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755066064857080e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507132671006450e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120390191450e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314696729035060e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000715130866f));
  } else {
    p = _mm512_set1_ps(9.5699812348234890e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5917507510870180e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024744451489140e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312186000212790e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999926273761850e-1f));
  }
  return _mm512_scalef_ps(p, n);
}

// Degree of the exponentials of a step writing P.
template <typename P>
constexpr int exp2_degree = std::is_same_v<P, float> ? 5 : 4;

inline __mmask16 tail_mask(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }

inline void store(float* dst, __m512 x, __mmask16 k) { _mm512_mask_storeu_ps(dst, k, x); }
inline void store(c10::BFloat16* dst, __m512 x, __mmask16 k) {
  _mm256_mask_storeu_epi16(dst, k, (__m256i)_mm512_cvtneps_pbh(x));
}

// The keep bits of lanes j .. j + 15 (j a multiple of 16).
inline __mmask16 keep_lanes(const KeepRow<float>& keep, int64_t j) {
  return static_cast<__mmask16>(keep.bits[j >> 6] >> (j & 63));
}

// The scaled scores of keys j .. j + 15 (lanes k): score * scale_log2, or the bias (-inf) where the
// key mask masks the key, so that a masked key's score is never read, even when NaN or infinite.
// Every pass computes them alike, rounded once: x - m is then exactly <= 0 against a max of the same
// values (a fused multiply-subtract skips the product's rounding, hundreds for scores near 1e9, and
// 2^x overflowed or vanished).
inline __m512 scaled_scores(const float* scores, const float* bias, int64_t j, __mmask16 k, __m512 scale_log2) {
  const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, scores + j), scale_log2);
  if (!bias) return x;
  const __m512 b = _mm512_maskz_loadu_ps(k, bias + j);
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(b, _mm512_setzero_ps(), _CMP_NEQ_UQ), b);
}

// A row already past its first key may exceed its running max m by this much (base 2) before m
// moves: probabilities up to 2^8 lose nothing in bfloat16 or in the float32 sums.
constexpr float kLazyRescale = 8.f;

// A row with a running max m first takes one pass against m, which stands (m stays, the accumulator
// needs no rescaling) unless a score passes m + kLazyRescale. From there two passes: the max of the
// keys left, then their exponentials against the new running max. The probabilities written before
// are rescaled to it in float32, where they overwrote their scores; bfloat16 ones are recomputed
// from the intact scores instead (a second rounding would cost them accuracy). The scaled scores
// are recomputed where needed, never stored.
template <typename P>
float forward_step(float* scores, P* probs, int64_t valid, int64_t width, float scale_log2, const float* bias,
                   float& m, float& l, KeepRow<float> keep) {
  constexpr bool in_place = std::is_same_v<P, float>;
  const __m512 c = _mm512_set1_ps(scale_log2), zero = _mm512_setzero_ps(), keep_scale = _mm512_set1_ps(keep.scale);
  // The scaled scores less shift, exponentiated and written as P from key j.
  auto exponentials = [&](int64_t j, __mmask16 k, __m512 shift, __m512& sum) {
    const __m512 x = _mm512_sub_ps(scaled_scores(scores, bias, j, k, c), shift);
    const __m512 p = _mm512_maskz_mov_ps(k, exp2<exp2_degree<P>>(x));
    sum = _mm512_add_ps(sum, p);
    const __m512 kept = keep.bits ? _mm512_maskz_mul_ps(keep_lanes(keep, j), p, keep_scale) : p;
    store(probs + j, kept, tail_mask(std::min<int64_t>(16, width - j)));  // zeros past valid, inside the row
  };
  auto zeros_from = [&](int64_t j) {
    for (j = (j + 15) / 16 * 16; j < width; j += 16) store(probs + j, zero, tail_mask(std::min<int64_t>(16, width - j)));
  };

  int64_t done = 0;  // keys whose probabilities are written against m
  __m512 sum = zero;
  if (m != -INFINITY) {
    const __m512 vm = _mm512_set1_ps(m), limit = _mm512_set1_ps(kLazyRescale);
    for (; done < valid; done += 16) {
      const __mmask16 k = tail_mask(std::min<int64_t>(16, valid - done));
      const __m512 x = _mm512_sub_ps(scaled_scores(scores, bias, done, k, c), vm);
      if (_mm512_mask_cmp_ps_mask(k, x, limit, _CMP_GT_OQ)) break;
      exponentials(done, k, vm, sum);
    }
    if (done >= valid) {
      zeros_from(valid);
      l += _mm512_reduce_add_ps(sum);
      return 1.f;
    }
    if (!in_place) {
      done = 0;
      sum = zero;
    }
  }

  __m512 vmax = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (int64_t j = done; j < valid; j += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, valid - j));
    const __m512 x = scaled_scores(scores, bias, j, k, c);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
    unordered |= _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q);
  }
  // A NaN score makes the running max NaN, hence the row's sum and output: max alone would drop it.
  const float m_new = unordered ? NAN : std::max(m, _mm512_reduce_max_ps(vmax));
  if (m_new == -INFINITY) {  // no key yet (done is 0 here)
    for (int64_t j = 0; j < width; j += 16) store(probs + j, zero, tail_mask(std::min<int64_t>(16, width - j)));
    return 1.f;
  }
  const float alpha = std::exp2(m - m_new);
  if constexpr (in_place) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t j = 0; j < done; j += 16) {
      _mm512_storeu_ps(probs + j, _mm512_mul_ps(_mm512_loadu_ps(probs + j), va));  // done < valid: whole vectors
    }
    sum = _mm512_mul_ps(sum, va);
  }
  const __m512 vm = _mm512_set1_ps(m_new);
  for (int64_t j = done; j < valid; j += 16) exponentials(j, tail_mask(std::min<int64_t>(16, valid - j)), vm, sum);
  zeros_from(valid);
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  return alpha;
}

}  // namespace

float softmax_forward_step(float* scores, float* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep) {
  return forward_step(scores, probs, valid, width, scale_log2, bias, m, l, keep);
}

float softmax_forward_step(float* scores, c10::BFloat16* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep) {
  return forward_step(scores, probs, valid, width, scale_log2, bias, m, l, keep);
}

void softmax_backward_step(float* scores, float* dprobs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float lse2, float delta, float scale, KeepRow<float> keep) {
  if (lse2 == -INFINITY) valid = 0;
  const __m512 keep_scale = _mm512_set1_ps(keep.scale);
  const __m512 c = _mm512_set1_ps(scale_log2), vlse = _mm512_set1_ps(lse2);
  const __m512 vdelta = _mm512_set1_ps(delta), vscale = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < valid; j += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, valid - j));
    const __mmask16 row = tail_mask(std::min<int64_t>(16, width - j));
    // p <= 1: the recomputed scores may round a few ulps above the forward's. min keeps a NaN x.
    const __m512 x = _mm512_sub_ps(scaled_scores(scores, bias, j, k, c), vlse);
    const __m512 p = _mm512_maskz_mov_ps(k, exp2<5>(_mm512_min_ps(zero, x)));
    __m512 dp = _mm512_maskz_loadu_ps(k, dprobs + j), dropped = p;
    if (keep.bits) {
      const __mmask16 kept = keep_lanes(keep, j);
      dp = _mm512_maskz_mul_ps(kept, dp, keep_scale);
      dropped = _mm512_maskz_mul_ps(kept, p, keep_scale);
    }
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, vdelta)), vscale);
    _mm512_mask_storeu_ps(scores + j, row, dropped);
    _mm512_mask_storeu_ps(dprobs + j, row, ds);
  }
  for (; j < width; j += 16) {
    const __mmask16 row = tail_mask(std::min<int64_t>(16, width - j));
    _mm512_mask_storeu_ps(scores + j, row, zero);
    _mm512_mask_storeu_ps(dprobs + j, row, zero);
  }
}

PF_ISA_END
#else

float softmax_forward_step(float*, float*, int64_t, int64_t, float, const float*, float&, float&, KeepRow<float>) {
  return 1.f;
}
float softmax_forward_step(float*, c10::BFloat16*, int64_t, int64_t, float, const float*, float&, float&,
                           KeepRow<float>) {
  return 1.f;
}
void softmax_backward_step(float*, float*, int64_t, int64_t, float, const float*, float, float, float,
                           KeepRow<float>) {}

#endif

}  // namespace perceiver_fast::cpu::avx512
