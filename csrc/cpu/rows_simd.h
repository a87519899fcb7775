// The float32 row code of CPUs with a SIMD set but no AVX-512: AVX2+FMA on x86-64, NEON on aarch64.
// One source (rows_simd.cpp) over GCC/clang vector types, 8 lanes on AVX2 and 4 on NEON; the
// contracts are those of softmax_rows.h and key_rows.h. Called only where vector_paths.h says so.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "softmax_rows.h"

namespace perceiver_fast::cpu::simd {

float softmax_forward_step(float* scores, float* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep);
void softmax_backward_step(float* scores, float* dprobs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float lse2, float delta, float scale, KeepRow<float> keep);

void dot_rows(const float* q, const float* k, int64_t stride, int64_t count, int64_t dim, float* scores);
void dot_rows(const float* q, const c10::BFloat16* k, int64_t stride, int64_t count, int64_t dim, float* scores);
void accumulate_rows(const float* p, const float* v, int64_t stride, int64_t count, int64_t dim, float* acc);
void accumulate_rows(const float* p, const c10::BFloat16* v, int64_t stride, int64_t count, int64_t dim, float* acc);

// dst[d * n + j] = src[j * ld + d] for j < n, d < k: the float32 transpose of n rows of k values
// (TileGemm::pack_transposed and store_transposed of float32 GEMMs), bfloat16 rows widened.
void transpose(const float* src, int64_t ld, int64_t n, int64_t k, float* dst);
void transpose(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t k, float* dst);

}  // namespace perceiver_fast::cpu::simd
