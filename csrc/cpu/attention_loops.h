// What the forward and backward loops share: loop sizes, causal geometry, key-mask bias.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"

namespace perceiver_fast::cpu {

struct LoopSizes {
  int64_t key_tile, row_block, workers, tiles;
};

enum class Pass { forward, backward };

// Default tiles, measured on a 2-core AMD EPYC (Zen 5, 1 MiB L2 per core) over the Perceiver
// shapes of the cpu-backend benchmark set: float32 streams 128 keys per tile (its score
// block and K/V tiles then stay in L2 beside the queries and accumulator) with all rows of a head
// per GEMM in the forward and 128 in the backward (five GEMMs share the tile there); bfloat16
// halves the bytes and prefers 256 x 256. T: the GEMM operand type (bfloat16 inputs widened to
// float32 GEMMs take float32's tiles).
template <typename T>
LoopSizes loop_sizes(const Shape& s, const Tiling& t, Pass pass) {
  const bool half = sizeof(T) == 2;
  const int64_t default_rows = half ? 256 : (pass == Pass::forward ? 512 : 128);
  const int64_t key_tile = t.key_tile > 0 ? t.key_tile : (half ? 256 : 128);
  const int64_t row_block = t.row_block > 0 ? t.row_block : default_rows;
  const int64_t workers = t.workers > 0 ? t.workers : at::get_num_threads();
  return {key_tile, std::min(row_block, s.queries), workers, (s.keys + key_tile - 1) / key_tile};
}

// Bottom-right causal alignment: query i sees key j iff j <= i + keys - queries.
inline int64_t first_row_seeing(const Shape& s, bool causal, int64_t key) {
  return causal ? std::clamp<int64_t>(key - (s.keys - s.queries), 0, s.queries) : 0;
}

inline int64_t keys_seen(const Shape& s, bool causal, int64_t row, int64_t tile_start, int64_t tile_keys) {
  return causal ? std::clamp<int64_t>(row + s.keys - s.queries - tile_start + 1, 0, tile_keys) : tile_keys;
}

// Cost of each key tile of a head: the query rows that see it.
inline std::vector<int64_t> tile_costs(const Shape& s, bool causal, const LoopSizes& loop) {
  std::vector<int64_t> cost(loop.tiles);
  for (int64_t t = 0; t < loop.tiles; ++t) cost[t] = s.queries - first_row_seeing(s, causal, t * loop.key_tile);
  return cost;
}

// The key mask of one tile as an additive bias (0 or -inf) in `buffer`. Returns null when no key
// of the tile is masked (no bias needed) and sets all_masked when every key is.
template <typename acc_t>
const acc_t* key_mask_bias(const bool* mask_row, int64_t tile_start, int64_t tile_keys, acc_t* buffer,
                           bool& all_masked) {
  all_masked = false;
  if (mask_row == nullptr) return nullptr;
  int64_t kept = 0;
  for (int64_t j = 0; j < tile_keys; ++j) {
    const bool keep = mask_row[tile_start + j];
    buffer[j] = keep ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
    kept += keep;
  }
  all_masked = kept == 0;
  return kept == tile_keys ? nullptr : buffer;
}

}  // namespace perceiver_fast::cpu
