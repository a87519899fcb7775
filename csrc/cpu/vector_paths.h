// This CPU's vector instruction sets, probed once, and which row code runs with them: the packing
// and the few-query rows need AVX-512 F/BW/VL/DQ, the softmax steps AVX512-BF16 too (they store
// bfloat16 probabilities with it), the dropout's Philox BMI2 too. The one place that asks the CPU.
// Tests can force the portable loops of the row code, or the paths of a CPU with AVX-512 but no
// AVX512-BF16 (AVX-512 packing, portable softmax steps), to cover the code other CPUs take.
#pragma once

namespace perceiver_fast::cpu {

bool avx512_rows_supported();
bool avx512_bf16_supported();
bool avx512_bmi2_supported();

bool use_avx512_rows();
bool use_avx512_bf16_rows();
void set_portable_rows(bool portable);
bool portable_rows_forced();
void set_without_avx512_bf16(bool without);
bool without_avx512_bf16_forced();

}  // namespace perceiver_fast::cpu
