"""`perceiver-fast profile`: a named Perceiver, or a model of the user's own, at a chosen input length
and batch, with and without pf.patch: per-part time and memory, the whole-model peak, the predicted
peak and the longest input that fits a memory budget (named models), every figure as JSON on request."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
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

    from .parts import profile_models

    patched = copy.deepcopy(model)
    pf.patch(patched)
    return tuple(profile_models([model, patched], run, labels=["unpatched", "patched"], **kwargs))


def format_table(title: str, unpatched, patched, predicted: tuple[float, float] | None) -> str:
    """Per-part rows, forward only or forward and backward side by side, for both models."""
    from .parts import PARTS

    backward = unpatched.backward
    names = [p for p in PARTS if p in unpatched.parts or p in patched.parts]
    if backward:
        header = (f"{'':26s} {'unpatched':>37s}   {'patched':>37s}\n{'part':26s}" +
                  f" {'fwd ms':>8s} {'bwd ms':>8s} {'fwd MiB':>9s} {'bwd MiB':>9s}  " * 2).rstrip()

        def cells(stats) -> str:
            if stats is None:
                return f"{'-':>8s} {'-':>8s} {'-':>9s} {'-':>9s}"
            return f"{stats.ms:8.1f} {stats.backward_ms:8.1f} {stats.peak_mib:9.1f} {stats.backward_peak_mib:9.1f}"

        def times(forward_ms, backward_ms) -> str:
            return f"{forward_ms:8.1f} {backward_ms:8.1f}"

        lines = [title, header]
        lines += [f"{name:26s} {cells(unpatched.parts.get(name))}   {cells(patched.parts.get(name))}" for name in names]
        if unpatched.optimizer_ms or patched.optimizer_ms:
            lines.append(f"{'optimizer step':26s} {'':8s} {unpatched.optimizer_ms:8.1f} {'':9s} {'':9s}   "
                         f"{'':8s} {patched.optimizer_ms:8.1f}")
        lines.append(f"{'other (outside the parts)':26s} {times(unpatched.other_ms(), unpatched.other_backward_ms())} "
                     f"{'':9s} {'':9s}   {times(patched.other_ms(), patched.other_backward_ms())}")
        lines.append(f"{'whole model (measured)':26s} {unpatched.forward_ms:8.1f} "
                     f"{unpatched.backward_ms + unpatched.optimizer_ms:8.1f} {'peak':>9s} {unpatched.peak_mib:9.1f}   "
                     f"{patched.forward_ms:8.1f} {patched.backward_ms + patched.optimizer_ms:8.1f} {'peak':>9s} "
                     f"{patched.peak_mib:9.1f}")
    else:
        lines = [title, f"{'part':26s} {'unpatched ms':>13s} {'peak MiB':>9s} {'patched ms':>11s} {'peak MiB':>9s}"]
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
        if backward:
            lines.append(f"{'whole model (predicted)':26s} {'':8s} {'':8s} {'peak':>9s} {predicted[0]:9.1f}   {'':8s} "
                         f"{'':8s} {'peak':>9s} {predicted[1]:9.1f}   (vs measured: {errors[0]} unpatched, "
                         f"{errors[1]} patched)")
        else:
            lines.append(f"{'whole model (predicted)':26s} {'':13s} {predicted[0]:9.1f} {'':11s} {predicted[1]:9.1f}"
                         f"   (vs measured: {errors[0]} unpatched, {errors[1]} patched)")
    if backward:
        lines.append("fwd/bwd ms: wall time of the part's forward calls, and of the backward nodes its forward created "
                     "(with its parameters' gradient accumulation); other: forward and backward of the glue between "
                     "the parts (residual adds, reshapes, the summed loss) and the autograd engine's own work between "
                     "nodes. MiB: the highest memory during the part's forward (backward) above the memory in use when "
                     "the step started (CPU: resident set; CUDA: allocated).")
    else:
        lines.append("ms: wall time of the part's calls in one forward (torch.profiler ranges); peak MiB: the highest "
                     "memory during the part above the memory in use when the forward started "
                     "(CPU: resident set; CUDA: allocated).")
    return "\n".join(lines)


def writable_file(path: str) -> str:
    """An output file's path, checked as the arguments are parsed, before any work (a profile must not
    end by losing its figures to a path that was never writable): its folder exists (it is not made)
    and is writable."""
    target = Path(path)
    if target.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no folder {target.parent} (it is not made: create it first)")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path} is not writable")
    return path


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
    parser.add_argument("--backward", action="store_true",
                        help="a training step: forward, backward and the optimizer's step (default: inference forward)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd", "none"], default=None,
                        help="the training step's optimizer: in the run (with --backward) and in the training memory plan (default: adamw; "
                             "sgd: with momentum 0.9; none: forward and backward only)")
    parser.add_argument("--memory-budget", metavar="SIZE", help="also print the longest input that fits, e.g. 24GiB")
    parser.add_argument("--trace", metavar="FILE", type=writable_file,
                        help="write the unpatched forward's Chrome trace here (its folder must exist)")
    parser.add_argument("--json", metavar="FILE", type=writable_file,
                        help="also write every figure to this JSON file (its folder must exist)")


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
    return {"total_ms": profile.total_ms, "forward_ms": profile.forward_ms, "backward_ms": profile.backward_ms,
            "optimizer_ms": profile.optimizer_ms, "peak_mib": profile.peak_mib, "other_ms": profile.other_ms(),
            "other_backward_ms": profile.other_backward_ms(),
            "parts": {name: {"ms": part.ms, "peak_mib": part.peak_mib, "backward_ms": part.backward_ms,
                             "backward_peak_mib": part.backward_peak_mib} for name, part in profile.parts.items()}}


def _parameter_bytes_per_input(named, dtype) -> float:
    """Bytes of the parameters that grow with the input length (hf-language: its input and decoder
    position embeddings), from the model built at its two smallest valid lengths."""
    import torch

    first, second = [n for n in range(1, 1 << 20) if named.valid_length(n) is None][:2]
    sizes = [sum(p.numel() for p in named.build(n, dtype).parameters()) for n in (first, second)]
    return (sizes[1] - sizes[0]) * torch.finfo(dtype).bits // 8 / (second - first)


def _budget_answers(args, shape, weight_bytes: int, parameter_bytes: list[dict[str, int]], optimizer,
                    per_input: float) -> dict:
    """The longest input and the largest batch within --memory-budget, inference and training, both
    models; weights, gradients and optimizer state grow by per_input bytes per input beyond --input-len."""
    from .memory_model import (largest_batch, largest_input, optimizer_state_bytes, predicted_peak_bytes,
                               training_peak_bytes)

    budget = parse_size(args.memory_budget)
    square = args.model == "hf-vision-fourier"
    answers = {}
    def grown(s) -> int:  # the parameters' bytes beyond those at --input-len
        return int(per_input * (s.inputs - args.input_len))

    for mode in ("inference", "training"):
        state = optimizer_state_bytes(optimizer, weight_bytes) if mode == "training" else 0

        def fixed(s, training=mode == "training"):
            weights = weight_bytes + grown(s)
            return weights + (optimizer_state_bytes(optimizer, weights) if training else 0)

        for patched, parameters in zip((False, True), parameter_bytes):
            if mode == "inference":
                def peak(s, patched=patched):
                    return predicted_peak_bytes(s, patched)
            else:
                def peak(s, patched=patched, parameters=parameters):
                    return training_peak_bytes(s, patched, {**parameters, "other": parameters.get("other", 0)
                                                            + grown(s)}, optimizer)
            longest = largest_input(shape, fixed, budget, peak,
                                    length_of=(lambda k: k * k) if square else (lambda k: k))
            batch = largest_batch(shape, fixed, budget, peak)
            side = "patched" if patched else "unpatched"
            answers[f"{mode}, {side}"] = {"longest_input": longest, "largest_batch": batch}
            what = "nothing fits" if longest is None else (
                f"M = {longest}" + (f" ({math.isqrt(longest)}x{math.isqrt(longest)} pixels)" if square else ""))
            extra = f", optimizer {optimizer or 'none'} (state {state / 2**20:.0f} MiB)" if mode == "training" else ""
            print(f"within {args.memory_budget}, {mode}{extra}, {side} (predicted, weights included): "
                  f"longest input at B={args.batch}: {what}; largest batch at M={args.input_len}: "
                  f"{'none fits' if batch is None else batch}")
    return answers


def profile_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .memory_model import predicted_peak_bytes, training_peak_bytes
    from .parts import find_parts, parameter_bytes_by_part, profile_models

    named = _model(args, parser)
    if args.input_len < 1 or args.batch < 1:
        parser.error("--input-len and --batch must be at least 1")
    reason = named.valid_length(args.input_len)
    if reason:
        parser.error(f"--input-len: {reason}")
    if args.optimizer is not None and not (args.backward or args.memory_budget):
        parser.error("--optimizer: an optimizer steps in a training step; add --backward (or --memory-budget "
                     "for the training plan alone)")
    optimizer = None if args.optimizer == "none" else (args.optimizer or "adamw")  # the training plan's
    run_optimizer = optimizer if args.backward else None
    if args.memory_budget and named.shape is None:
        parser.error(f"--memory-budget: the memory formula does not cover {named.name}")
    if args.memory_budget:
        try:
            parse_size(args.memory_budget)
        except ValueError as error:
            parser.error(f"--memory-budget: {error}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    import perceiver_fast as pf

    started = time.monotonic()
    models = [named.build(args.input_len, dtype).to(device) for _ in range(2)]
    try:
        pf.patch(models[1])
    except TypeError as error:  # a model of the user's own that holds no module pf.patch knows
        parser.error(f"--model: {named.name} gives no patched model to compare: {error}")
    inputs = named.inputs(args.batch, args.input_len, dtype, device)
    profiles = profile_models(models, lambda m: named.run(m, inputs), device=device, backward=args.backward,
                              optimizer=run_optimizer, labels=["unpatched", "patched"], trace=args.trace,
                              progress=lambda line: print(f"[{time.monotonic() - started:5.0f} s] {line}", flush=True))
    weight_bytes = sum(p.numel() * p.element_size() for p in models[0].parameters())
    parameter_bytes = [parameter_bytes_by_part(model, find_parts(model)) for model in models]
    del models, inputs

    shape = None if named.shape is None else named.shape(args.batch, args.input_len, dtype)
    predicted = None
    if shape is not None:
        predicted = tuple((training_peak_bytes(shape, p, parameters, optimizer) if args.backward
                           else predicted_peak_bytes(shape, p)) / 2**20
                          for p, parameters in zip((False, True), parameter_bytes))
    step = ("training step (forward, backward" + (f", {optimizer} step)" if optimizer else ")")
            if args.backward else "forward")
    title = f"{named.name}: {named.description}; B={args.batch}, M={args.input_len}, {args.dtype}, {step}, {device}"
    print(format_table(title, *profiles, predicted))
    if shape is None:
        print(f"predicted peak: the memory formula does not cover {named.name}")
    answers = None
    if args.memory_budget:
        answers = _budget_answers(args, shape, weight_bytes, parameter_bytes, optimizer,
                                  _parameter_bytes_per_input(named, dtype))
    if args.json:
        figures = {"model": named.name, "description": named.description, "batch": args.batch,
                   "input_len": args.input_len, "dtype": args.dtype, "device": device,
                   "pass": step, "optimizer": run_optimizer, "plan_optimizer": optimizer,
                   "unpatched": _figures(profiles[0]), "patched": _figures(profiles[1]),
                   "predicted_peak_mib": None if predicted is None else dict(zip(("unpatched", "patched"), predicted)),
                   "memory_budget": args.memory_budget, "fits_budget": answers}
        Path(args.json).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast profile", description=__doc__)
    add_arguments(parser)
    return profile_command(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
