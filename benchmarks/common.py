"""What the benchmark scripts share: the reference providers, timing, and the machine record."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def eager(q, k, v, causal):
    """Naive attention as the HF and lucidrains Perceivers compute it: the N x M scores materialized."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        N, M = q.shape[2], k.shape[2]
        keep = torch.ones(N, M, dtype=torch.bool, device=q.device).tril(M - N)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q, k, v, causal):
    """PyTorch's scaled_dot_product_attention (its CPU flash kernel), bottom-right causal as ours."""
    mask = None
    if causal:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def median_seconds(call, repeats: int, device: str) -> float:
    call()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
