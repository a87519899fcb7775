// The SIMD set of the code written over GCC/clang vector types (rows_simd.cpp, dropout_simd.cpp):
// AVX2+FMA on x86-64 (8 float lanes, compiled for it function by function between PF_SIMD_BEGIN and
// PF_SIMD_END, after every #include), NEON on aarch64 (4 lanes, the baseline). PF_SIMD is undefined
// for another compiler or architecture, where vector_paths.h finds no SIMD level.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define PF_SIMD_X86 1
#define PF_SIMD_LANES 8
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
#include <arm_neon.h>
#define PF_SIMD_NEON 1
#define PF_SIMD_LANES 4
#endif

#include "isa_target.h"

#if defined(PF_SIMD_X86)
#define PF_SIMD 1
#define PF_SIMD_BEGIN PF_ISA_BEGIN("avx2,fma")
#define PF_SIMD_END PF_ISA_END
#elif defined(PF_SIMD_NEON)
#define PF_SIMD 1
#define PF_SIMD_BEGIN
#define PF_SIMD_END
#endif
