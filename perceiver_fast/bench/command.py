"""`perceiver-fast bench`: run a named case set, write its report, compare with an earlier run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cases import DECODE, PASSES
from .levels import LEVELS
from .run import DTYPES
from .sets import SETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", choices=list(SETS), default=None, metavar="NAME",
                        help="the case set (default: quick): "
                             + "; ".join(f"{s.name}: {s.about}" for s in SETS.values()))
    parser.add_argument("--full", action="store_true", help="the same as --set full")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when present and the set runs there")
    other_dtypes = "".join(f"; the {s.name} set: {','.join(s.dtypes)}" for s in SETS.values()
                           if s.dtypes != ("float32", "bfloat16"))
    parser.add_argument("--dtypes", default=None,
                        help=f"comma-separated from {', '.join(DTYPES)} (default: float32,bfloat16{other_dtypes})")
    other_passes = "".join(f"; the {s.name} set: {','.join(s.passes)}" for s in SETS.values() if s.passes != PASSES)
    parser.add_argument("--passes", default=None,
                        help=f"comma-separated from {', '.join(PASSES)} (default: both{other_passes}); the "
                             f"generation set's only pass is {DECODE}")
    parser.add_argument("--levels", default=",".join(LEVELS),
                        help="comma-separated from " + ", ".join(LEVELS) + ": run only the set's cases of these")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers of the set to run (default: all of them), e.g. to leave out "
                             "one too slow at a capped --isa")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per provider (median)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds: no case process starts later, one still running is "
                             "stopped, and the report says which were not measured (for machines that cap a run)")
    parser.add_argument("--isa", default=None, metavar="LEVEL",
                        help="emulate a CPU with only this instruction-set level (portable, avx2, avx512, avx512_bf16 "
                             "on x86-64; portable, neon on aarch64): caps this library's kernels "
                             "(PERCEIVER_FAST_CPU_ISA) and torch's, oneDNN's and MKL's in every case process, and "
                             "names the caps in the report")
    parser.add_argument("--out", default="bench-results",
                        help="folder for report-<set>-<device>.md, results-<set>-<device>.json and the plots "
                             "(the quick set: report-<device>.md, results-<device>.json); made, with its parents, "
                             "before the run if missing")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--compare", metavar="OLD.json", help="print the change against an earlier results file")
    parser.add_argument("--against", metavar="NEW.json",
                        help="with --compare: compare this results file instead of running the benchmark")


def _split(parser, name: str, value: str, allowed) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        parser.error(f"--{name}: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(allowed)}")
    return items


def _make_out_folder(parser, path: str) -> None:
    """Makes the --out folder (with its parents) before the run, so that a path that cannot be a
    writable folder stops the command at once rather than losing the run's results at its end."""
    if Path(path).exists() and not Path(path).is_dir():
        parser.error(f"--out {path}: is a file, not a folder")
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file among its parents, a read-only parent
        parser.error(f"--out {path}: cannot make the folder: {error.strerror or error}")
    if not os.access(path, os.W_OK):
        parser.error(f"--out {path}: not writable")


# Per level of csrc/cpu/vector_paths.h, the caps of torch's vectorized kernels, oneDNN and MKL that
# emulate a CPU with only that much (aarch64's NEON has no caps of theirs below it).
ISA_CAPS = {
    "portable": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "neon": {},
}


def _cap_instruction_sets(parser, level: str) -> None:
    """Sets the caps of `level` in this process's environment, which every case process inherits, and
    this library's in this process too (the report's header reads it)."""
    from ..extension import CPU_ISA_VARIABLE, compiled

    if compiled is None:
        parser.error("--isa: the C++ extension is not loaded, so there is no kernel level to cap")
    levels = compiled.cpu_features()["isa_levels"]
    if level not in levels:
        parser.error(f"--isa {level}: expected one of {', '.join(levels)} on this CPU architecture")
    caps = {CPU_ISA_VARIABLE: level, **ISA_CAPS[level]}
    os.environ.update(caps)
    compiled.set_cpu_isa(level)


def bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .compare import compare, format_changes
    from .report import load_json

    if args.against and not args.compare:
        parser.error("--against needs --compare OLD.json")
    old_rows = None
    if args.compare:
        try:
            _, old_rows = load_json(args.compare)
        except (OSError, ValueError) as error:
            parser.error(f"--compare: {error}")
    if args.against:
        try:
            _, new_rows = load_json(args.against)
        except (OSError, ValueError) as error:
            parser.error(f"--against: {error}")
        print(format_changes(compare(old_rows, new_rows)))
        return 0
    if args.full and args.set not in (None, "full"):
        parser.error(f"--full is --set full: it cannot go with --set {args.set}")
    case_set = SETS["full" if args.full else (args.set or "quick")]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be a number of seconds above 0, got {args.budget_s:g}")
    dtypes = _split(parser, "dtypes", args.dtypes, DTYPES) if args.dtypes else list(case_set.dtypes)
    allowed_passes = (DECODE,) if DECODE in case_set.passes else PASSES  # decoding has no forward+backward
    passes = _split(parser, "passes", args.passes, allowed_passes) if args.passes else list(case_set.passes)
    levels = _split(parser, "levels", args.levels, LEVELS)
    providers = list(case_set.providers) or None
    if args.providers:
        if providers is None:
            parser.error(f"--providers: the {case_set.name} set runs every provider of each level; name a set "
                         f"with its own providers")
        providers = _split(parser, "providers", args.providers, providers)
    if args.isa is not None:
        _cap_instruction_sets(parser, args.isa)

    import torch

    from .report import write_report
    from .run import run_cases
    from .timing import machine

    device = args.device or ("cuda" if torch.cuda.is_available() and "cuda" in case_set.devices else "cpu")
    if device not in case_set.devices:
        parser.error(f"--device {device}: the {case_set.name} set runs on {', '.join(case_set.devices)} only")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cases = [c for c in case_set.cases(device) if c.level in levels]
    if not cases:
        parser.error(f"--levels {args.levels}: the {case_set.name} set has no case at these levels")
    _make_out_folder(parser, args.out)
    print(f"perceiver-fast bench: {len(cases)} cases x {len(dtypes)} dtypes x {len(passes)} passes on {device}, "
          f"{case_set.name} set", flush=True)
    rows = run_cases(cases, dtypes, passes, device, args.repeats, progress=lambda line: print(line, flush=True),
                     only=providers, full=case_set.name == "full", budget_s=args.budget_s)
    info = machine(device, {name: DTYPES[name] for name in dtypes})
    if args.isa is not None:
        info["isa_caps"] = {name: os.environ[name] for name in ("PERCEIVER_FAST_CPU_ISA", *ISA_CAPS[args.isa])}
    written = write_report(args.out, case_set, info, rows, plots=not args.no_plots)
    print(f"wrote {written['report']}, {written['results']} and {len(written['plots'])} plots")
    if old_rows is not None:
        print(format_changes(compare(old_rows, rows)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast bench", description=__doc__)
    add_arguments(parser)
    return bench_command(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
