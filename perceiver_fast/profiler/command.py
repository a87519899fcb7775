"""`perceiver-fast profile`: a named Perceiver, or a model of the user's own, at a chosen input length
and batch, with and without pf.patch: per-part time and memory, the whole-model peak, the predicted
peak and the longest input that fits a memory budget (named models), every figure as JSON on request."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '512 MiB', '1.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS | {"": 1}:
        raise ValueError(f"a memory size like 24GiB, 512MiB or 1.5GB, got {text!r}")
    return int(float(match.group(1)) * UNITS.get(match.group(2).lower(), 1))


def compare_patched(model, run, **kwargs):
    """(unpatched, patched) profiles of run(model): the patched one on a deep copy after pf.patch."""
    import perceiver_fast as pf

    from .parts import profile_model

    patched = copy.deepcopy(model)
    pf.patch(patched)
    return profile_model(model, run, **kwargs), profile_model(patched, run, **kwargs)


def format_table(title: str, unpatched, patched, predicted: tuple[float, float] | None) -> str:
    from .parts import PARTS

    lines = [title, f"{'part':26s} {'unpatched ms':>13s} {'peak MiB':>9s} {'patched ms':>11s} {'peak MiB':>9s}"]
    names = [p for p in PARTS if p in unpatched.parts or p in patched.parts]
    for name in names:
        a, b = unpatched.parts.get(name), patched.parts.get(name)
        cells = [f"{a.ms:13.1f} {a.peak_mib:9.1f}" if a else f"{'-':>13s} {'-':>9s}",
                 f"{b.ms:11.1f} {b.peak_mib:9.1f}" if b else f"{'-':>11s} {'-':>9s}"]
        lines.append(f"{name:26s} {cells[0]} {cells[1]}")
    lines.append(f"{'other (outside the parts)':26s} {unpatched.other_ms():13.1f} {'':9s} {patched.other_ms():11.1f}")
    lines.append(f"{'whole model (measured)':26s} {unpatched.total_ms:13.1f} {unpatched.peak_mib:9.1f} "
                 f"{patched.total_ms:11.1f} {patched.peak_mib:9.1f}")
    if predicted is not None:
        errors = [f"{100 * (p - m.peak_mib) / m.peak_mib:+.0f}%" for p, m in zip(predicted, (unpatched, patched))]
        lines.append(f"{'whole model (predicted)':26s} {'':13s} {predicted[0]:9.1f} {'':11s} {predicted[1]:9.1f}"
                     f"   (vs measured: {errors[0]} unpatched, {errors[1]} patched)")
    lines.append("ms: wall time of the part's calls in one forward (torch.profiler ranges); peak MiB: the highest "
                 "memory during the part above the memory in use when the forward started "
                 "(CPU: resident set; CUDA: allocated).")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import NAMED_MODELS

    parser.add_argument("--model", required=True, metavar="MODEL",
                        help=f"a published configuration ({', '.join(sorted(NAMED_MODELS))}), or a model of your own: "
                             "FILE.py:FUNCTION or MODULE:FUNCTION, FUNCTION() returning (model, make_inputs) with "
                             "make_inputs(batch, input_len, dtype, device) -> the model's inputs "
                             "(perceiver_fast/profiler/user_models.py)")
    parser.add_argument("--input-len", type=int, required=True, help="input length M (hf-vision-fourier: pixels)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--backward", action="store_true", help="forward+backward (default: inference forward)")
    parser.add_argument("--memory-budget", metavar="SIZE", help="also print the longest input that fits, e.g. 24GiB")
    parser.add_argument("--trace", metavar="FILE", help="write the unpatched forward's Chrome trace here")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")


def _model(args, parser):
    from .models import NAMED_MODELS
    from .user_models import UserModelError, user_model

    if args.model in NAMED_MODELS:
        return NAMED_MODELS[args.model]
    if ":" not in args.model:
        parser.error(f"--model: {args.model!r} is no named model ({', '.join(sorted(NAMED_MODELS))}) and not "
                     "FILE.py:FUNCTION or MODULE:FUNCTION")
    try:
        return user_model(args.model)
    except UserModelError as error:
        parser.error(f"--model: {error}")


def _figures(profile) -> dict:
    return {"total_ms": profile.total_ms, "peak_mib": profile.peak_mib, "other_ms": profile.other_ms(),
            "parts": {name: {"ms": part.ms, "peak_mib": part.peak_mib} for name, part in profile.parts.items()}}


def profile_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .memory_model import largest_input, predicted_peak_bytes, with_inputs
    from .parts import profile_model

    named = _model(args, parser)
    if args.input_len < 1 or args.batch < 1:
        parser.error("--input-len and --batch must be at least 1")
    reason = named.valid_length(args.input_len)
    if reason:
        parser.error(f"--input-len: {reason}")
    budget = None
    if args.memory_budget and named.shape is None:
        parser.error(f"--memory-budget: the memory formula does not cover {named.name}")
    if args.memory_budget:
        try:
            budget = parse_size(args.memory_budget)
        except ValueError as error:
            parser.error(f"--memory-budget: {error}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    import perceiver_fast as pf

    profiles = []
    for patched in (False, True):
        model = named.build(args.input_len, dtype).to(device)
        if patched:
            pf.patch(model)
        inputs = named.inputs(args.batch, args.input_len, dtype, device)
        print(f"profiling {'patched' if patched else 'unpatched'} ...", flush=True)
        profiles.append(profile_model(model, lambda m, x=inputs: named.run(m, x), device=device, backward=args.backward,
                                      trace=None if patched else args.trace))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model, inputs

    shape = None if named.shape is None else named.shape(args.batch, args.input_len, dtype)
    predicted = None if args.backward or shape is None else tuple(
        predicted_peak_bytes(shape, p) / 2**20 for p in (False, True))
    title = (f"{named.name}: {named.description}; B={args.batch}, M={args.input_len}, {args.dtype}, "
             f"{'forward+backward' if args.backward else 'forward'}, {device}")
    print(format_table(title, *profiles, predicted))
    if shape is None:
        print(f"predicted peak: the memory formula does not cover {named.name}")
    elif args.backward:
        print("predicted peak: the formula covers the inference forward only (perceiver_fast/profiler/memory_model.py)")
    answers = {}
    if budget is not None:
        square = args.model == "hf-vision-fourier"
        for patched in (False, True):
            longest = largest_input(lambda m: with_inputs(shape, m), weight_bytes, budget, patched,
                                    length_of=(lambda k: k * k) if square else (lambda k: k))
            what = "nothing fits" if longest is None else (
                f"M = {longest}" + (f" ({math.isqrt(longest)}x{math.isqrt(longest)} pixels)" if square else ""))
            print(f"longest input within {args.memory_budget} at B={args.batch}, inference forward, "
                  f"{'patched' if patched else 'unpatched'} (predicted, weights included): {what}")
            answers["patched" if patched else "unpatched"] = longest
    if args.json:
        figures = {"model": named.name, "description": named.description, "batch": args.batch,
                   "input_len": args.input_len, "dtype": args.dtype, "device": device,
                   "pass": "forward+backward" if args.backward else "forward",
                   "unpatched": _figures(profiles[0]), "patched": _figures(profiles[1]),
                   "predicted_peak_mib": None if predicted is None else dict(zip(("unpatched", "patched"), predicted)),
                   "memory_budget": args.memory_budget, "longest_input": answers or None}
        Path(args.json).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast profile", description=__doc__)
    add_arguments(parser)
    return profile_command(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
