"""HF transformers' Perceiver, unpatched and after `pf.patch(model)`, side by side on this CPU.

The model is HF's `PerceiverForImageClassificationFourier` (a `PerceiverModel`) in the published
vision-fourier configuration with random weights: 224 x 224 pixels -> M = 50176 inputs of C = 261
channels, N = 512 latents of 1024 channels, one cross-attention head, 8 blocks of 6 latent
self-attention layers of 8 heads. Inference forward (no grad), with and without a padding mask
(the second half of every item's inputs masked). Each row runs in its own process: the median of
the timed repeats after one untimed call, then the peak resident memory of one more call above
the resident set before it (see common.peak_extra_mib). Writes <out>/hf-drop-in.md and .json.

    python benchmarks/hf_drop_in.py [--out benchmarks/results] [--repeats 3] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import machine, median_seconds, peak_extra_mib, run_in_subprocess, write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = ("HF", "HF + pf.patch")
MASKS = ("none", "padded")
IMAGE = 224


def vision_fourier_model(dtype: torch.dtype):
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier

    config = PerceiverConfig(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                             num_self_attention_heads=8, num_cross_attention_heads=1, self_attention_widening_factor=1,
                             cross_attention_widening_factor=1, image_size=IMAGE, num_labels=1000)
    torch.manual_seed(0)
    return PerceiverForImageClassificationFourier(config).eval().to(dtype)


def measure(job: dict) -> dict:
    dtype = DTYPES[job["dtype"]]
    model = vision_fourier_model(dtype)
    if job["variant"] == "HF + pf.patch":
        import perceiver_fast as pf

        pf.patch(model)
    batch, inputs = job["batch"], IMAGE * IMAGE
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, dtype=dtype)
    mask = None
    if job["mask"] == "padded":
        mask = torch.ones(batch, inputs)
        mask[:, inputs // 2:] = 0

    def call():
        with torch.no_grad():
            return model(inputs=pixels, attention_mask=mask).logits

    seconds = median_seconds(call, job["repeats"], "cpu")
    logits, peak_mib = peak_extra_mib(call)
    input_mib = pixels.numel() * pixels.element_size() / 2**20
    return {**job, "ms": seconds * 1e3, "peak_extra_mib": peak_mib, "pixels_mib": input_mib,
            "logits_sum": float(logits.float().sum())}


def write_markdown(path: Path, info: dict, rows: list[dict]) -> None:
    lines = [
        "# HF Perceiver (vision-fourier), unpatched vs pf.patch", "",
        f"Machine: {info['cpu']}, {info['cpu_threads']} threads; torch {info['torch']}, transformers "
        f"{info['transformers']}, Python {info['python']}.", "",
        "HF PerceiverForImageClassificationFourier, vision-fourier configuration, random weights: M = 50176 inputs "
        "of C = 261 channels, N = 512 latents of 1024, 8 x 6 latent self-attention layers. Inference forward. "
        "Each row is its own process, one after another in one run. ms: median of the timed repeats after an "
        "untimed call. Peak extra: resident-set peak during one call above the resident set before it (the model's "
        "weights and the input are already there). speed-up and memory ratio: HF's / patched.", "",
        "| batch | dtype | mask | variant | ms | speed-up | peak extra MiB | memory ratio |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    base = {(r["batch"], r["dtype"], r["mask"]): r for r in rows if r["variant"] == "HF" and "ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['dtype']} | {r['mask']} | {r['variant']} | cannot run: {r['error']} "
                         "| | | |")
            continue
        hf = base.get((r["batch"], r["dtype"], r["mask"]))
        speed = f"{hf['ms'] / r['ms']:.2f}x" if hf else "n/a"
        memory = f"{hf['peak_extra_mib'] / r['peak_extra_mib']:.2f}x" if hf else "n/a"
        lines.append(f"| {r['batch']} | {r['dtype']} | {r['mask']} | {r['variant']} | {r['ms']:.0f} | {speed} | "
                     f"{r['peak_extra_mib']:.0f} | {memory} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated from: " + ", ".join(DTYPES))
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")

    rows = []
    for dtype in dtypes:
        for mask in MASKS:
            for variant in VARIANTS:
                job = {"batch": args.batch, "dtype": dtype, "mask": mask, "variant": variant, "repeats": args.repeats}
                row = run_in_subprocess(__file__, job)
                rows.append(row)
                print(f"{dtype:9s} mask={mask:7s} {variant:14s} "
                      + (f"{row['ms']:9.0f} ms  peak +{row['peak_extra_mib']:.0f} MiB" if "ms" in row
                         else row["error"]), flush=True)

    import transformers

    info = {**machine("cpu"), "transformers": transformers.__version__}
    write_results(args.out, "hf-drop-in", info, rows, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
