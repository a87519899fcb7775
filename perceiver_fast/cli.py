"""The `perceiver-fast` command.

  info    what this installation has: versions, the compiled extension (or why it does not load), each backend
  check   compile every Triton kernel configuration for a GPU target (no GPU needed)
  bench   run a benchmark case set (--set) and write its report (tables, plots, JSON); --compare an earlier run
  profile where time and memory go in a named Perceiver, with and without pf.patch
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what this installation has: versions, the compiled extension (or why it does not "
                                "load), each backend")
    check = sub.add_parser("check", help="compile every Triton kernel configuration for a GPU target (no GPU needed)")
    check.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    check.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: up to 2)")
    from .bench.command import add_arguments, bench_command

    bench = sub.add_parser("bench", help="run a benchmark case set and write its report")
    add_arguments(bench)
    from .profiler.command import add_arguments as add_profile_arguments
    from .profiler.command import profile_command

    profile = sub.add_parser("profile", help="per-part time and memory of a named Perceiver, with and without pf.patch")
    add_profile_arguments(profile)
    args = parser.parse_args(argv)

    if args.command == "info":
        from .installation import installation_report

        print("\n".join(installation_report()))
        return 0
    if args.command == "bench":
        return bench_command(args, bench)
    if args.command == "profile":
        return profile_command(args, profile)
    from .kernels.compile_check import run_check

    return run_check(arch=args.arch, workers=args.workers)


if __name__ == "__main__":
    sys.exit(main())
