"""The `perceiver-fast` command. `check`: compile every Triton kernel configuration for a GPU target."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compile every Triton kernel configuration for a GPU target (no GPU needed)")
    check.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    check.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: up to 2)")
    args = parser.parse_args(argv)

    from .kernels.compile_check import run_check

    return run_check(arch=args.arch, workers=args.workers)


if __name__ == "__main__":
    sys.exit(main())
