"""What a GPU machine runs for this project, in one command: `make gpu` (GPU_OUT=folder, GPU_STEPS=...).

Steps, in order, each with its log under the output folder; a failed step does not stop the rest:

  build      the extension with its CUDA kernels, in place (TORCH_CUDA_ARCH_LIST=9.0a)
  tests      the GPU-marked tests
  memcheck   compute-sanitizer --tool memcheck over the Triton and CUDA kernels on small shapes
  racecheck  compute-sanitizer --tool racecheck on one small case per kernel
  bench      the gpu benchmark set (perceiver-fast bench --set gpu)
  table      summary.md: device, driver, versions, each step's result, and the benchmark report

It uses the Python it is run with and installs nothing (a GPU machine may reach no package index).
Without CUDA it says so, prints each step's command (a dry run), writes summary.md and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    about: str
    command: list[str]
    timeout_s: int
    env: tuple[tuple[str, str], ...] = ()


def steps(out: Path) -> list[Step]:
    py = sys.executable
    smoke = [py, str(ROOT / "tools" / "gpu_smoke.py")]
    return [
        Step("build", "the extension with its CUDA kernels, in place", [py, "setup.py", "build_ext", "--inplace"],
             900, (("TORCH_CUDA_ARCH_LIST", "9.0a"), ("MAX_JOBS", str(os.cpu_count() or 4)))),
        Step("tests", "the GPU-marked tests", [py, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p",
                                               "no:cacheprovider", f"--junitxml={out / 'gpu-tests.xml'}"], 900),
        Step("memcheck", "compute-sanitizer memcheck, small shapes",
             ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", *smoke], 600),
        Step("racecheck", "compute-sanitizer racecheck, one case per kernel",
             ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1", *smoke, "--one"], 600),
        Step("bench", "the gpu benchmark set", [py, "-m", "perceiver_fast.cli", "bench", "--set", "gpu", "--device",
                                                "cuda", "--out", str(out)], 1500),
    ]


# The steps that run a command, then "table", which writes summary.md from their results.
STEP_NAMES = (*(step.name for step in steps(Path("."))), "table")


def machine() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device {props.name}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    if shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
        lines.append(f"driver {driver}")
    return lines


def run_step(step: Step, out: Path) -> tuple[str, float]:
    """(result, seconds): "ok", "failed (exit N)", "timed out after N s" or "not run: why"."""
    if shutil.which(step.command[0]) is None and not Path(step.command[0]).exists():
        return f"not run: {step.command[0]} not found", 0.0
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", **dict(step.env)}
    start = time.monotonic()
    with open(out / f"{step.name}.log", "w") as log:
        try:
            code = subprocess.run(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=step.timeout_s).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {step.timeout_s} s", time.monotonic() - start
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - start


def summary(out: Path, results: list[tuple[Step, str, float]], dry_run: bool) -> str:
    lines = ["# perceiver-fast on a GPU: `make gpu`", ""]
    lines += [f"- {line}" for line in machine()]
    lines += ["", "| step | what | result | seconds | log |", "|---|---|---|---:|---|"]
    for step, result, seconds in results:
        lines.append(f"| {step.name} | {step.about} | {result} | {seconds:.0f} | {step.name}.log |")
    reports = sorted(out.glob("report-gpu-*.md"))
    if dry_run:
        lines += ["", "Dry run: no CUDA device here, nothing was run. Each step's command:", ""]
        lines += [f"- {step.name}: `{' '.join(step.command)}`" for step, _, _ in results]
    elif reports:
        lines += ["", "## The gpu benchmark set", "", reports[0].read_text()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results", help="folder for the logs, results and summary.md")
    parser.add_argument("--steps", default=",".join(STEP_NAMES),
                        help="comma-separated steps to run, in their order: " + ", ".join(STEP_NAMES))
    args = parser.parse_args(argv)
    wanted = [s for s in args.steps.split(",") if s]
    unknown = [s for s in wanted if s not in STEP_NAMES]
    if unknown or not wanted:
        parser.error(f"--steps: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(STEP_NAMES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        print(f"make gpu: {sys.executable} has no torch: nothing can run (GPU_PYTHON=... names another Python)")
        return 1
    dry_run = not torch.cuda.is_available()
    if dry_run:
        print("make gpu: no CUDA device here; a dry run of its steps:")
    results = []
    for step in steps(out):
        if step.name not in wanted:
            continue
        if dry_run:
            result, seconds = "dry run", 0.0
            print(f"  {step.name:10s} {step.about}: {' '.join(step.command)}")
        else:
            print(f"[{step.name}] {step.about} ...", flush=True)
            result, seconds = run_step(step, out)
            print(f"[{step.name}] {result} in {seconds:.0f} s (log: {out / (step.name + '.log')})", flush=True)
        results.append((step, result, seconds))
    if "table" in wanted:
        (out / "summary.md").write_text(summary(out, results, dry_run))
        print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
