// AVX-512 versions of the float32 -> bfloat16 operand writes of the bf16 and split-bf16 kernels
// (the backward's P and dS, a quarter of its time when scalar) and of the K/V tile packing: the
// same round-to-nearest-even as c10::BFloat16, NaN to its quiet NaN, 16 values at a time. Called
// only where vector_paths.h says the CPU has AVX-512.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace perceiver_fast::cpu::avx512 {

// dst = VNNI-2 packing of src (k_rows x n floats, rows ld apart) as bfloat16: row pairs
// interleaved element by element, an odd last row paired with zeros (TileGemm::pack_rows).
void pack_rows_vnni(const float* src, int64_t ld, int64_t k_rows, int64_t n, c10::BFloat16* dst);

// The split bfloat16 forms of float32 values (tile_gemm.h, SplitBF16): convert_row_split writes
// the A operand form (hi, hi, lo) of src[0..n) as 3n halves; pack_rows_split_vnni the VNNI-2 B
// packing of src (k_rows x n, rows ld apart) as bfloat16 rows (hi, lo, hi) per source row, k_rows
// padded to even with zeros: 3 * padded(k_rows) / 2 rows of n words.
void convert_row_split(const float* src, int64_t n, uint16_t* dst);
void pack_rows_split_vnni(const float* src, int64_t ld, int64_t k_rows, int64_t n, uint32_t* dst);

// dst[j] = bfloat16(src[j]) for j < n.
void convert_row(const float* src, int64_t n, c10::BFloat16* dst);

// The transpose of a matrix of 32-bit words, 16 x 16 blocks in registers: src has n rows, `ld_bytes`
// apart, each of `halves` 16-bit values (a float32 row of k: 2k halves; a bfloat16 row of k: k, an
// odd k's last word completed with 0); dst word (w, j) is at dst[w * n + j]. This is
// TileGemm::pack_transposed for float32 (plain) and bfloat16 (VNNI-2: word w = elements 2w, 2w + 1).
void transpose_words(const void* src, int64_t ld_bytes, int64_t n, int64_t halves, uint32_t* dst);

}  // namespace perceiver_fast::cpu::avx512
