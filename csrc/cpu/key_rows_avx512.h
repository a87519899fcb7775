// AVX-512 versions of key_rows.h for float32 and bfloat16 rows (compiled for AVX-512 in their own
// file, called only where vector_paths.h says the CPU has it).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace perceiver_fast::cpu::avx512 {

void dot_rows(const float* q, const float* k, int64_t stride, int64_t count, int64_t dim, float* scores);
void dot_rows(const float* q, const c10::BFloat16* k, int64_t stride, int64_t count, int64_t dim, float* scores);
void accumulate_rows(const float* p, const float* v, int64_t stride, int64_t count, int64_t dim, float* acc);
void accumulate_rows(const float* p, const c10::BFloat16* v, int64_t stride, int64_t count, int64_t dim, float* acc);

}  // namespace perceiver_fast::cpu::avx512
