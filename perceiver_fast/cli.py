"""The `perceiver-fast` command: bench (the benchmark report) and check (AOT compile of every kernel)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark report")
    bench.add_argument("--out", default="benchmarks/results", help="folder for report.md and results.json")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    check = sub.add_parser("check", help="compile every Triton kernel configuration for a GPU target")
    check.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    args = parser.parse_args(argv)

    if args.command == "bench":
        from .benchmark_report import run_report

        return run_report(out_dir=args.out, device=args.device)
    from .kernels.compile_check import run_check

    return run_check(arch=args.arch)


if __name__ == "__main__":
    sys.exit(main())
