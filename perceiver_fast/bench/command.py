"""`perceiver-fast bench`: run the benchmark set, write the report, compare with an earlier run."""

from __future__ import annotations

import argparse
import sys

from .run import DTYPES, PASSES

LEVELS = ("op", "layer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="every published shape and longer input sweeps (default: the quick set, minutes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated from " + ", ".join(DTYPES))
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated from " + ", ".join(PASSES))
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated from " + ", ".join(LEVELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per provider (median)")
    parser.add_argument("--out", default="bench-results", help="folder for report-<device>.md, results-<device>.json, plots")
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
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    dtypes = _split(parser, "dtypes", args.dtypes, DTYPES)
    passes = _split(parser, "passes", args.passes, PASSES)
    levels = _split(parser, "levels", args.levels, LEVELS)

    import torch

    from .cases import full_cases, quick_cases
    from .report import write_report
    from .run import run_cases
    from .timing import machine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cases = [c for c in (full_cases if args.full else quick_cases)(device) if c.level in levels]
    print(f"perceiver-fast bench: {len(cases)} cases x {len(dtypes)} dtypes x {len(passes)} passes on {device}, "
          f"{'full' if args.full else 'quick'} set", flush=True)
    rows = run_cases(cases, dtypes, passes, device, args.repeats, progress=lambda line: print(line, flush=True),
                     full=args.full)
    written = write_report(args.out, machine(device), rows, plots=not args.no_plots)
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
