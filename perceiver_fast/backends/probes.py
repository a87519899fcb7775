"""How the backends' one-time speed probes time a call (the cpu backend's float32-precision probes,
its linear kernels' GEMM probe)."""

from __future__ import annotations

import time


def median_ms(call, repeats: int = 9) -> float:
    """The median wall time of `repeats` calls after one untimed call, in ms."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3
