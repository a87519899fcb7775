"""cpu backend vs F.scaled_dot_product_attention vs naive eager attention, side by side on this CPU.

Every (case, dtype, pass, provider) runs in its own process, so that its peak memory can be read
exactly. Times first: the median of the timed repeats after an untimed call, with malloc as it
is. Then glibc's malloc is told to hand every block above 128 KiB straight back to the system
(fixed mmap and trim thresholds, and a trim), so that memory freed by earlier calls cannot hide a
call's use; the process's resident-set high-water mark is reset (/proc/self/clear_refs) and the
peak above the resident set of that moment is recorded over one more call. Writes <out>/cpu-backend.md and cpu-backend.json.

    python benchmarks/cpu_backend.py [--out benchmarks/results] [--repeats 3] [--cases a,b]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import eager, machine, median_seconds, peak_extra_mib, run_in_subprocess, sdpa, write_results

# name: (B, H, N, M, Dqk, Dv); the cases of issue 3, and one latent self-attention layer.
CASES = {
    "b1-h1-m50k-d64": (1, 1, 512, 50176, 64, 64),
    "b1-h8-m50k-d64": (1, 8, 512, 50176, 64, 64),
    "b4-h1-m262k-d64": (4, 1, 256, 262144, 64, 64),
    "b1-h1-m50k-d261": (1, 1, 512, 50176, 261, 261),
    "latent-b8-h8-n512-d64": (8, 8, 512, 512, 64, 64),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("forward", "forward+backward")


def perceiver_fast_cpu(q, k, v, causal):
    import perceiver_fast as pf

    return pf.cross_attention(q, k, v, causal=causal, backend="cpu")


PROVIDERS = {"perceiver_fast[cpu]": perceiver_fast_cpu, "sdpa": sdpa, "eager": eager}


def flops(shape, passes: str) -> float:
    """Matmul FLOPs: 2*B*H*N*M*(Dqk+Dv) forward; the backward's five products add 2.5x that."""
    B, H, N, M, dqk, dv = shape
    forward = 2 * B * H * N * M * (dqk + dv)
    return forward * (3.5 if passes == "forward+backward" else 1.0)


def measure(job: dict) -> dict:
    """Runs one job in this process: the median time, then the peak memory of one more call."""
    shape, dtype = CASES[job["case"]], DTYPES[job["dtype"]]
    B, H, N, M, dqk, dv = shape
    backward = job["pass"] == "forward+backward"
    q, k, v = (torch.randn(B, H, rows, dim, dtype=dtype).requires_grad_(backward)
               for rows, dim in ((N, dqk), (M, dqk), (M, dv)))
    dout = torch.randn(B, H, N, dv, dtype=dtype)
    fn = PROVIDERS[job["provider"]]

    def call():
        if backward:
            out = fn(q, k, v, False)
            return torch.autograd.grad(out, (q, k, v), dout)
        with torch.no_grad():
            return fn(q, k, v, False)

    seconds = median_seconds(call, job["repeats"], "cpu")
    result, peak_mib = peak_extra_mib(call)
    output_bytes = sum(t.numel() * t.element_size() for t in (result if backward else (result,)))
    return {**job, "ms": seconds * 1e3, "gflops": flops(shape, job["pass"]) / seconds / 1e9,
            "peak_extra_mib": peak_mib, "outputs_mib": output_bytes / 2**20}


def run_job(job: dict) -> dict:
    return run_in_subprocess(__file__, job)


def write_markdown(path: Path, info: dict, rows: list[dict]) -> None:
    lines = [
        "# cpu backend benchmark", "",
        f"Machine: {info['cpu']}, {info['cpu_threads']} threads; torch {info['torch']}, Python {info['python']}; "
        f"kernel paths: {info['cpu_features']}.", "",
        "Each row is its own process, run one after another in one benchmark run. ms: median of the timed repeats "
        "after one untimed call. GFLOP/s: matmul FLOPs 2*B*H*N*M*(Dqk+Dv) forward, 3.5x that for forward+backward. "
        "vs SDPA: SDPA's time / this provider's time (higher is faster). Peak extra: the process's resident-set "
        "peak during a call (after the timed ones) above its resident set before it, with malloc then set to return "
        "every block above 128 KiB to the system. It includes the results: outputs MiB is out (forward) or "
        "dq+dk+dv (forward+backward, where out, as large as the forward's, is alive too); the rest is workspace.", "",
        "| case (B,H,N,M,Dqk,Dv) | dtype | pass | provider | ms | GFLOP/s | vs SDPA | peak extra MiB | outputs MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    sdpa_ms = {(r["case"], r["dtype"], r["pass"]): r.get("ms") for r in rows if r["provider"] == "sdpa"}
    for r in rows:
        label = f"{r['case']} ({','.join(map(str, CASES[r['case']]))})"
        if "error" in r:
            cells = f"cannot run: {r['error']} | | | | |"
        else:
            base = sdpa_ms.get((r["case"], r["dtype"], r["pass"]))
            ratio = f"{base / r['ms']:.2f}x" if base else "n/a"
            cells = f"{r['ms']:.1f} | {r['gflops']:.0f} | {ratio} | {r['peak_extra_mib']:.1f} | {r['outputs_mib']:.1f} |"
        lines.append(f"| {label} | {r['dtype']} | {r['pass']} | {r['provider']} | {cells}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated names from: " + ", ".join(CASES))
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    rows = []
    for case in cases:
        for dtype in DTYPES:
            for passes in PASSES:
                for provider in PROVIDERS:
                    job = {"case": case, "dtype": dtype, "pass": passes, "provider": provider,
                           "repeats": args.repeats}
                    row = run_job(job)
                    rows.append(row)
                    print(f"{case:22s} {dtype:9s} {passes:17s} {provider:20s} "
                          + (f"{row['ms']:9.1f} ms {row['gflops']:6.0f} GFLOP/s peak +{row['peak_extra_mib']:.0f} MiB"
                             if "ms" in row else row["error"]), flush=True)

    from perceiver_fast import _C

    info = {**machine("cpu"), "cpu_features": _C.cpu_features()}
    write_results(args.out, "cpu-backend", info, rows, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
