"""What a GPU machine runs for this project, in one command inside a time budget: `make gpu` (GPU_OUT=folder,
GPU_STEPS=..., GPU_BUDGET_S=...).

Steps, most valuable first, each with its log under the output folder; a failed step does not stop the rest:

  build      the prebuilt extension of .gpu-prebuilt/ (make gpu-prebuild) where it matches this Python,
             torch, GPU and tree; else the extension with its CUDA kernels, built in place (sm_90a)
  smoke      every Triton and CUDA kernel on small shapes against float64: forward, backward, key
             masks, causal, dropout, both input methods (tools/gpu_smoke.py)
  tests      the GPU-marked tests (on 8 workers where pytest-xdist is installed)
  bench      the six op-level cases of the gpu benchmark set: our backends against SDPA (and flash-attn)
  flex       the same cases on FlexAttention, apart: it compiles for each case, so it comes after
  memcheck   compute-sanitizer memcheck over the smoke, one small case per kernel
  model      the gpu set's layers (HF vision-fourier and language) and the whole vision-fourier model,
             patched against HF
  racecheck  compute-sanitizer racecheck, one small case per kernel (only when named in --steps)

The budget (--budget-s) is shared out: each step may take its share plus what the steps before it left
unused, and stops (its whole process group) when that runs out; the benchmark steps stop starting cases
before then, so that they still write their reports. summary.md (device, driver, versions, each step's
result and last line, the benchmark reports, the command that reruns what did not pass) is rewritten
after every step, and --copy-to gets it and an archive of the whole folder after every step, so that a
run stopped from outside keeps what it finished.

It uses the Python it is run with and installs nothing (a GPU machine may reach no package index).
Without CUDA it says so, prints what each step would run (a dry run), writes summary.md and exits 0
(1 with --expect-prebuilt where the build step would not take the prebuilt extension; with --require-cuda,
1 and torch's reason instead of a dry run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gpu_prebuild

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540  # a device command is capped at 600 s; of 15 minutes, the rest: the start, a short rerun
BENCH_MARGIN_S = 45  # what a benchmark step keeps after its last case starts: that case and the report
LEAST_USEFUL_S = 15  # a step left less than this is not started


@dataclass
class Step:
    name: str
    about: str
    command: list[str]
    share_s: int  # its part of the budget
    env: dict[str, str] = field(default_factory=dict)
    bench: bool = False  # takes --budget-s: stops starting cases in time to write its report


# Without torch's caching allocator every tensor is its own allocation, so the sanitizer sees an access
# past one even where the cache would have put another block there.
SANITIZED = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


def steps(out: Path) -> list[Step]:
    py = sys.executable
    smoke = [py, str(ROOT / "tools" / "gpu_smoke.py")]
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    bench = [py, "-m", "perceiver_fast.cli", "bench", "--set", "gpu", "--device", "cuda", "--no-plots"]
    return [
        Step("build", "the extension with its CUDA kernels", [py, "setup.py", "build_ext", "--inplace"], 150,
             {"TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": str(os.cpu_count() or 4)}),
        Step("smoke", "each kernel against float64, small shapes", smoke, 90),
        Step("tests", "the GPU-marked tests", [py, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                               "--continue-on-collection-errors", *workers,
                                               f"--junitxml={out / 'gpu-tests.xml'}"], 120),
        Step("bench", "six op-level cases, ours against SDPA",
             [*bench, "--levels", "op", "--providers", "perceiver_fast[triton],perceiver_fast[cuda],sdpa,flash_attn",
              "--out", str(out / "bench-op")], 120, bench=True),
        Step("flex", "the six op-level cases on FlexAttention",
             [*bench, "--levels", "op", "--providers", "flex_attention", "--out", str(out / "bench-flex")], 90,
             bench=True),
        Step("memcheck", "compute-sanitizer memcheck, one case per kernel",
             ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", *smoke, "--one"], 60, SANITIZED),
        Step("model", "HF layers and the vision-fourier model, patched against HF",
             [*bench, "--levels", "layer,model", "--out", str(out / "bench-model")], 90, bench=True),
        Step("racecheck", "compute-sanitizer racecheck, one case per kernel",
             ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1", *smoke, "--one"], 60, SANITIZED),
    ]


STEP_NAMES = tuple(step.name for step in steps(Path(".")))
DEFAULT_STEPS = STEP_NAMES[:-1]  # racecheck runs only when asked for


@dataclass
class Result:
    step: Step
    result: str  # "ok", "prebuilt", "failed (exit N)", "stopped after N s (its time ran out)", "not run: why", ...
    seconds: float = 0.0
    last_line: str = ""

    @property
    def passed(self) -> bool:
        return self.result in ("ok", "prebuilt", "dry run")


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
        lines.append(f"device {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    if shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
        lines.append(f"driver {driver}")
    return lines


def prebuilt_verdict() -> tuple[dict | None, str | None]:
    """(manifest, None) when .gpu-prebuilt/ can run here, else (manifest, why not)."""
    import torch

    manifest = gpu_prebuild.read_manifest()
    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    return manifest, gpu_prebuild.verdict(manifest, torch.__version__, capability)


def cuda_kernels_missing(root: Path) -> str | None:
    """None when the package under `root` loads its extension with the CUDA kernels in this Python, else why
    not (what the package itself says when its extension does not load)."""
    check = ("import perceiver_fast.extension as e; "
             "print('ok' if e.HAS_CUDA_KERNELS else e.LOAD_ERROR or 'the extension has no CUDA kernels')")
    proc = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    said = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["nothing"])[-1]
    return None if proc.returncode == 0 and said == "ok" else f"the prebuilt extension does not load here: {said}"


def cuda_failure() -> str:
    """Why torch.cuda does not start here, in torch's words."""
    import torch

    if not torch.version.cuda:
        return f"torch {torch.__version__} is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as error:  # noqa: BLE001 - its message is the answer
        return f"{type(error).__name__}: {error}"
    return f"torch.cuda.is_available() is False with {torch.cuda.device_count()} devices"


def last_line(log: Path) -> str:
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def run_step(step: Step, out: Path, seconds: float, package: Path = ROOT / "perceiver_fast") -> Result:
    """Runs the step for at most `seconds`, in its own process group, stopped whole when they run out. The
    build step installs the prebuilt extension into `package` where it matches."""
    if step.name == "build":
        manifest, why_not = prebuilt_verdict()
        if why_not is None:
            target = gpu_prebuild.install(manifest, package=package)
            why_not = cuda_kernels_missing(package.parent)
            if why_not is None:
                (out / "build.log").write_text(f"installed {target} from {gpu_prebuild.PREBUILT.name}/ "
                                               f"(built {manifest['built']}, torch {manifest['torch']})\n")
                return Result(step, "prebuilt", 0.0, f"prebuilt {manifest['extension']} (built {manifest['built']})")
            target.unlink()
        (out / "build.log").write_text(f"not the prebuilt extension: {why_not}\n")
    if shutil.which(step.command[0]) is None and not Path(step.command[0]).exists():
        return Result(step, f"not run: {step.command[0]} not found")
    command = step.command + (["--budget-s", str(int(seconds - BENCH_MARGIN_S))] if step.bench else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", **step.env}
    start = time.monotonic()
    with open(out / f"{step.name}.log", "a") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its children too: a benchmark case, the sanitizer's target
            except ProcessLookupError:  # the group ended just then
                pass
            process.wait()
            code = None
    took = time.monotonic() - start
    result = "ok" if code == 0 else f"failed (exit {code})" if code is not None else \
        f"stopped after {took:.0f} s (its time ran out)"
    return Result(step, result, took, last_line(out / f"{step.name}.log"))


def run_steps(chosen: list[Step], out: Path, budget_s: int, copy_to: Path | None, runner=None,
              again_as: str = "make gpu GPU_STEPS={steps} GPU_BUDGET_S={budget}") -> list[Result]:
    """Runs the steps in order inside budget_s: each for at most its share plus what the steps before it left
    unused; one left too little is not started. summary.md (and copy_to) are rewritten after every step;
    again_as is how it writes the command that reruns what did not pass."""
    runner = runner or run_step
    deadline = time.monotonic() + budget_s
    spare, results = 0.0, []
    for step in chosen:
        left = deadline - time.monotonic()
        seconds = min(step.share_s + spare, left)
        if seconds < LEAST_USEFUL_S or (step.bench and seconds < BENCH_MARGIN_S + LEAST_USEFUL_S):
            result = Result(step, f"not run: {max(left, 0):.0f} s of the budget left")
        else:
            print(f"[{step.name}] {step.about}, at most {seconds:.0f} s ...", flush=True)
            start = time.monotonic()
            try:
                result = runner(step, out, seconds)
            except Exception as error:  # noqa: BLE001 - one step's failure is reported, and the others run
                result = Result(step, f"failed: {type(error).__name__}: {error}"[:200], time.monotonic() - start)
            spare = max(0.0, seconds - result.seconds)
        print(f"[{step.name}] {result.result} in {result.seconds:.0f} s: {result.last_line}", flush=True)
        results.append(result)
        try:
            record(out, summary(out, results, False, budget_s, again_as), copy_to)
        except OSError as error:  # a full disk or an unwritable copy_to costs the records, not the run
            print(f"[{step.name}] could not write the summary: {error}", flush=True)
    return results


def rerun_command(results: list[Result], budget_s: int, again_as: str) -> str | None:
    """The command (again_as, with {steps} and {budget}) that reruns what did not pass, after the build step
    (a fresh machine has no extension)."""
    again = [r.step.name for r in results if not r.passed and r.step.name != "build"]
    if not again and all(r.passed for r in results):
        return None
    return again_as.format(steps=",".join(["build", *again]), budget=budget_s)


def summary(out: Path, results: list[Result], dry_run: bool, budget_s: int, again_as: str = "") -> str:
    lines = ["# perceiver-fast on a GPU: `make gpu`", ""]
    lines += [f"- {line}" for line in machine()]
    lines += [f"- budget {budget_s} s", "", "| step | what | result | seconds | last line of its log |",
              "|---|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.step.name} | {r.step.about} | {r.result} | {r.seconds:.0f} | "
                     f"{r.last_line.replace('|', '/')} |")
    if dry_run:
        lines += ["", "Dry run: no CUDA device here, nothing was run. Each step, its share of the budget and what it "
                      "would run:", ""]
        lines += [f"- {r.step.name} ({r.step.share_s} s): {dry_run_line(r.step)}" for r in results]
        return "\n".join(lines) + "\n"
    again = rerun_command(results, budget_s, again_as)
    lines += ["", f"To rerun what did not pass: `{again}`" if again else "Every step passed."]
    for folder in ("bench-op", "bench-flex", "bench-model"):
        for report in sorted((out / folder).glob("report-*.md")):
            lines += ["", f"## {folder}/{report.name}", "", report.read_text()]
    return "\n".join(lines) + "\n"


def record(out: Path, text: str, copy_to: Path | None) -> None:
    """summary.md into the output folder; with copy_to, it and an archive of the whole folder there too."""
    (out / "summary.md").write_text(text)
    if copy_to is None:
        return
    copy_to.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "summary.md", copy_to / "summary.md")
    partial = copy_to / "gpu-run.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(out, arcname="gpu-run")
    partial.replace(copy_to / "gpu-run.tar.gz")


def dry_run_line(step: Step) -> str:
    if step.name == "build":
        manifest, why_not = prebuilt_verdict()
        if why_not is None:
            return (f"installs the prebuilt {gpu_prebuild.PREBUILT.name}/{manifest['extension']} "
                    f"(built {manifest['built']})")
        return f"builds ({why_not}): {' '.join(step.command)}"
    return " ".join(step.command + (["--budget-s", "N"] if step.bench else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results",
                        help="folder for the logs, the benchmark reports and summary.md")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                        help="comma-separated steps to run, in this order: " + ", ".join(STEP_NAMES)
                             + f" (default: {', '.join(DEFAULT_STEPS)})")
    parser.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--copy-to", type=Path, default=None,
                        help="after every step, copy summary.md and gpu-run.tar.gz (the whole output folder) here")
    parser.add_argument("--expect-prebuilt", action="store_true",
                        help="exit 1 if the build step would not take the prebuilt extension of .gpu-prebuilt/")
    parser.add_argument("--require-cuda", action="store_true",
                        help="exit 1, saying why, where CUDA does not start (on a GPU machine: no dry run)")
    args = parser.parse_args(argv)
    wanted = [s for s in args.steps.split(",") if s]
    unknown = [s for s in wanted if s not in STEP_NAMES]
    if unknown or not wanted:
        parser.error(f"--steps: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(STEP_NAMES)}")
    if args.budget_s < LEAST_USEFUL_S:
        parser.error(f"--budget-s: at least {LEAST_USEFUL_S}, got {args.budget_s}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        print(f"make gpu: {sys.executable} has no torch: nothing can run (GPU_PYTHON=... names another Python)")
        return 1
    if args.expect_prebuilt:
        _, why_not = prebuilt_verdict()
        if why_not is not None:
            print(f"make gpu: the build step would not take the prebuilt extension: {why_not}")
            return 1
    chosen = [step for step in steps(out) if step.name in wanted]
    dry_run = not torch.cuda.is_available()
    if dry_run and args.require_cuda:
        print(f"make gpu: CUDA does not start here: {cuda_failure()}")
        return 1
    if dry_run:
        print("make gpu: no CUDA device here; a dry run of its steps:")
        results = [Result(step, "dry run") for step in chosen]
        for step in chosen:
            print(f"  {step.name:10s} {step.about} ({step.share_s} s): {dry_run_line(step)}")
        record(out, summary(out, results, True, args.budget_s), args.copy_to)
        print(f"wrote {out / 'summary.md'}")
        return 0

    again_as = (f"{Path(sys.executable).name} tools/gpu_run.py --steps {{steps}} --budget-s {{budget}} --out {out}"
                + (f" --copy-to {args.copy_to}" if args.copy_to else "")
                + (" --require-cuda" if args.require_cuda else ""))
    results = run_steps(chosen, out, args.budget_s, args.copy_to, again_as=again_as)
    print(f"wrote {out / 'summary.md'}")
    again = rerun_command(results, args.budget_s, again_as)
    print(f"to rerun what did not pass: {again}" if again else "every step passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
