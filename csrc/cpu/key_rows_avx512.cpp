#include "key_rows_avx512.h"

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)  // GCC and clang
#include <immintrin.h>
#define PF_HAVE_AVX512 1
#endif

#include "isa_target.h"

namespace perceiver_fast::cpu::avx512 {

#ifdef PF_HAVE_AVX512
PF_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace {

// 16 values from d on (fewer at the row's end: `mask`), widened to float32.
inline __m512 load(const float* row, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, row); }
inline __m512 load(const c10::BFloat16* row, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, row);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The lanes of 16 that hold one of the `left` values still to go.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Rows ahead to prefetch: a decode step is one stream of K rows, then one of V rows, per tile, and
// a core's own misses in flight bound its bandwidth; the hardware prefetcher alone left it at 14 GB/s.
constexpr int64_t kPrefetchRows = 16;

// The row `ahead` rows after `row`: past the last key of a tile it is the next tile's (the stream
// goes on), past the tensor's end an address prefetching ignores; formed as an integer, not by
// pointer arithmetic, which may not leave the array.
template <typename T>
inline void prefetch_row(const T* row, int64_t ahead, int64_t stride, int64_t dim) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(row) + uintptr_t(ahead * stride * int64_t(sizeof(T)));
  for (int64_t b = 0; b < dim * int64_t(sizeof(T)); b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(start + uintptr_t(b)), _MM_HINT_T0);
  }
}

template <typename T>
void dot_rows_impl(const float* q, const T* k, int64_t stride, int64_t count, int64_t dim, float* scores) {
  // Four keys at a time: four independent FMA chains hide the FMA latency.
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const T* r = k + j * stride;
    for (int64_t ahead = kPrefetchRows; ahead < kPrefetchRows + 4; ++ahead) prefetch_row(r, ahead, stride, dim);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 m = tail_mask(dim - d);
      const __m512 x = _mm512_maskz_loadu_ps(m, q + d);
      a0 = _mm512_fmadd_ps(x, load(r + d, m), a0);
      a1 = _mm512_fmadd_ps(x, load(r + stride + d, m), a1);
      a2 = _mm512_fmadd_ps(x, load(r + 2 * stride + d, m), a2);
      a3 = _mm512_fmadd_ps(x, load(r + 3 * stride + d, m), a3);
    }
    scores[j] = _mm512_reduce_add_ps(a0);
    scores[j + 1] = _mm512_reduce_add_ps(a1);
    scores[j + 2] = _mm512_reduce_add_ps(a2);
    scores[j + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; j < count; ++j) {
    const T* r = k + j * stride;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 m = tail_mask(dim - d);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load(r + d, m), a);
    }
    scores[j] = _mm512_reduce_add_ps(a);
  }
}

template <typename T>
void accumulate_rows_impl(const float* p, const T* v, int64_t stride, int64_t count, int64_t dim, float* acc) {
  // 64 output values held in registers over every key, then the next 64.
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {
    const __mmask16 m0 = tail_mask(dim - d0), k1 = tail_mask(dim - d0 - 16), k2 = tail_mask(dim - d0 - 32),
                    k3 = tail_mask(dim - d0 - 48);
    __m512 a0 = _mm512_maskz_loadu_ps(m0, acc + d0), a1 = _mm512_maskz_loadu_ps(k1, acc + d0 + 16),
           a2 = _mm512_maskz_loadu_ps(k2, acc + d0 + 32), a3 = _mm512_maskz_loadu_ps(k3, acc + d0 + 48);
    for (int64_t j = 0; j < count; ++j) {
      if (d0 == 0) prefetch_row(v, j + kPrefetchRows, stride, dim);
      if (p[j] == 0) continue;  // masked, dropped or underflowed
      const __m512 w = _mm512_set1_ps(p[j]);
      const T* r = v + j * stride + d0;
      a0 = _mm512_fmadd_ps(w, load(r, m0), a0);
      if (k1) a1 = _mm512_fmadd_ps(w, load(r + 16, k1), a1);
      if (k2) a2 = _mm512_fmadd_ps(w, load(r + 32, k2), a2);
      if (k3) a3 = _mm512_fmadd_ps(w, load(r + 48, k3), a3);
    }
    _mm512_mask_storeu_ps(acc + d0, m0, a0);
    _mm512_mask_storeu_ps(acc + d0 + 16, k1, a1);
    _mm512_mask_storeu_ps(acc + d0 + 32, k2, a2);
    _mm512_mask_storeu_ps(acc + d0 + 48, k3, a3);
  }
}

}  // namespace

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

PF_ISA_END
#else  // not x86-64 GCC/Clang: never called (vector_paths.h finds no AVX-512 there)

void dot_rows(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void dot_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*) {}
void accumulate_rows(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void accumulate_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace perceiver_fast::cpu::avx512
