"""Benchmark report: perceiver_fast against eager PyTorch and SDPA on published Perceiver shapes.

Every provider runs the same inputs side by side in one process; times are medians.
Writes <out>/report-<device>.md and <out>/results-<device>.json.

    python benchmarks/report.py [--device cpu|cuda] [--out benchmarks/results] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch

import perceiver_fast as pf
from common import eager, machine, median_seconds, sdpa

# (shapes.json case, overrides): batch 1 on the CPU so the default set stays within minutes.
CASES = [
    ("hf-vision-fourier-cross", {}),
    ("hf-vision-conv-cross", {}),
    ("hf-language-cross", {}),
    ("lucidrains-image-cross", {}),
    ("krasserm-clm-ar", {"B": 1}),
    ("hf-vision-self", {}),
    ("hf-optical-flow-self", {}),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_shapes() -> dict:
    text = resources.files("perceiver_fast").joinpath("shapes.json").read_text()
    return {case["name"]: case for case in json.loads(text)["cases"]}


def providers(device: str, kind: str, auto_backend: str):
    found = {"eager": eager, "sdpa": sdpa}
    fn = pf.latent_attention if kind == "self" else pf.cross_attention
    found[f"perceiver_fast[auto: {auto_backend}]"] = lambda q, k, v, causal: fn(q, k, v, causal=causal)
    if device == "cuda":
        found["perceiver_fast[triton]"] = lambda q, k, v, causal: fn(q, k, v, causal=causal, backend="triton")
    return found


def run_case(name, shape, dtype, device, repeats):
    B, H, N, M = shape["B"], shape["H"], shape["N"], shape["M"]
    dqk, dv = shape["dqk"], shape["dv"]
    causal = shape["kind"] == "causal-cross"
    q = torch.randn(B, H, N, dqk, device=device, dtype=dtype)
    k = torch.randn(B, H, M, dqk, device=device, dtype=dtype)
    v = torch.randn(B, H, M, dv, device=device, dtype=dtype)
    flops = 2 * B * H * N * M * (dqk + dv) * (0.5 if causal else 1.0)
    refusals = pf.explain(q, k, v, causal=causal, kind="latent" if shape["kind"] == "self" else "cross")
    auto_backend = next(name for name, reasons in refusals.items() if not reasons)
    rows = []
    for provider, fn in providers(device, shape["kind"], auto_backend).items():
        row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "provider": provider,
               "B": B, "H": H, "N": N, "M": M, "dqk": dqk, "dv": dv, "causal": causal}
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.no_grad():
                seconds = median_seconds(lambda: fn(q, k, v, causal), repeats, device)
            row.update(ms=seconds * 1e3, gflops=flops / seconds / 1e9)
            if device == "cuda":
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as exc:  # a provider that cannot run a case is reported with its reason
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
        print(f"  {name:26s} {row['dtype']:8s} {provider:24s} "
              + (f"{row['ms']:9.2f} ms {row['gflops']:8.1f} GFLOP/s" if "ms" in row else row["error"]), flush=True)
    return rows


def write_markdown(path: Path, info: dict, rows: list[dict]) -> None:
    lines = ["# perceiver-fast benchmark report", "",
             f"Machine: {info['cpu']} ({info['cpu_threads']} threads){', GPU ' + info['gpu'] if 'gpu' in info else ''}; "
             f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}.", "",
             "Forward pass, batch as listed, median of the timed repeats after one warm-up; "
             "all providers run side by side in one process on the same inputs. "
             "Ratio = eager time / provider time (higher is faster). FLOPs: 2*B*H*N*M*(Dqk+Dv), halved when causal.",
             ""]
    if info["device"] == "cuda":
        lines.append("Peak extra memory: torch.cuda.max_memory_allocated above the inputs during the calls.")
    else:
        lines.append("Memory is not measured on the CPU by this report yet.")
    lines += ["", "| case | dtype | shape (B,H,N,M,Dqk,Dv) | provider | ms | GFLOP/s | vs eager |"
              + (" peak extra MiB |" if info["device"] == "cuda" else ""),
              "|---|---|---|---|---:|---:|---:|" + ("---:|" if info["device"] == "cuda" else "")]
    eager_ms = {(r["case"], r["dtype"]): r.get("ms") for r in rows if r["provider"] == "eager"}
    for r in rows:
        shape = f"{r['B']},{r['H']},{r['N']},{r['M']},{r['dqk']},{r['dv']}" + (" causal" if r["causal"] else "")
        if "error" in r:
            cells = f"cannot run: {r['error']} | | |"
        else:
            base = eager_ms.get((r["case"], r["dtype"]))
            ratio = f"{base / r['ms']:.2f}x" if base else "n/a"
            cells = f"{r['ms']:.2f} | {r['gflops']:.1f} | {ratio} |"
        extra = f" {r['peak_extra_mib']:.1f} |" if "peak_extra_mib" in r else (" |" if info["device"] == "cuda" else "")
        lines.append(f"| {r['case']} | {r['dtype']} | {shape} | {r['provider']} | {cells}{extra}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    shapes = load_shapes()
    rows = []
    print(f"benchmarking {len(CASES)} cases x {len(DTYPES)} dtypes on {args.device}", flush=True)
    for name, overrides in CASES:
        shape = {**shapes[name], **overrides}
        if isinstance(shape["B"], list):
            shape["B"] = min(shape["B"])
        for dtype in DTYPES.values():
            rows += run_case(name, shape, dtype, args.device, args.repeats)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    (out / f"results-{args.device}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=1))
    write_markdown(out / f"report-{args.device}.md", info, rows)
    print(f"wrote {out / f'report-{args.device}.md'} and {out / f'results-{args.device}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
