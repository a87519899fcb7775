"""Timing and the machine record of a benchmark run."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def median_seconds(call, repeats: int, device: str) -> float:
    """Median time of a call. CPU: the wall time of `repeats` calls after one untimed call (compilation,
    caches). CUDA: triton.testing.do_bench's median, timed by CUDA events after its warm-up."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(call, return_mode="median") / 1e3
    return statistics.median(timed_seconds(call, repeats, device))


def timed_seconds(call, repeats: int, device: str) -> list[float]:
    """The wall times of `repeats` calls after one untimed call (compilation, caches)."""
    call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(dtype: torch.dtype, device: str) -> float:
    """This machine's rate for one large torch matmul (2048^3), median of 5: a ceiling to read rates against."""
    a = torch.randn(2048, 2048, dtype=dtype, device=device)
    b = torch.randn(2048, 2048, dtype=dtype, device=device)
    return 2 * 2048**3 / median_seconds(lambda: a @ b, 5, device) / 1e9


def read_gbs(device: str) -> float:
    """This machine's memory read rate: one sum over 1 GiB of float32, median of 5 (GB/s). The
    ceiling a memory-bound call (a decode step) is read against."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), 5, device) / 1e9


def machine(device: str, dtypes: dict[str, torch.dtype]) -> dict:
    """What the results depend on: versions, CPU (and its kernel paths), GPU, the matmul rate of each
    dtype and the memory read rate."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "device": device}
    for module in ("triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        from .. import _C

        info["cpu_kernel_paths"] = _C.cpu_features()
    except ImportError:
        info["cpu_kernel_paths"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["matmul_gflops"] = {name: matmul_gflops(dtype, device) for name, dtype in dtypes.items()}
    info["read_gbs"] = read_gbs(device)
    return info
