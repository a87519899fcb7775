"""What the benchmark scripts share: the reference providers, timing, and the machine record."""

from __future__ import annotations

import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
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


def peak_extra_mib(call):
    """(result, MiB): one call's resident-set peak above the resident set before it.

    Memory freed by earlier calls is first handed back to the system, so it cannot hide this
    call's use; the high-water mark is reset through /proc/self/clear_refs (Linux).
    """
    release_freed_memory()
    baseline = memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = call()
    return result, (memory_kib("VmHWM") - baseline) / 1024


def run_in_subprocess(script: str, job: dict) -> dict:
    """Runs `script --job <json>` (one measurement in a fresh process) and returns the JSON it prints last;
    on failure the job with an "error" entry."""
    proc = subprocess.run([sys.executable, script, "--job", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()
        return {**job, "error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(out_dir: str, name: str, info: dict, rows: list[dict], write_markdown) -> None:
    """<out_dir>/<name>.json (machine and rows) and <name>.md (by write_markdown(path, info, rows))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=1))
    write_markdown(out / f"{name}.md", info, rows)
    print(f"wrote {out / name}.md and {out / name}.json")
