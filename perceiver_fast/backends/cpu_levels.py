"""How the C++ kernels compared with SDPA at each instruction-set level (csrc/cpu/vector_paths.h), as
the benchmark engine measured them on the cpu-backend set, each level emulated on a Zen 5 by capping
it (`bench --isa`; docs/kernels.md has the tables). pf.explain says it at every level but avx512_bf16.

Auto dispatch runs them at every level all the same. SDPA is not a drop-in for the ops' contract:
measured here, it reads masked keys' values (a NaN in a masked key reaches rows that never see it,
through 0 x NaN), returns a row of zeros for an infinite bfloat16 query where the contract says NaN,
and its gradients overflow to NaN at scales near 1e10 where the kernels' stay finite
(tests/test_non_finite.py). Substituting it where it is faster would make results depend on the CPU.
"""

from __future__ import annotations

from .. import extension

# level -> what its kernels measured against SDPA (every level but avx512_bf16, the Zen 5's own, which is
# faster on every case: 1.16x to 3.96x).
MEASURED = {
    "avx512": "the AVX-512 rows with the SIMD softmax, measured at 0.93x to 1.80x SDPA's forward outside the "
              "machine's slowdowns (a float32 latent forward read 0.93x once in four runs, 1.05x to 1.17x in the "
              "others; D = 261 read 0.74x and 0.94x in slowdowns, 1.38x and 1.54x steady) and 1.44x to 3.19x its "
              "forward+backward",
    "avx2": "the AVX2 rows, measured at 0.89x to 1.45x SDPA's forward (under 0.95x: a bfloat16 latent forward) and "
            "1.07x to 12.4x its forward+backward",
    "portable": "the scalar loops, measured in float32 at 1.07x to 1.19x SDPA's forward and 1.14x to 1.93x its "
                "forward+backward on a CPU without AVX2 (SDPA's kernels scalar too), but at 0.46x to 0.96x and "
                "0.53x to 1.68x where torch's own kernels have AVX2 (a build without vector code, such as MSVC's)",
    "neon": "the NEON rows, whose results pass the contract tests under emulation (make test-aarch64) but whose "
            "speed has not been measured on an ARM CPU",
}


def level_note() -> str | None:
    """What pf.explain says about this process's instruction-set level; None at avx512_bf16, faster than
    SDPA on every case."""
    level = extension.CPU_ISA
    if level not in MEASURED:
        return None
    return f"runs at instruction-set level {level!r}: {MEASURED[level]} (backends/cpu_levels.py)"
