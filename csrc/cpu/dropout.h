// Attention dropout's random stream (defined in perceiver_fast/dropout.py): Philox4x32-10 keyed by
// the call's seed, with (key / 4, row, flattened head, offset) as the counter, so that the backward
// regenerates the forward's mask from the seed alone, whatever the tiling or thread count.
#pragma once

#include <cstdint>

namespace perceiver_fast::cpu {

struct Dropout {
  double p = 0;  // 0: no dropout
  uint64_t seed = 0;
  uint32_t offset = 0;
  uint32_t threshold = 0;  // a score is kept iff its Philox word >= threshold
  int64_t row_offset = 0;  // problem row of this call's query row 0 (the binding's caller runs rows in chunks)

  bool active() const { return p > 0; }
};

// The keep decisions of keys [key_start, key_start + count) of query row `row` (of this call) in
// flattened head `head` (b * H + h): bit j of words[j / 64] for key key_start + j; bits past count
// are 0. words holds (count + 63) / 64 + 1 values.
void dropout_keep_bits(const Dropout& d, int64_t head, int64_t row, int64_t key_start, int64_t count,
                       uint64_t* words);

inline int64_t keep_words(int64_t keys) { return (keys + 63) / 64 + 1; }

}  // namespace perceiver_fast::cpu
