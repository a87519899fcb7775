// This CPU's vector instruction sets, probed once, and which row code runs with them. The levels,
// each a superset of the one before:
//   x86-64:  portable < avx2 (AVX2+FMA: the SIMD rows, rows_simd.h, and Philox, dropout_simd.h;
//                             oneDNN's float32 brgemm)
//            < avx512 (AVX-512 F/BW/VL/DQ: packing, transposes, few-query rows; Philox with BMI2)
//            < avx512_bf16 (AVX512-BF16: the AVX-512 softmax steps and the bfloat16 brgemm)
//   aarch64: portable < neon (the SIMD rows and Philox)
// The path in use is the lower of the CPU's level and a cap: PERCEIVER_FAST_CPU_ISA, which
// perceiver_fast/extension.py passes to set_isa_cap at import, so every process of a test run, a
// bench case or a user's report runs the same paths. The one place that asks the CPU.
#pragma once

#include <string>
#include <vector>

namespace perceiver_fast::cpu {

enum class Isa : int { portable = 0, simd = 1, avx512 = 2, avx512_bf16 = 3 };

// The level names of this build's architecture, lowest first ("portable", "avx2", ... or
// "portable", "neon"); Isa values index them.
const std::vector<std::string>& isa_names();

Isa detected_isa();  // what the CPU has
Isa active_isa();    // what runs: the detected level, capped
// Caps the level by name (one of isa_names()); throws std::invalid_argument naming the choices.
void set_isa_cap(const std::string& name);
std::string isa_cap();  // the cap's name, or "none"

inline bool use_simd_rows() { return active_isa() >= Isa::simd; }
inline bool use_avx512_rows() { return active_isa() >= Isa::avx512; }
inline bool use_avx512_bf16_rows() { return active_isa() >= Isa::avx512_bf16; }
bool use_avx512_philox();  // AVX-512 rows and BMI2

}  // namespace perceiver_fast::cpu
