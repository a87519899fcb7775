#include "dropout_avx512.h"

#if defined(__GNUC__) && defined(__x86_64__)  // GCC and clang
#include <immintrin.h>
#define PF_HAVE_AVX512 1
#endif

#include "isa_target.h"

namespace perceiver_fast::cpu::avx512 {

#ifdef PF_HAVE_AVX512
PF_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,bmi2")

namespace {

// High and low 32 bits of a * b per lane: even lanes from one 32x32->64 multiply, odd from another.
inline void multiply(__m512i a, __m512i b, __m512i& high, __m512i& low) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  high = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  low = _mm512_mullo_epi32(a, b);
}

}  // namespace

void philox_keep_words(uint32_t k0, uint32_t k1, uint32_t row, uint32_t head, uint32_t offset, uint32_t threshold,
                       int64_t first_key, int64_t count, uint64_t* words) {
  const __m512i round_a = _mm512_set1_epi32(int(0xD2511F53)), round_b = _mm512_set1_epi32(int(0xCD9E8D57));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i limit = _mm512_set1_epi32(int(threshold));
  for (int64_t w = 0; w * 64 < count; ++w) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t((first_key >> 2) + w * 16))), lanes);
    __m512i c1 = _mm512_set1_epi32(int(row)), c2 = _mm512_set1_epi32(int(head)), c3 = _mm512_set1_epi32(int(offset));
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i high_a, low_a, high_b, low_b;
      multiply(round_a, c0, high_a, low_a);
      multiply(round_b, c2, high_b, low_b);
      c0 = _mm512_xor_si512(_mm512_xor_si512(high_b, c1), _mm512_set1_epi32(int(key0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(high_a, c3), _mm512_set1_epi32(int(key1)));
      c1 = low_b;
      c3 = low_a;
      key0 += 0x9E3779B9;
      key1 += 0xBB67AE85;
    }
    // Lane g holds the words of keys 4g..4g+3 of this 64: scatter each word's keep bit to 4g + r.
    const uint64_t keep0 = _mm512_cmpge_epu32_mask(c0, limit), keep1 = _mm512_cmpge_epu32_mask(c1, limit);
    const uint64_t keep2 = _mm512_cmpge_epu32_mask(c2, limit), keep3 = _mm512_cmpge_epu32_mask(c3, limit);
    words[w] = _pdep_u64(keep0, 0x1111111111111111ull) | _pdep_u64(keep1, 0x2222222222222222ull) |
               _pdep_u64(keep2, 0x4444444444444444ull) | _pdep_u64(keep3, 0x8888888888888888ull);
  }
}

PF_ISA_END
#else

void philox_keep_words(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, int64_t, int64_t, uint64_t*) {}

#endif

}  // namespace perceiver_fast::cpu::avx512
