// Whether the AVX-512 row code (softmax steps, the few-query rows, bfloat16 packing) runs: where
// the CPU has it (softmax_rows_avx512.h's `supported`), unless tests force the portable loops to
// cover the code other CPUs take.
#pragma once

namespace perceiver_fast::cpu {

bool use_avx512_rows();
void set_portable_rows(bool portable);
bool portable_rows_forced();

}  // namespace perceiver_fast::cpu
