#include "pack_avx512.h"

#include <algorithm>

#if defined(__GNUC__) && defined(__x86_64__)  // GCC and clang
#include <immintrin.h>
#define PF_HAVE_AVX512 1
#endif

#include "isa_target.h"

namespace perceiver_fast::cpu::avx512 {

#ifdef PF_HAVE_AVX512
PF_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq")

namespace {

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// 16 floats rounded to bfloat16 as c10 rounds (to nearest, ties to even; NaN -> 0x7FC0), each in
// the low 16 bits of its 32-bit lane.
inline __m512i rounded_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// x split into bfloat16 terms: hi = bf16(x), lo = bf16(x - hi) (0 where hi is infinite or NaN), each
// in the low 16 bits of its lane.
inline void split_bf16(__m512 x, __m512i& hi, __m512i& lo) {
  hi = rounded_bf16(x);
  const __m512 hi_value = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(hi_value, hi_value), _mm512_setzero_ps(), _CMP_EQ_OQ);
  lo = _mm512_maskz_mov_epi32(finite, rounded_bf16(_mm512_sub_ps(x, hi_value)));
}

}  // namespace

void convert_row_split(const float* src, int64_t n, uint16_t* dst) {
  // 16 elements are 48 halves (hi, hi, lo each): positions 0..31 and 32..47 gathered from the
  // 32 halves [hi 0..15 | lo 0..15] by two word permutes.
  alignas(64) static const uint16_t order[48] = {
      0,  0,  16, 1,  1,  17, 2,  2,  18, 3,  3,  19, 4,  4,  20, 5,  5,  21, 6,  6,  22, 7,  7,  23,
      8,  8,  24, 9,  9,  25, 10, 10, 26, 11, 11, 27, 12, 12, 28, 13, 13, 29, 14, 14, 30, 15, 15, 31};
  const __m512i first = _mm512_load_si512(order), second = _mm512_castsi256_si512(_mm256_load_si256(
                                                       reinterpret_cast<const __m256i*>(order + 32)));
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    __m512i hi, lo;
    split_bf16(_mm512_maskz_loadu_ps(lanes(count), src + j), hi, lo);
    const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(hi)),
                                              _mm512_cvtepi32_epi16(lo), 1);
    const int64_t out = 3 * count;  // halves to write
    _mm512_mask_storeu_epi16(dst + 3 * j, out >= 32 ? ~__mmask32(0) : (__mmask32(1) << out) - 1,
                             _mm512_permutexvar_epi16(first, halves));
    if (out > 32) {
      _mm256_mask_storeu_epi16(dst + 3 * j + 32, __mmask16((1u << (out - 32)) - 1),
                               _mm512_castsi512_si256(_mm512_permutexvar_epi16(second, halves)));
    }
  }
}

void pack_rows_split_vnni(const float* src, int64_t ld, int64_t k_rows, int64_t n, uint32_t* dst) {
  // Source rows d, d + 1 give bfloat16 rows 3d .. 3d + 5: (hi_d, lo_d, hi_d, hi_d1, lo_d1, hi_d1),
  // i.e. the VNNI words (hi_d, lo_d), (hi_d, hi_d1), (lo_d1, hi_d1); a missing row d + 1 is zero.
  for (int64_t d = 0; d < k_rows; d += 2) {
    const float* row = src + d * ld;
    const float* next = d + 1 < k_rows ? row + ld : nullptr;
    uint32_t* out = dst + (3 * d / 2) * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n - j);
      __m512i hi, lo, hi1 = _mm512_setzero_si512(), lo1 = _mm512_setzero_si512();
      split_bf16(_mm512_maskz_loadu_ps(m, row + j), hi, lo);
      if (next) split_bf16(_mm512_maskz_loadu_ps(m, next + j), hi1, lo1);
      _mm512_mask_storeu_epi32(out + j, m, _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16)));
      _mm512_mask_storeu_epi32(out + n + j, m, _mm512_or_si512(hi, _mm512_slli_epi32(hi1, 16)));
      _mm512_mask_storeu_epi32(out + 2 * n + j, m, _mm512_or_si512(lo1, _mm512_slli_epi32(hi1, 16)));
    }
  }
}

void pack_rows_vnni(const float* src, int64_t ld, int64_t k_rows, int64_t n, c10::BFloat16* dst) {
  for (int64_t r = 0; r < k_rows; r += 2) {
    const float* even = src + r * ld;
    const float* odd = r + 1 < k_rows ? even + ld : nullptr;
    int32_t* out = reinterpret_cast<int32_t*>(dst + r * n);  // one (even, odd) pair per 32-bit word
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n - j);
      __m512i words = rounded_bf16(_mm512_maskz_loadu_ps(m, even + j));
      if (odd) words = _mm512_or_si512(words, _mm512_slli_epi32(rounded_bf16(_mm512_maskz_loadu_ps(m, odd + j)), 16));
      _mm512_mask_storeu_epi32(out + j, m, words);
    }
  }
}

void convert_row(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    _mm256_mask_storeu_epi16(dst + j, m, _mm512_cvtepi32_epi16(rounded_bf16(_mm512_maskz_loadu_ps(m, src + j))));
  }
}

namespace {

// r[i] = column i of the 16 x 16 block whose rows were r[0..15] (32-bit lanes).
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // per 128-bit lane c: r[4q + s] holds column 4c + s of rows 4q .. 4q + 3
  for (int q = 0; q < 4; ++q) {
    __m512* u = t + 4 * q;
    r[4 * q] = _mm512_shuffle_ps(u[0], u[2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * q + 1] = _mm512_shuffle_ps(u[0], u[2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * q + 2] = _mm512_shuffle_ps(u[1], u[3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * q + 3] = _mm512_shuffle_ps(u[1], u[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int s = 0; s < 4; ++s) {
    t[s] = _mm512_shuffle_f32x4(r[s], r[4 + s], 0x88);       // columns s, s + 8 of rows 0..7
    t[4 + s] = _mm512_shuffle_f32x4(r[s], r[4 + s], 0xdd);   // columns s + 4, s + 12 of rows 0..7
    t[8 + s] = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], 0x88);
    t[12 + s] = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], 0xdd);
  }
  for (int s = 0; s < 8; ++s) {
    r[s] = _mm512_shuffle_f32x4(t[s], t[8 + s], 0x88);
    r[8 + s] = _mm512_shuffle_f32x4(t[s], t[8 + s], 0xdd);
  }
}

}  // namespace

void transpose_words(const void* src, int64_t ld_bytes, int64_t n, int64_t halves, uint32_t* dst) {
  const char* base = static_cast<const char*>(src);
  const int64_t words = (halves + 1) / 2;
  __m512 r[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n - j0);
    const __mmask16 row_lanes = lanes(rows);
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t left = halves - 2 * w0;
      const __mmask32 half_lanes = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(half_lanes, base + (j0 + i) * ld_bytes + 4 * w0))
                        : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t columns = std::min<int64_t>(16, words - w0);
      for (int64_t c = 0; c < columns; ++c) {
        _mm512_mask_storeu_epi32(dst + (w0 + c) * n + j0, row_lanes, _mm512_castps_si512(r[c]));
      }
    }
  }
}

PF_ISA_END
#else  // not x86-64 GCC/Clang: never called (vector_paths.h finds no AVX-512 there)

void pack_rows_vnni(const float*, int64_t, int64_t, int64_t, c10::BFloat16*) {}
void convert_row_split(const float*, int64_t, uint16_t*) {}
void pack_rows_split_vnni(const float*, int64_t, int64_t, int64_t, uint32_t*) {}
void convert_row(const float*, int64_t, c10::BFloat16*) {}
void transpose_words(const void*, int64_t, int64_t, int64_t, uint32_t*) {}

#endif

}  // namespace perceiver_fast::cpu::avx512
