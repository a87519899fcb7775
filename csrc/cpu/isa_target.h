// Code for an instruction set the build's baseline lacks, compiled for it function by function, the
// same way under GCC and clang (which ignores GCC's target pragma): PF_ISA_BEGIN("avx512f,...") ...
// PF_ISA_END around the definitions, after every #include. Callers reach them only where the CPU
// has the set (vector_paths.h).
#pragma once

#define PF_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define PF_ISA_BEGIN(features) PF_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define PF_ISA_END PF_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define PF_ISA_BEGIN(features) PF_PRAGMA(GCC push_options) PF_PRAGMA(GCC target(features))
#define PF_ISA_END PF_PRAGMA(GCC pop_options)
#endif
