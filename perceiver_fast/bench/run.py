"""Runs benchmark cases: each (case, dtype, pass) in its own process, its providers one after
another there, each timed (median after a warm-up) and its peak memory measured (memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from .cases import Case
from ..peak_memory import peak_extra_mib, tensors_mib
from .levels import providers_for
from .providers import why_not
from .report import format_ms

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(case: Case, dtype_name: str, pass_name: str, device: str, repeats: int,
            only: list[str] | None = None, full: bool = False) -> list[dict]:
    """One row per provider of the case's level (or those named in `only`): time, peak memory and the
    size of what the call returns (output, and gradients in forward+backward), or why it did not run.

    full: the full set, where providers too slow to set up for the others run on the CPU too."""
    from .timing import median_seconds

    dtype, backward = DTYPES[dtype_name], pass_name == "forward+backward"
    rows = []
    for provider in providers_for(case.level):
        if only and provider.name not in only:
            continue
        row = {"case": case.to_dict(), "dtype": dtype_name, "pass": pass_name, "provider": provider.name}
        reason = why_not(provider, case, dtype, device, backward, full)
        if reason:
            rows.append({**row, "not_run": reason})
            continue
        try:
            torch.manual_seed(0)
            call = provider.prepare(case, dtype, device, backward)
            seconds = median_seconds(_loop(call, case.calls), repeats, device) / case.calls
            result, peak = peak_extra_mib(call, device)
            outputs = tensors_mib(result)
            del call, result
            rows.append({**row, "ms": seconds * 1e3, "peak_extra_mib": peak, "outputs_mib": outputs,
                         **_kernel_label(provider, case, dtype, device, backward)})
        except Exception as error:  # a provider failing on a case is a result, reported with its reason
            rows.append({**row, "not_run": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
    return rows


def _kernel_label(provider, case, dtype, device, backward) -> dict:
    """{"kernel": which of the provider's library kernels ran}, when it says; a failure to tell costs
    the row its label, not its measurement."""
    if provider.kernel is None:
        return {}
    try:
        return {"kernel": provider.kernel(case, dtype, device, backward)}
    except Exception as error:  # noqa: BLE001 - reported in the row
        return {"kernel": f"unknown ({type(error).__name__})"}


def _loop(call, calls: int):
    if calls == 1:
        return call

    def loop():
        for _ in range(calls):
            call()
    return loop


def run_job_in_subprocess(job: dict) -> list[dict]:
    """measure(**job) in a fresh Python process, so that no case's memory or caches reach the next."""
    proc = subprocess.run([sys.executable, "-m", "perceiver_fast.bench.run", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()[-1][:200]
        return [{"case": job["case"], "dtype": job["dtype_name"], "pass": job["pass_name"], "provider": name,
                 "not_run": f"the measuring process failed: {reason}"} for name in job.get("only") or ["all"]]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(cases: list[Case], dtypes: list[str], passes: list[str], device: str, repeats: int,
              progress=print, only: list[str] | None = None, full: bool = False) -> list[dict]:
    """Every case x dtype x pass, one process each, with a progress line per process (measure's
    `only` and `full` for all of them)."""
    jobs = [(case, d, p) for case in cases for d in dtypes for p in passes]
    rows, start = [], time.monotonic()
    for index, (case, dtype_name, pass_name) in enumerate(jobs, 1):
        job = {"case": asdict(case), "dtype_name": dtype_name, "pass_name": pass_name, "device": device,
               "repeats": repeats, "only": only, "full": full}
        found = run_job_in_subprocess(job)
        rows += found
        timed = ", ".join(f"{r['provider']} {format_ms(r['ms'])} ms" for r in found if "ms" in r)
        progress(f"[{index}/{len(jobs)} {time.monotonic() - start:5.0f} s] {case.level} {case.label()} "
                 f"{dtype_name} {pass_name}: {timed or 'nothing ran'}")
    return rows


def main(argv=None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    case = Case(**job["case"])
    print(json.dumps(measure(case, job["dtype_name"], job["pass_name"], job["device"], job["repeats"],
                             job.get("only"), job.get("full", False))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
