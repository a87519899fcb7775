#include "dropout_simd.h"

#include "simd_set.h"

namespace perceiver_fast::cpu::simd {

#ifdef PF_SIMD
PF_SIMD_BEGIN
constexpr int kLanes = PF_SIMD_LANES;

namespace {

typedef uint32_t vword __attribute__((vector_size(kLanes * sizeof(uint32_t))));
constexpr int kStepsPerWord = 64 / (4 * kLanes);  // each counter gives the words of 4 keys

inline vword splat(uint32_t x) { return vword{} + x; }

// The high and low 32 bits of a * b per lane. The vector types have no widening multiply: x86 takes even
// and odd lanes from two 32x32->64 multiplies, NEON the low and high pairs.
inline void multiply(vword a, vword b, vword& high, vword& low) {
#if defined(PF_SIMD_X86)
  const __m256i even = _mm256_mul_epu32(__m256i(a), __m256i(b));
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(__m256i(a), 32), _mm256_srli_epi64(__m256i(b), 32));
  high = vword(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
#else
  const uint64x2_t first = vmull_u32(vget_low_u32(a), vget_low_u32(b)), second = vmull_high_u32(a, b);
  high = vuzp2q_u32(vreinterpretq_u32_u64(first), vreinterpretq_u32_u64(second));
#endif
  low = a * b;
}

// Bit 4 g + r set where word r of lane g is at least the threshold: lane g holds keys 4g .. 4g+3.
inline uint32_t keep_bits(const vword* c, vword limit) {
  vword bits{};
  for (int r = 0; r < 4; ++r) {
    vword lane_bit;
    for (int g = 0; g < kLanes; ++g) lane_bit[g] = uint32_t(1) << (4 * g + r);
    bits |= vword(c[r] >= limit) & lane_bit;
  }
  uint32_t all = 0;
  for (int g = 0; g < kLanes; ++g) all |= bits[g];
  return all;
}

}  // namespace

void philox_keep_words(uint32_t k0, uint32_t k1, uint32_t row, uint32_t head, uint32_t offset, uint32_t threshold,
                       int64_t first_key, int64_t count, uint64_t* words) {
  vword lanes;
  for (int g = 0; g < kLanes; ++g) lanes[g] = uint32_t(g);
  const vword round_a = splat(0xD2511F53), round_b = splat(0xCD9E8D57), limit = splat(threshold);
  for (int64_t w = 0; w * 64 < count; ++w) {
    uint64_t word = 0;
    for (int step = 0; step < kStepsPerWord; ++step) {
      const auto group = uint32_t((first_key >> 2) + (w * kStepsPerWord + step) * kLanes);
      vword c[4] = {splat(group) + lanes, splat(row), splat(head), splat(offset)};
      uint32_t key0 = k0, key1 = k1;
      for (int round = 0; round < 10; ++round) {
        vword high_a, low_a, high_b, low_b;
        multiply(round_a, c[0], high_a, low_a);
        multiply(round_b, c[2], high_b, low_b);
        c[0] = high_b ^ c[1] ^ key0;
        c[2] = high_a ^ c[3] ^ key1;
        c[1] = low_b;
        c[3] = low_a;
        key0 += 0x9E3779B9;
        key1 += 0xBB67AE85;
      }
      word |= uint64_t(keep_bits(c, limit)) << (step * 4 * kLanes);
    }
    words[w] = word;
  }
}

PF_SIMD_END
#else  // another compiler or architecture: never called (vector_paths.h finds no SIMD level there)

void philox_keep_words(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, int64_t, int64_t, uint64_t*) {}

#endif

}  // namespace perceiver_fast::cpu::simd
