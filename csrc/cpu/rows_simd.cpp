#include "rows_simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd_set.h"

namespace perceiver_fast::cpu::simd {

#ifdef PF_SIMD
PF_SIMD_BEGIN
constexpr int kLanes = PF_SIMD_LANES;

namespace {

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// The few operations the vector types lack, per instruction set. max(a, b) is NaN where b is (and
// may be either where only a is); min's NaN lanes are unspecified (callers check NaN themselves).
inline vfloat fma(vfloat a, vfloat b, vfloat c) {
#if defined(PF_SIMD_X86)
  return _mm256_fmadd_ps(a, b, c);
#else
  return vfmaq_f32(c, a, b);
#endif
}
inline vfloat max(vfloat a, vfloat b) {
#if defined(PF_SIMD_X86)
  return _mm256_max_ps(a, b);
#else
  return vmaxq_f32(a, b);
#endif
}
inline vfloat min(vfloat a, vfloat b) {
#if defined(PF_SIMD_X86)
  return _mm256_min_ps(a, b);
#else
  return vminnmq_f32(a, b);
#endif
}
// kLanes bfloat16 values widened to float32 (their bits are float32's upper half).
inline vfloat load(const c10::BFloat16* src) {
#if defined(PF_SIMD_X86)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16));
#else
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(src)), 16));
#endif
}

// r[i] = column i of the kLanes x kLanes block whose rows were r[0 .. kLanes).
inline void transpose_block(vfloat* r) {
#if defined(PF_SIMD_X86)
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int q = 0; q < 8; q += 4) {  // per 128-bit half: s[q + c] holds column c of rows q .. q + 3
    s[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
    s[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
    s[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    s[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
#else
  const float32x4_t t0 = vtrn1q_f32(r[0], r[1]), t1 = vtrn2q_f32(r[0], r[1]), t2 = vtrn1q_f32(r[2], r[3]),
                    t3 = vtrn2q_f32(r[2], r[3]);
  auto pairs = [](float32x4_t x) { return vreinterpretq_f64_f32(x); };
  r[0] = vreinterpretq_f32_f64(vtrn1q_f64(pairs(t0), pairs(t2)));
  r[1] = vreinterpretq_f32_f64(vtrn1q_f64(pairs(t1), pairs(t3)));
  r[2] = vreinterpretq_f32_f64(vtrn2q_f64(pairs(t0), pairs(t2)));
  r[3] = vreinterpretq_f32_f64(vtrn2q_f64(pairs(t1), pairs(t3)));
#endif
}

inline vfloat load(const float* src) {
  vfloat v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}
inline void store(float* dst, vfloat v) { std::memcpy(dst, &v, sizeof(v)); }
inline void store(float* dst, vfloat v, int64_t count) {  // the first min(count, kLanes) lanes
  if (count >= kLanes) return store(dst, v);
  float lanes[kLanes];
  store(lanes, v);
  std::copy_n(lanes, count, dst);
}
inline vfloat splat(float x) { return vfloat{} + x; }
// a where mask (all bits set), else b.
inline vfloat select(vint mask, vfloat a, vfloat b) { return (vfloat)((mask & (vint)a) | (~mask & (vint)b)); }

inline float sum_lanes(vfloat v) {
  float lanes[kLanes], s = 0;
  store(lanes, v);
  for (float x : lanes) s += x;
  return s;
}
inline float max_lanes(vfloat v) {
  float lanes[kLanes], m = -INFINITY;
  store(lanes, v);
  for (float x : lanes) m = std::max(m, x);
  return m;
}
inline bool any(vint mask) {
#if defined(PF_SIMD_X86)
  return _mm256_movemask_ps((__m256)mask) != 0;
#else
  return vmaxvq_u32((uint32x4_t)mask) != 0;
#endif
}

// 2^x for x <= kLazyRescale: x = n + f with f in [-0.5, 0.5], the degree-5 minimax polynomial of the
// AVX-512 rows for 2^f (relative error 8e-8), 2^n from n's exponent bits. x <= -126.5 (masked keys:
// -inf) gives exactly 0; NaN gives NaN.
inline vfloat exp2(vfloat x) {
  x = max(splat(-127.f), x);
  const vfloat magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer, ties to even
  const vfloat n = (x + magic) - magic, f = x - n;
  vfloat p = splat(1.3276369126913237e-3f);
  p = fma(p, f, splat(9.6755066064857080e-3f));
  p = fma(p, f, splat(5.5507132671006450e-2f));
  p = fma(p, f, splat(2.4022120390191450e-1f));
  p = fma(p, f, splat(6.9314696729035060e-1f));
  p = fma(p, f, splat(1.0000000715130866f));
  const vint exponent = (__builtin_convertvector(n, vint) + 127) << 23;  // n = -127: 0
  return p * (vfloat)exponent;
}

// The keep factors of lanes j .. j + kLanes - 1 (j a multiple of kLanes): scale or 0.
inline vfloat keep_factors(const KeepRow<float>& keep, int64_t j) {
  vint bit;
  for (int i = 0; i < kLanes; ++i) bit[i] = 1 << i;
  const vint word = vint{} + int32_t((keep.bits[j >> 6] >> (j & 63)) & ((1u << kLanes) - 1));
  return select((word & bit) != 0, splat(keep.scale), splat(0.f));
}

// The scaled scores of keys j .. j + kLanes - 1: score * scale_log2, or the bias (-inf) where the key
// mask masks the key, whose score is then never read; lanes at or past `valid` are -inf. Every pass
// computes them alike, rounded once, so that x - m is exactly <= 0 against a max of the same values.
inline vfloat scaled_scores(const float* scores, const float* bias, int64_t j, int64_t valid, vfloat c) {
  vfloat x, b;
  if (j + kLanes <= valid) {
    x = load(scores + j) * c;
    if (!bias) return x;
    b = load(bias + j);
  } else {
    float row[kLanes], row_bias[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      row[i] = j + i < valid ? scores[j + i] : 0.f;
      row_bias[i] = j + i < valid ? (bias ? bias[j + i] : 0.f) : -INFINITY;
    }
    x = load(row) * c;
    b = load(row_bias);
  }
  return select(b != 0, b, x);
}

// A row already past its first key may exceed its running max m by this much (base 2) before m
// moves: probabilities up to 2^8 lose nothing in the float32 sums.
constexpr float kLazyRescale = 8.f;

template <typename T>
inline float value(const T* row, int64_t d) { return static_cast<float>(row[d]); }

// Rows ahead to prefetch in the few-query rows (as key_rows_avx512.cpp: one stream of rows per tile).
constexpr int64_t kPrefetchRows = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t ahead, int64_t stride, int64_t dim) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(row) + uintptr_t(ahead * stride * int64_t(sizeof(T)));
  for (int64_t b = 0; b < dim * int64_t(sizeof(T)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(start + uintptr_t(b)));
}

template <typename T>
void dot_rows_impl(const float* q, const T* k, int64_t stride, int64_t count, int64_t dim, float* scores) {
  const int64_t full = dim / kLanes * kLanes;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {  // four keys: four independent FMA chains
    const T* r = k + j * stride;
    for (int64_t ahead = kPrefetchRows; ahead < kPrefetchRows + 4; ++ahead) prefetch_row(r, ahead, stride, dim);
    vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t d = 0; d < full; d += kLanes) {
      const vfloat x = load(q + d);
      a0 = fma(x, load(r + d), a0);
      a1 = fma(x, load(r + stride + d), a1);
      a2 = fma(x, load(r + 2 * stride + d), a2);
      a3 = fma(x, load(r + 3 * stride + d), a3);
    }
    float s[4] = {sum_lanes(a0), sum_lanes(a1), sum_lanes(a2), sum_lanes(a3)};
    for (int64_t d = full; d < dim; ++d) {
      for (int t = 0; t < 4; ++t) s[t] += q[d] * value(r + t * stride, d);
    }
    std::copy_n(s, 4, scores + j);
  }
  for (; j < count; ++j) {
    const T* r = k + j * stride;
    vfloat a = {};
    for (int64_t d = 0; d < full; d += kLanes) a = fma(load(q + d), load(r + d), a);
    float s = sum_lanes(a);
    for (int64_t d = full; d < dim; ++d) s += q[d] * value(r, d);
    scores[j] = s;
  }
}

template <typename T>
void accumulate_rows_impl(const float* p, const T* v, int64_t stride, int64_t count, int64_t dim, float* acc) {
  constexpr int64_t kBlock = 4 * kLanes;  // output values held in registers over every key
  const int64_t full = dim / kBlock * kBlock;
  for (int64_t d0 = 0; d0 < full; d0 += kBlock) {
    vfloat a0 = load(acc + d0), a1 = load(acc + d0 + kLanes), a2 = load(acc + d0 + 2 * kLanes),
           a3 = load(acc + d0 + 3 * kLanes);
    for (int64_t j = 0; j < count; ++j) {
      if (d0 == 0) prefetch_row(v, j + kPrefetchRows, stride, dim);
      if (p[j] == 0) continue;  // masked, dropped or underflowed
      const vfloat w = splat(p[j]);
      const T* r = v + j * stride + d0;
      a0 = fma(w, load(r), a0);
      a1 = fma(w, load(r + kLanes), a1);
      a2 = fma(w, load(r + 2 * kLanes), a2);
      a3 = fma(w, load(r + 3 * kLanes), a3);
    }
    store(acc + d0, a0);
    store(acc + d0 + kLanes, a1);
    store(acc + d0 + 2 * kLanes, a2);
    store(acc + d0 + 3 * kLanes, a3);
  }
  if (full == dim) return;
  for (int64_t j = 0; j < count; ++j) {
    if (full == 0) prefetch_row(v, j + kPrefetchRows, stride, dim);
    if (p[j] == 0) continue;
    const T* r = v + j * stride;
    for (int64_t d = full; d < dim; ++d) acc[d] += p[j] * value(r, d);
  }
}

template <typename S>
void transpose_impl(const S* src, int64_t ld, int64_t n, int64_t k, float* dst) {
  const int64_t n_full = n / kLanes * kLanes, k_full = k / kLanes * kLanes;
  vfloat r[kLanes];
  for (int64_t j0 = 0; j0 < n_full; j0 += kLanes) {
    for (int64_t d0 = 0; d0 < k_full; d0 += kLanes) {
      for (int i = 0; i < kLanes; ++i) r[i] = load(src + (j0 + i) * ld + d0);
      transpose_block(r);
      for (int i = 0; i < kLanes; ++i) store(dst + (d0 + i) * n + j0, r[i]);
    }
    for (int64_t d = k_full; d < k; ++d) {
      for (int64_t j = j0; j < j0 + kLanes; ++j) dst[d * n + j] = value(src + j * ld, d);
    }
  }
  for (int64_t j = n_full; j < n; ++j) {
    for (int64_t d = 0; d < k; ++d) dst[d * n + j] = value(src + j * ld, d);
  }
}

}  // namespace

// As the AVX-512 step (softmax_rows_avx512.cpp): a row with a running max m first takes one pass
// against m, which stands unless a score passes m + kLazyRescale; from there two passes, the max of
// the keys left, then their exponentials against the new running max, the probabilities written
// before rescaled in place. A NaN score makes the row NaN, as in the portable step.
float softmax_forward_step(float* scores, float* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep) {
  const vfloat c = splat(scale_log2);
  // The probabilities of keys j .. j + kLanes (fewer at the row's end) against shift, written.
  auto exponentials = [&](int64_t j, vfloat shift, vfloat& sum) {
    const vfloat p = exp2(scaled_scores(scores, bias, j, valid, c) - shift);
    sum += p;
    store(probs + j, keep.bits ? p * keep_factors(keep, j) : p, valid - j);
  };

  int64_t done = 0;  // keys whose probabilities are written against m
  vfloat sum = {};
  if (m != -INFINITY) {
    const vfloat vm = splat(m), limit = splat(kLazyRescale);
    for (; done < valid; done += kLanes) {
      const vfloat x = scaled_scores(scores, bias, done, valid, c) - vm;
      if (any((x > limit) | (x != x))) break;
      exponentials(done, vm, sum);
    }
    if (done >= valid) {
      std::fill(probs + valid, probs + width, 0.f);
      l += sum_lanes(sum);
      return 1.f;
    }
  }

  vfloat vmax = splat(-INFINITY);
  vint unordered = {};
  for (int64_t j = done; j < valid; j += kLanes) {
    const vfloat x = scaled_scores(scores, bias, j, valid, c);
    vmax = max(vmax, x);
    unordered |= x != x;
  }
  if (any(unordered)) {
    std::fill(probs, probs + valid, NAN);
    std::fill(probs + valid, probs + width, 0.f);
    m = l = NAN;
    return NAN;
  }
  const float m_new = std::max(m, max_lanes(vmax));
  if (m_new == -INFINITY) {  // no key yet (done is 0 here)
    std::fill(probs, probs + width, 0.f);
    return 1.f;
  }
  const float alpha = std::exp2(m - m_new);
  for (int64_t j = 0; j < done; ++j) probs[j] *= alpha;
  sum *= alpha;
  const vfloat vm = splat(m_new);
  for (int64_t j = done; j < valid; j += kLanes) exponentials(j, vm, sum);
  std::fill(probs + valid, probs + width, 0.f);
  l = l * alpha + sum_lanes(sum);
  m = m_new;
  return alpha;
}

void softmax_backward_step(float* scores, float* dprobs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float lse2, float delta, float scale, KeepRow<float> keep) {
  if (lse2 == -INFINITY) valid = 0;
  const vfloat c = splat(scale_log2), vlse = splat(lse2), vdelta = splat(delta), vscale = splat(scale);
  for (int64_t j = 0; j < valid; j += kLanes) {
    // p <= 1: the recomputed scores may round a few ulps above the forward's; a NaN x stays NaN.
    const vfloat x = scaled_scores(scores, bias, j, valid, c) - vlse;
    const vfloat p = select(x != x, x, exp2(min(x, splat(0.f))));
    const vfloat z = keep.bits ? keep_factors(keep, j) : splat(1.f);
    vfloat dp;
    if (j + kLanes <= valid) {
      dp = load(dprobs + j);
    } else {
      float row[kLanes] = {};
      std::copy(dprobs + j, dprobs + valid, row);
      dp = load(row);
    }
    store(scores + j, p * z, valid - j);
    store(dprobs + j, p * (dp * z - vdelta) * vscale, valid - j);
  }
  std::fill(scores + valid, scores + width, 0.f);
  std::fill(dprobs + valid, dprobs + width, 0.f);
}

void dot_rows(const float* q, const float* k, int64_t stride, int64_t count, int64_t dim, float* scores) {
  dot_rows_impl(q, k, stride, count, dim, scores);
}
void dot_rows(const float* q, const c10::BFloat16* k, int64_t stride, int64_t count, int64_t dim, float* scores) {
  dot_rows_impl(q, k, stride, count, dim, scores);
}
void accumulate_rows(const float* p, const float* v, int64_t stride, int64_t count, int64_t dim, float* acc) {
  accumulate_rows_impl(p, v, stride, count, dim, acc);
}
void accumulate_rows(const float* p, const c10::BFloat16* v, int64_t stride, int64_t count, int64_t dim, float* acc) {
  accumulate_rows_impl(p, v, stride, count, dim, acc);
}

void transpose(const float* src, int64_t ld, int64_t n, int64_t k, float* dst) { transpose_impl(src, ld, n, k, dst); }
void transpose(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t k, float* dst) {
  transpose_impl(src, ld, n, k, dst);
}

PF_SIMD_END
#else  // another compiler or architecture: never called (vector_paths.h finds no SIMD level there)

float softmax_forward_step(float*, float*, int64_t, int64_t, float, const float*, float&, float&, KeepRow<float>) {
  return 1.f;
}
void softmax_backward_step(float*, float*, int64_t, int64_t, float, const float*, float, float, float, KeepRow<float>) {}
void dot_rows(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void dot_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*) {}
void accumulate_rows(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void accumulate_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*) {}
void transpose(const float*, int64_t, int64_t, int64_t, float*) {}
void transpose(const c10::BFloat16*, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace perceiver_fast::cpu::simd
