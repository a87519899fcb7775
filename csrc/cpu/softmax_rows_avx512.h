// AVX-512 versions of the float32 row steps of softmax_rows.h (compiled for AVX-512 in their own
// file, called only where the CPU has it).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "softmax_rows.h"

namespace perceiver_fast::cpu::avx512 {

float softmax_forward_step(float* scores, float* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep);
float softmax_forward_step(float* scores, c10::BFloat16* probs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float& m, float& l, KeepRow<float> keep);
void softmax_backward_step(float* scores, float* dprobs, int64_t valid, int64_t width, float scale_log2,
                           const float* bias, float lse2, float delta, float scale, KeepRow<float> keep);

}  // namespace perceiver_fast::cpu::avx512
