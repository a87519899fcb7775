"""Peak memory of one call, as the benchmark engine and the profiler measure it. CUDA: torch.cuda.max_memory_allocated above what was allocated before.
CPU: the process's resident-set peak above its resident set before the call (Linux /proc), with
freed memory handed back to the system first so that it cannot hide this call's use."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch

CPU_METHOD = ("resident-set peak (VmHWM, reset through /proc/self/clear_refs) during one call above the resident "
              "set before it, malloc set to return freed blocks above 128 KiB to the system")
CUDA_METHOD = "torch.cuda.max_memory_allocated during one call above the memory allocated before it"


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory() -> None:
    """From now on malloc returns blocks above 128 KiB to the system when they are freed."""
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    libc.malloc_trim(0)


def allocator_for_timing() -> None:
    """From now on malloc behaves as it settles in a long run: blocks up to 32 MiB come from the heap
    and stay there when freed (the ceiling glibc's dynamic mmap threshold grows to on 64-bit), the heap
    trimmed above 64 MiB. After release_freed_memory every larger block would pay its page faults
    again at each call, which slows allocation-heavy code by a third (HF training steps, measured)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 64 * 2**20)


def peak_extra_mib(call, device: str = "cpu"):
    """(result, MiB): the peak memory of call() above the memory in use before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - base) / 2**20
    release_freed_memory()
    baseline = memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = call()
    return result, (memory_kib("VmHWM") - baseline) / 1024


def tensors_mib(value) -> float:
    """MiB of the tensors in value: a tensor, or lists and tuples of them (None counts nothing)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() / 2**20
    if isinstance(value, (list, tuple)):
        return sum(tensors_mib(v) for v in value)
    return 0.0
