#include "dropout.h"

#include <algorithm>
#include <vector>

#include "dropout_avx512.h"
#include "dropout_simd.h"
#include "vector_paths.h"

namespace perceiver_fast::cpu {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53, kRoundB = 0xCD9E8D57, kKeyA = 0x9E3779B9, kKeyB = 0xBB67AE85;

void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = uint64_t(kRoundA) * c[0], b = uint64_t(kRoundB) * c[2];
    const uint32_t c0 = uint32_t(b >> 32) ^ c[1] ^ k0, c2 = uint32_t(a >> 32) ^ c[3] ^ k1;
    c[0] = c0;
    c[1] = uint32_t(b);
    c[2] = c2;
    c[3] = uint32_t(a);
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

void keep_words_portable(uint32_t k0, uint32_t k1, uint32_t row, uint32_t head, uint32_t offset, uint32_t threshold,
                         int64_t first_key, int64_t count, uint64_t* words) {
  std::fill_n(words, (count + 63) / 64, uint64_t(0));
  for (int64_t g = 0; g * 4 < count; ++g) {
    uint32_t c[4] = {uint32_t((first_key >> 2) + g), row, head, offset};
    philox(c, k0, k1);
    for (int r = 0; r < 4; ++r) {
      const int64_t bit = g * 4 + r;
      if (c[r] >= threshold) words[bit / 64] |= uint64_t(1) << (bit % 64);
    }
  }
}

}  // namespace

void dropout_keep_bits(const Dropout& d, int64_t head, int64_t row, int64_t key_start, int64_t count,
                       uint64_t* words) {
  // Philox words come four keys at a time from a multiple of 4: generate from there, then shift.
  const int64_t first = key_start & ~int64_t(3), shift = key_start - first, total = count + shift;
  const int64_t used = (count + 63) / 64;
  words[used] = 0;  // read by the shift below when the generated bits fit in `used` words
  const auto k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32), global_row = uint32_t(d.row_offset + row);
  if (use_avx512_philox()) {
    avx512::philox_keep_words(k0, k1, global_row, uint32_t(head), d.offset, d.threshold, first, total, words);
  } else if (use_simd_rows()) {
    simd::philox_keep_words(k0, k1, global_row, uint32_t(head), d.offset, d.threshold, first, total, words);
  } else {
    keep_words_portable(k0, k1, global_row, uint32_t(head), d.offset, d.threshold, first, total, words);
  }
  if (shift) {
    for (int64_t w = 0; w < used; ++w) words[w] = (words[w] >> shift) | (words[w + 1] << (64 - shift));
  }
  if (count % 64) words[used - 1] &= (uint64_t(1) << (count % 64)) - 1;
  words[used] = 0;
}

}  // namespace perceiver_fast::cpu
