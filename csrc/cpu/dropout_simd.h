// Philox for dropout_keep_bits on CPUs with a SIMD set but no AVX-512: AVX2 on x86-64 (8 counters, 32
// keys, per step), NEON on aarch64 (4 counters, 16 keys). One source over GCC/clang vector types, as
// rows_simd.h; the contract is avx512::philox_keep_words's (dropout_avx512.h).
#pragma once

#include <cstdint>

namespace perceiver_fast::cpu::simd {

void philox_keep_words(uint32_t k0, uint32_t k1, uint32_t row, uint32_t head, uint32_t offset, uint32_t threshold,
                       int64_t first_key, int64_t count, uint64_t* words);

}  // namespace perceiver_fast::cpu::simd
