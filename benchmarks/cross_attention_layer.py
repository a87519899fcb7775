"""One full Perceiver cross-attention layer on this CPU: HF transformers' layer, the same layer on
SDPA, and the same layer after `pf.patch` (fused input attention), side by side.

The layer is HF's `PerceiverAttention` (cross-attention): LayerNorm of the latents and of the
input, q/k/v projections, attention, output projection, query residual; random weights.
  HF:            its own forward (N x M scores materialised).
  SDPA layer:    the same weights and steps, with F.scaled_dot_product_attention for the attention
                 (LayerNorm(x), K and V still materialised).
  HF + pf.patch: the module after `pf.patch`: LayerNorm, K/V projection and attention fused.
Shapes: HF vision-fourier (M = 50176 inputs of C = 261, N = 512 latents of 1024, one head of
261) and the 1M-input stress shape (M = 1048576 of C = 64, N = 512 latents of 512, 8 heads of
64). Inference forward, and forward + backward (gradients to every parameter, latents and
input) where --backward is given. Each row is its own process: median of the timed repeats
after one untimed call, then the resident-set peak of one more call above the resident set
before it (inputs and weights are already there: this is the growth above the input).
A provider whose predicted peak does not fit in this machine's memory is shown with the reason.

    python benchmarks/cross_attention_layer.py [--out benchmarks/results] [--repeats 3] [--backward]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from common import machine, median_seconds, peak_extra_mib, run_in_subprocess, write_results
from perceiver_fast.bench.cases import Case
from perceiver_fast.bench.providers import hf_attention, sdpa_layer_forward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVIDERS = ("HF", "SDPA layer", "HF + pf.patch")
# name: (B, M, C, N, latent dim, heads, qk = v channels)
SHAPES = {"hf-vision-fourier": (4, 50176, 261, 512, 1024, 1, 261),
          "long-input-1m": (1, 1048576, 64, 512, 512, 8, 512)}


def hf_layer(shape, dtype):
    B, M, C, N, latent, heads, channels = shape
    torch.manual_seed(0)
    case = Case(name="layer", level="layer", kind="cross", B=B, H=heads, N=N, M=M, dqk=channels // heads,
                dv=channels // heads, C=C, latent_dim=latent)
    return hf_attention(case, dtype, "cpu")


def predicted_peak_gib(provider: str, shape, dtype) -> float:
    """Largest live intermediates of a forward: HF holds two B x H x N x M score tensors (scores and
    probabilities) beside LayerNorm(x), K and V; the SDPA layer only the latter three."""
    B, M, C, N, _, heads, channels = shape
    size = torch.finfo(dtype).bits // 8
    stored = B * M * (C + 2 * channels) * size
    if provider == "HF":
        stored += 2 * B * heads * N * M * size
    return stored / 2**30 if provider != "HF + pf.patch" else 0.0


def available_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30


def measure(job: dict) -> dict:
    dtype, shape = DTYPES[job["dtype"]], SHAPES[job["shape"]]
    B, M, C, N, latent, _, _ = shape
    layer = hf_layer(shape, dtype)
    if job["provider"] == "HF + pf.patch":
        import perceiver_fast as pf

        pf.patch(layer)
    torch.manual_seed(1)
    latents = torch.randn(B, N, latent, dtype=dtype, requires_grad=job["backward"])
    inputs = torch.randn(B, M, C, dtype=dtype, requires_grad=job["backward"])
    forward = ((lambda: sdpa_layer_forward(layer, latents, inputs, False)) if job["provider"] == "SDPA layer"
               else (lambda: layer(latents, inputs=inputs)[0]))

    def call():
        if not job["backward"]:
            with torch.no_grad():
                return forward()
        out = forward()
        out.backward(torch.ones_like(out))
        return out.detach()

    seconds = median_seconds(call, job["repeats"], "cpu")
    out, peak_mib = peak_extra_mib(call)
    return {**job, "ms": seconds * 1e3, "peak_extra_mib": peak_mib,
            "input_mib": inputs.numel() * inputs.element_size() / 2**20, "out_norm": float(out.float().norm())}


def layer_gflop(shape, provider: str, backward: bool) -> float:
    """Matmul FLOPs the provider executes: q and output projections, and K/V projections plus
    attention (2 P (dqk + dv), P = N M pairs) unfused, or the fused method's count
    (`perceiver_fast.input_attention.method_flops`). Forward+backward counted as 3x forward."""
    from perceiver_fast.input_attention import choose_method, method_flops

    B, M, C, N, latent, heads, channels = shape
    dim = channels // heads
    forward = 2 * B * (N * latent * channels + N * channels * latent)
    if provider == "HF + pf.patch":
        flops = method_flops(N, M, C, dim, dim)
        forward += B * heads * flops[choose_method(N, M, C, dim, dim)]
    else:
        forward += 2 * B * 2 * M * C * channels + 2 * B * N * M * 2 * channels
    return forward * (3 if backward else 1) / 1e9


def gemm_gflops(dtype) -> float:
    """This machine's rate for one large torch matmul (2048^3) in `dtype`, median of 5."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    return 2 * 2048**3 / median_seconds(lambda: a @ b, 5, "cpu") / 1e9


def write_markdown(path: Path, info: dict, rows: list[dict]) -> None:
    lines = [
        "# One Perceiver cross-attention layer: HF vs SDPA layer vs pf.patch", "",
        f"Machine: {info['cpu']}, {info['cpu_threads']} threads; torch {info['torch']}, transformers "
        f"{info['transformers']}, Python {info['python']}. One torch matmul (2048^3) on this machine: "
        + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in info["gemm_gflops"].items()) + ".", "",
        "HF `PerceiverAttention` (cross-attention: both LayerNorms, q/k/v projections, attention, output "
        "projection, query residual), random weights. hf-vision-fourier: B=4, M=50176, C=261, N=512 latents of "
        "1024, 1 head of 261. long-input-1m: B=1, M=1048576, C=64, N=512 latents of 512, 8 heads of 64. "
        "Each row is its own process, one after another in one run. ms: median of the timed repeats after an "
        "untimed call. GFLOP: the matmul FLOPs the provider executes (HF and SDPA: the four projections and "
        "2 N M (dqk + dv) of attention; pf.patch: q and output projections plus the fused method's count, the "
        "shortcut on both shapes, which skips the K and V projections), x3 for forward+backward; GFLOP/s: that "
        "over the time. Peak extra: resident-set peak "
        "during one call above the resident set before it, with the weights and inputs already allocated (the "
        "growth above the input). vs HF / vs SDPA: their time over this row's; memory vs SDPA: this row's peak "
        "extra as a share of the SDPA layer's.", "",
        "| shape | dtype | pass | provider | ms | GFLOP | GFLOP/s | vs HF | vs SDPA | peak extra MiB | memory vs SDPA |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    done = {(r["shape"], r["dtype"], r["backward"], r["provider"]): r for r in rows if "ms" in r}
    for r in rows:
        key = (r["shape"], r["dtype"], r["backward"])
        pass_name = "forward+backward" if r["backward"] else "forward"
        head = f"| {r['shape']} | {r['dtype']} | {pass_name} | {r['provider']} |"
        if "ms" not in r:
            lines.append(f"{head} not run: {r['error']} | | | | | | |")
            continue
        hf, sdpa = done.get(key + ("HF",)), done.get(key + ("SDPA layer",))
        gflop = layer_gflop(SHAPES[r["shape"]], r["provider"], r["backward"])
        vs_hf = f"{hf['ms'] / r['ms']:.2f}x" if hf else "n/a"
        vs_sdpa = f"{sdpa['ms'] / r['ms']:.2f}x" if sdpa else "n/a"
        memory = f"{100 * r['peak_extra_mib'] / sdpa['peak_extra_mib']:.0f}%" if sdpa else "n/a"
        lines.append(f"{head} {r['ms']:.0f} | {gflop:.0f} | {gflop / (r['ms'] / 1e3):.0f} | {vs_hf} | {vs_sdpa} | {r['peak_extra_mib']:.0f} | "
                     f"{memory} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated from: " + ", ".join(SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated from: " + ", ".join(DTYPES))
    parser.add_argument("--backward", action="store_true", help="also forward+backward rows")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    if set(shapes) - set(SHAPES) or set(dtypes) - set(DTYPES):
        parser.error(f"--shapes: choose from {', '.join(SHAPES)}; --dtypes: from {', '.join(DTYPES)}")

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for backward in ((False, True) if args.backward else (False,)):
                for provider in PROVIDERS:
                    job = {"shape": shape, "dtype": dtype, "backward": backward, "provider": provider,
                           "repeats": args.repeats}
                    need = predicted_peak_gib(provider, SHAPES[shape], DTYPES[dtype]) * (3 if backward else 1)
                    if need > 0.8 * available_gib():
                        row = {**job, "error": f"needs about {need:.0f} GiB of intermediates (score matrices), "
                                               f"{available_gib():.0f} GiB available"}
                    else:
                        row = run_in_subprocess(__file__, job)
                    rows.append(row)
                    print(f"{shape:18s} {dtype:9s} {'fwd+bwd' if backward else 'fwd':7s} {provider:14s} "
                          + (f"{row['ms']:9.0f} ms  peak +{row['peak_extra_mib']:.0f} MiB" if "ms" in row
                             else row["error"]), flush=True)

    import transformers

    info = {**machine("cpu"), "transformers": transformers.__version__,
            "gemm_gflops": {name: gemm_gflops(DTYPES[name]) for name in dtypes}}
    write_results(args.out, "cross-attention-layer", info, rows, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
