// AVX-512 Philox for dropout_keep_bits: 16 counters (64 keys) per step. Compiled for AVX-512 alone,
// like softmax_rows_avx512.cpp; called only where the CPU has AVX-512 and BMI2.
#pragma once

#include <cstdint>

namespace perceiver_fast::cpu::avx512 {

// words[w] gets the keep bits of keys first_key + 64 w ... (first_key a multiple of 4) for `count`
// keys, bits past count left as the Philox gave them.
void philox_keep_words(uint32_t k0, uint32_t k1, uint32_t row, uint32_t head, uint32_t offset, uint32_t threshold,
                       int64_t first_key, int64_t count, uint64_t* words);

}  // namespace perceiver_fast::cpu::avx512
