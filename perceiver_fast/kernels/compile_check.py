"""Compiles every Triton kernel in every block configuration the launchers can pick, for a GPU.

The Triton interpreter accepts programs the GPU compiler rejects (dot operands under 16,
too much shared memory), so this check compiles each (kernel, tiles, dtype, flags) for
an NVIDIA target without needing a GPU, prints registers / shared memory / spill bytes
per configuration, and fails on a compile error or on shared memory above the target's
limit. Run: `python -m perceiver_fast.kernels.compile_check` (or `perceiver-fast check`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# Opt-in shared memory per block (bytes) by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
HALF_DTYPES = ("fp16", "bf16")


@dataclass(frozen=True)
class Job:
    kernel: str
    label: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int


def _strides(prefix: str, dims: str, last_unit: bool) -> list[tuple[str, str]]:
    names = [f"stride_{prefix}{d}" for d in dims]
    # Unit strides are specialised to constants at launch; mirror that here.
    return [(n, "constexpr" if last_unit and i == len(names) - 1 else "i32") for i, n in enumerate(names)]


def _unit(names):
    return [(n, 1) for n, t in names if t == "constexpr"]


def _attention_jobs(kernel, configs, pointers, strides, scalars, variants):
    """Jobs for one attention kernel: each config, each of its dtypes, each (flags, out dtype) variant.

    `pointers(dtype, out_dtype)` lists the pointer arguments; `variants(dtype)` yields
    ((HAS_KEY_MASK, CAUSAL, NORMALIZE), out_dtype) pairs.
    """
    stride_sig = sum((_strides(prefix, dims, True) for prefix, dims in strides), [])
    jobs = []
    for kind, fp32, cfg in configs:
        for dtype in (("fp32",) if fp32 else HALF_DTYPES):
            for flags, out_dtype in variants(dtype):
                const = dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_DQK=cfg.block_dqk,
                             BLOCK_DV=cfg.block_dv, HAS_KEY_MASK=flags[0], CAUSAL=flags[1], NORMALIZE=flags[2],
                             INPUT_PRECISION="ieee" if fp32 else "tf32", INTERPRETED_BF16=False)
                sig = (pointers(dtype, out_dtype) + stride_sig + [(n, "i32") for n in ("H", "N", "M", "DQK", "DV")]
                       + scalars + [(k, "constexpr") for k in const])
                label = (f"{kind:6s} {dtype:4s} mask={int(flags[0])} causal={int(flags[1])} norm={int(flags[2])} out={out_dtype:4s} "
                         f"N{cfg.block_n} M{cfg.block_m} Dqk{cfg.block_dqk} Dv{cfg.block_dv}")
                jobs.append(Job(kernel, label, tuple(sig), tuple(_unit(stride_sig)) + tuple(const.items()),
                                cfg.num_warps, cfg.num_stages))
    return jobs


def forward_jobs():
    from . import tiles

    return _attention_jobs(
        "_attention_forward_kernel", tiles.all_configs()[0],
        lambda dt, out: [("Q", f"*{dt}"), ("K", f"*{dt}"), ("V", f"*{dt}"), ("KeyMask", "*i1"),
                         ("Out", f"*{out}"), ("Lse", "*fp32"), ("Mean", "*fp32"), ("Rstd", "*fp32")],
        [("q", "bhnd"), ("k", "bhmd"), ("v", "bhmd"), ("mask", "bm"), ("o", "sbhnd"), ("l", "sbhn")],
        [("qk_scale_log2", "fp32"), ("keys_per_split", "i32"), ("num_dv_blocks", "i32")],
        # Without splits the kernel writes the output dtype, with splits fp32 partials.
        lambda dt: [((True, True, True), dt), ((False, False, False), "fp32")])


def backward_jobs():
    from . import tiles

    return _attention_jobs(
        "_attention_backward_kernel", tiles.all_configs()[1],
        lambda dt, out: [("Q", f"*{dt}"), ("K", f"*{dt}"), ("V", f"*{dt}"), ("KeyMask", "*i1"), ("DOut", f"*{dt}"),
                         ("Lse", "*fp32"), ("Delta", "*fp32"), ("DQ", "*fp32"), ("DK", f"*{out}"),
                         ("DV_", f"*{out}"), ("Mean", "*fp32"), ("Rstd", "*fp32")],
        [("q", "bhnd"), ("k", "bhmd"), ("v", "bhmd"), ("mask", "bm"), ("do", "bhnd"), ("dq", "bhnd"),
         ("dk", "bhmd"), ("dv", "bhmd")],
        [("scale", "fp32"), ("qk_scale_log2", "fp32"), ("num_d_blocks", "i32")],
        lambda dt: [((True, True, True), dt), ((False, False, False), dt)])


def small_kernel_jobs():
    from . import tiles
    from .layer_norm_stats import BLOCK_C, BLOCK_ROWS

    jobs = []
    for block_dv in tiles.HEAD_TILES:
        for dtype in ("fp32",) + HALF_DTYPES:
            strides = _strides("p", "sbhnd", True) + [(f"stride_pl{d}", "i32") for d in "sbh"] \
                + _strides("o", "bhnd", True) + [("stride_lb", "i32"), ("stride_lh", "i32")]
            sig = [("PartOut", "*fp32"), ("PartLse", "*fp32"), ("Out", f"*{dtype}"), ("Lse", "*fp32")] + strides \
                + [(n, "i32") for n in ("H", "N", "DV", "num_splits", "num_dv_blocks")] \
                + [("BLOCK_N", "constexpr"), ("BLOCK_DV", "constexpr"), ("INTERPRETED_BF16", "constexpr")]
            const = dict(BLOCK_N=tiles.ROW_BLOCK, BLOCK_DV=block_dv, INTERPRETED_BF16=False)
            jobs.append(Job("_merge_splits_kernel", f"{dtype:4s} Dv{block_dv}", tuple(sig),
                            tuple(_unit(strides)) + tuple(const.items()), 4, 1))
            strides = _strides("o", "bhnd", True) + _strides("do", "bhnd", True)
            sig = [("Out", f"*{dtype}"), ("DOut", f"*{dtype}"), ("Delta", "*fp32")] + strides \
                + [(n, "i32") for n in ("H", "N", "DV")] + [("BLOCK_N", "constexpr"), ("BLOCK_DV", "constexpr")]
            jobs.append(Job("_row_dot_kernel", f"{dtype:4s} Dv{block_dv}", tuple(sig),
                            tuple(_unit(strides)) + (("BLOCK_N", const["BLOCK_N"]), ("BLOCK_DV", block_dv)), 4, 1))
    for dtype in ("fp32",) + HALF_DTYPES:
        strides = _strides("x", "bmc", True)
        sig = [("X", f"*{dtype}"), ("Mean", "*fp32"), ("Rstd", "*fp32")] + strides \
            + [("M", "i32"), ("C", "i32"), ("eps", "fp32"), ("BLOCK_ROWS", "constexpr"), ("BLOCK_C", "constexpr")]
        jobs.append(Job("_layer_norm_stats_kernel", dtype, tuple(sig),
                        tuple(_unit(strides)) + (("BLOCK_ROWS", BLOCK_ROWS), ("BLOCK_C", BLOCK_C)), 4, 1))
    return jobs


def _kernel(name: str):
    from .attention_backward import _attention_backward_kernel, _row_dot_kernel
    from .attention_forward import _attention_forward_kernel, _merge_splits_kernel
    from .layer_norm_stats import _layer_norm_stats_kernel

    return {k.__name__: k for k in (_attention_forward_kernel, _merge_splits_kernel, _attention_backward_kernel,
                                     _row_dot_kernel, _layer_norm_stats_kernel)}[name]


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def compile_job(job: Job, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"kernel": job.kernel, "label": job.label, "warps": job.num_warps, "stages": job.num_stages}
    try:
        src = ASTSource(fn=_kernel(job.kernel), signature=dict(job.signature), constexprs=dict(job.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as exc:  # any compiler failure is the finding this check exists to report
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    result["shared"] = compiled.metadata.shared
    tool = _cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
        if found:
            result["regs"], result["spill_bytes"] = int(found.group(1)), int(found.group(2))
    return result


def run_check(arch: int = 90, workers: int | None = None) -> int:
    jobs = forward_jobs() + backward_jobs() + small_kernel_jobs()
    limit = SHARED_MEMORY_LIMIT.get(arch)
    print(f"compiling {len(jobs)} kernel configurations for sm_{arch} "
          f"(shared memory limit {limit if limit else 'unknown'} bytes)", flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=workers or min(2, os.cpu_count() or 1)) as pool:
        for r in pool.map(compile_job, jobs, [arch] * len(jobs)):
            if "error" in r:
                failures += 1
                print(f"FAIL {r['kernel']:28s} {r['label']}  {r['error']}", flush=True)
                continue
            problems = []
            if limit and r["shared"] > limit:
                failures += 1
                problems.append(f"shared memory {r['shared']} > {limit}")
            if r.get("spill_bytes"):
                problems.append("spills")
            status = "FAIL" if limit and r["shared"] > limit else "ok  "
            print(f"{status} {r['kernel']:28s} {r['label']}  warps={r['warps']} stages={r['stages']} "
                  f"regs={r.get('regs', '?')} shared={r['shared']} spill_bytes={r.get('spill_bytes', '?')}"
                  f"{'  <- ' + ', '.join(problems) if problems else ''}", flush=True)
    print(f"compile check: {len(jobs) - failures} passed, {failures} failed")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90 = H100/H200)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: up to 2)")
    args = parser.parse_args(argv)
    return run_check(args.arch, args.workers)


if __name__ == "__main__":
    sys.exit(main())
