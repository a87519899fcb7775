// Which row code runs with AVX-512: the few-query rows and the packing need AVX-512 F/BW/VL/DQ; the
// softmax steps need AVX512-BF16 too (they store bfloat16 probabilities with it). Tests can force
// the portable loops everywhere, to cover the code other CPUs take.
#pragma once

namespace perceiver_fast::cpu {

bool avx512_rows_supported();  // whether this CPU has what the AVX-512 row code needs
bool use_avx512_rows();
bool use_avx512_bf16_rows();
void set_portable_rows(bool portable);
bool portable_rows_forced();

}  // namespace perceiver_fast::cpu
