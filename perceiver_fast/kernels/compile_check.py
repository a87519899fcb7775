"""Compiles every Triton kernel in every block configuration the launchers can pick, for a GPU.

The Triton interpreter accepts programs the GPU compiler rejects (dot operands under 16,
too much shared memory), so this check compiles each (kernel, tiles, dtype, flags) for
an NVIDIA target without needing a GPU, prints registers / shared memory / spill bytes
per configuration, and fails on a compile error or on shared memory above the target's
limit. The jobs are not written out by hand: dry runs of the launchers, with recorders standing in
for the kernels, give each launch's arguments, from which its signature follows as Triton forms it.
Run: `python -m perceiver_fast.kernels.compile_check` (or `perceiver-fast check`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton.language as tl

# Opt-in shared memory per block (bytes) by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Job:
    kernel: str
    label: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int


# Kernel modules and the kernels their launchers call, looked up by name in the module.
KERNELS = {"attention_forward": ("_attention_forward_kernel", "_merge_splits_kernel"),
           "attention_backward": ("_row_dot_kernel", "_attention_backward_kernel"),
           "layer_norm": ("_layer_norm_stats_kernel", "_layer_norm_backward_kernel"),
           "projected_input_attention": ("_projected_forward_kernel", "_projected_backward_kernel"),
           "dropout": ("_dropout_mask_kernel",)}
H100_SMS = 132  # the dry runs take the launchers' split decisions as on an H100
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.bool: "*i1",
                 torch.int64: "*i64"}
DROPOUT_P = 0.1  # the dry runs' dropout: its keep threshold fits an i32, as every p below 0.5 gives
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_NUM_STAGES = 3  # Triton's on NVIDIA GPUs, for launches that do not choose
# A launch's signature as Triton forms it: tensors are pointers, floats fp32, integers i32 except
# those equal to 1, which Triton specialises to the constant 1 (unit strides, one block).


def _job(kernel, values: dict, num_warps: int, num_stages: int) -> Job:
    """The compile job of one recorded launch: kernel parameter names with their values' types. (The
    kernels that take a dropout threshold mark it do_not_specialize: its value is never a constant.)"""
    params = inspect.signature(kernel.fn).parameters
    signature, constexprs = [], []
    for name, param in params.items():
        value = values[name]
        if param.annotation is tl.constexpr or "constexpr" in str(param.annotation):
            # The GPU build never runs under the interpreter: its bfloat16 workaround is off.
            value = False if name == "INTERPRETED_BF16" else value
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((name, POINTER_TYPES[value.dtype]))
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        elif value == 1:
            signature.append((name, "constexpr"))
            constexprs.append((name, 1))
        else:
            signature.append((name, "i32"))
    dtype = next(t for n, t in signature if t.startswith("*"))[1:]
    blocks = " ".join(f"{n}={v}" for n, v in constexprs if v is not False and v is not True and v != 1)
    flags = " ".join(f"{n.lower()}={int(v)}" for n, v in constexprs if isinstance(v, bool) and n != "INTERPRETED_BF16")
    label = f"{dtype:4s} {flags} {blocks}".replace("  ", " ")
    return Job(kernel.fn.__name__, label, tuple(signature), tuple(constexprs), num_warps, num_stages)


class _Recorder:
    """Stands in for a kernel during a dry run of its launcher: `kernel[grid](...)` records the launch."""

    def __init__(self, kernel, jobs: list):
        self.kernel, self.jobs = kernel, jobs

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=DEFAULT_NUM_STAGES, **kwargs):
            values = dict(zip(inspect.signature(self.kernel.fn).parameters, args), **kwargs)
            self.jobs.append(_job(self.kernel, values, num_warps, num_stages))
        return launch


@contextlib.contextmanager
def _recording(jobs: list):
    """The kernel modules (and the input attention's launchers) with recorders in place of the kernels."""
    modules = {name: importlib.import_module(f"{__package__}.{name}") for name in (*KERNELS, "input_attention")}
    # Launchers call kernels of other modules by the names they imported them under.
    originals = {(m, k): getattr(modules[m], k) for m in modules for names in KERNELS.values() for k in names
                 if hasattr(modules[m], k)}
    with_sms = [m for m in modules.values() if hasattr(m, "num_sms")]
    num_sms = modules["attention_forward"].num_sms
    try:
        for (module, name), kernel in originals.items():
            setattr(modules[module], name, _Recorder(kernel, jobs))
        for module in with_sms:
            module.num_sms = lambda device: H100_SMS
        yield modules
    finally:
        for (module, name), kernel in originals.items():
            setattr(modules[module], name, kernel)
        for module in with_sms:
            module.num_sms = num_sms


def _dims_hitting_every_tile() -> list[int]:
    """Head dims that give every head tile once (the configs depend on dims only through it), none
    equal to 1 (which Triton would specialise), and 261: several head-dim blocks per program."""
    from . import tiles

    return sorted({min(d for d in range(2, 1025) if tiles.head_tile(d) == t) for t in tiles.HEAD_TILES} | {261})


def launch_jobs() -> list[Job]:
    """Every distinct launch the launchers make, found by dry runs of them on small CPU tensors, as on
    an H100 (132 SMs: the split heuristic decides as there). Nothing runs: recorders stand in for the
    kernels.

    The attention op's launchers, per kind, dtype and pair of head dims: forward with mask and causal
    on and one key split, with both off and two splits (fp32 partials and the merge), and with both on,
    two splits and dropout, each with its backward. The input attention's (cross, the shortcut:
    K = V = x), per dtype and channel count, with and without LayerNorm, mask and causal both on or off,
    and with LayerNorm, mask, causal and dropout: its row statistics, forward and backward. The
    projection method's: with Dqk = Dv = C the same variants, and with LayerNorm, mask and causal
    every other C (its channel tile) and every pair Dqk != Dv. And the debug kernel of the dropout
    mask.
    """
    from . import tiles

    jobs: list[Job] = []
    B, H, N = 2, 2, 20
    seed = torch.zeros(2, dtype=torch.int64)
    with _recording(jobs) as modules:
        forward, backward = modules["attention_forward"].attention_forward, modules["attention_backward"].attention_backward
        for kind, dtype, dqk, dv in itertools.product(tiles.KINDS, FLOAT_DTYPES, _dims_hitting_every_tile(),
                                                      _dims_hitting_every_tile()):
            M = 8 * tiles.forward_config(kind, dqk, dv, dtype == torch.float32).block_m
            q, k, v, dout = (torch.empty(B, H, rows, dim, dtype=dtype)
                             for rows, dim in ((N, dqk), (M, dqk), (M, dv), (N, dv)))
            for flags_on, splits, dropout_p in ((True, 1, 0.0), (False, 2, 0.0), (True, 2, DROPOUT_P)):
                mask = torch.ones(B, M, dtype=torch.bool) if flags_on else None
                out, lse = forward(q, k, v, mask, flags_on, 0.5, kind, splits, dropout_p, seed)
                backward(dout, q, k, v, out, lse, mask, flags_on, 0.5, kind, dropout_p, seed)
        inputs = modules["input_attention"]
        input_variants = (*itertools.product((True, False), (True, False), (0.0,)), (True, True, DROPOUT_P))
        for dtype, channels, (normalize, flags_on, dropout_p) in itertools.product(
                FLOAT_DTYPES, _dims_hitting_every_tile(), input_variants):
            M = 8 * tiles.forward_config("cross", channels, channels, dtype == torch.float32).block_m
            q, x = torch.empty(B, H, N, channels, dtype=dtype), torch.empty(B, M, channels, dtype=dtype)
            mask = torch.ones(B, M, dtype=torch.bool) if flags_on else None
            out, lse = inputs.input_attention_forward(q, x, normalize, 1e-5, mask, flags_on, 0.5, dropout_p, seed)
            inputs.input_attention_backward(torch.empty_like(out), q, x, normalize, 1e-5, out, lse, mask, flags_on, 0.5,
                                            dropout_p, seed)
        projected = modules["projected_input_attention"]
        dims = _dims_hitting_every_tile()
        projection_variants = [(dtype, (d, d), d, variant) for dtype, d, variant in
                               itertools.product(FLOAT_DTYPES, dims, input_variants)]
        projection_variants += [(dtype, (d, d), c, input_variants[0]) for dtype, d, c in
                                itertools.product(FLOAT_DTYPES, dims, dims) if c != d]
        projection_variants += [(dtype, (dqk, dv), dqk, input_variants[0]) for dtype, dqk, dv in
                                itertools.product(FLOAT_DTYPES, dims, dims) if dqk != dv]
        for dtype, (dqk, dv), channels, (normalize, flags_on, dropout_p) in projection_variants:
            M = 8 * tiles.forward_config("cross", dqk, dv, dtype == torch.float32).block_m
            q, x = torch.empty(B, H, N, dqk, dtype=dtype), torch.empty(B, M, channels, dtype=dtype)
            weights = (torch.empty(H * dqk, channels, dtype=dtype), torch.empty(H * dqk, dtype=dtype),
                       torch.empty(H * dv, channels, dtype=dtype), torch.empty(H * dv, dtype=dtype))
            mask = torch.ones(B, M, dtype=torch.bool) if flags_on else None
            out, lse = projected.projected_attention_forward(q, x, normalize, 1e-5, *weights, mask, flags_on, 0.5,
                                                             dropout_p, seed)
            projected.projected_attention_backward(torch.empty_like(out), q, x, normalize, 1e-5, *weights, out, lse,
                                                   mask, flags_on, 0.5, dropout_p, seed)
        modules["dropout"].dropout_keep_mask(seed, B, H, N, 70, DROPOUT_P)
    return list(dict.fromkeys(jobs))


def _kernel(name: str):
    for module, names in KERNELS.items():
        if name in names:
            return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    raise KeyError(name)


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
    jobs = launch_jobs()
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
