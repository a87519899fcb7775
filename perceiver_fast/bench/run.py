"""Runs benchmark cases: each (case, dtype, pass) in its own process, its providers one after
another there, each timed (median after a warm-up) and its peak memory measured (memory.py). A case
sharded over several ranks runs in that many processes joined by gloo on this machine; its row is
rank 0's time, with every rank's peak memory and the bytes the collectives of one call moved."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from .cases import Case
from ..peak_memory import peak_extra_mib, tensors_mib
from .levels import providers_for
from .providers import why_not
from .report import format_ms

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(case: Case, dtype_name: str, pass_name: str, device: str, repeats: int,
            only: list[str] | None = None, full: bool = False, emit=None) -> list[dict]:
    """One row per provider of the case's level (or those named in `only`): time, peak memory and the
    size of what the call returns (output, and gradients in forward+backward), or why it did not run.

    full: the full set, where providers too slow to set up for the others run on the CPU too. emit:
    called with each row as soon as it is made (a process stopped later keeps the rows before)."""
    from .timing import median_seconds, timed_seconds

    dtype, backward = DTYPES[dtype_name], pass_name == "forward+backward"
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    for provider in providers_for(case.level):
        if only and provider.name not in only:
            continue
        row = {"case": case.to_dict(), "dtype": dtype_name, "pass": pass_name, "provider": provider.name}
        reason = why_not(provider, case, dtype, device, backward, full)
        if reason:
            add({**row, "not_run": reason})
            continue
        try:
            torch.manual_seed(0)
            call = provider.prepare(case, dtype, device, backward)
            # a generation call makes new_tokens tokens: its times are per token
            per_call = case.calls * (case.new_tokens or 1)
            if case.level == "model":  # its rows keep every time: the rounds of a model case are merged
                times = [t / per_call * 1e3 for t in timed_seconds(call, repeats, device)]
                seconds, samples = statistics.median(times) / 1e3, {"times_ms": times}
            else:
                seconds, samples = median_seconds(_loop(call, case.calls), repeats, device) / per_call, {}
            (result, peak), moved = collective_bytes(lambda: peak_extra_mib(call, device))
            outputs = tensors_mib(result)
            phases = _cpu_phases_of(call) if provider.cpu_phases and device == "cpu" else {}
            extras = _extras_of(provider, case, dtype, device, call, result)
            del call, result
            add({**row, "ms": seconds * 1e3, **samples, "peak_extra_mib": peak, "outputs_mib": outputs,
                         **({"collective_bytes": moved} if dist.is_initialized() else {}),
                         **_kernel_label(provider, case, dtype, device, backward), **phases, **extras})
        except Exception as error:  # a provider failing on a case is a result, reported with its reason
            add({**row, "not_run": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"})
    return rows


def cpu_phases(call) -> dict:
    """{"phase_seconds": the cpu attention kernels' seconds per phase (load, pack, gemm, softmax,
    convert, store, merge, key_rows; csrc/cpu/phase_timer.h) summed over threads, "phase_wall_s":
    the wall time of that call, "threads"}, from one more call timed by phase."""
    from ..extension import compiled

    compiled.take_phase_seconds()  # drops what untimed calls left (none: timing is off between)
    compiled.set_phase_timing(True)
    try:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    finally:
        compiled.set_phase_timing(False)
    return {"phase_seconds": compiled.take_phase_seconds(), "phase_wall_s": wall, "threads": torch.get_num_threads()}


def _cpu_phases_of(call) -> dict:
    """cpu_phases(call); a failure to time by phase costs the row its breakdown, not its measurement."""
    try:
        return cpu_phases(call)
    except Exception as error:  # noqa: BLE001 - reported in the row
        return {"phases_not_timed": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"}


def _extras_of(provider, case, dtype, device, call, result) -> dict:
    """The provider's extra fields of the row; a failure to make them costs the row those, not its measurement."""
    if provider.extras is None:
        return {}
    try:
        return provider.extras(case, dtype, device, call, result)
    except Exception as error:  # noqa: BLE001 - reported in the row
        return {"extras_not_made": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"}


def _kernel_label(provider, case, dtype, device, backward) -> dict:
    """{"kernel": which of the provider's library kernels ran}, when it says; a failure to tell costs
    the row its label, not its measurement."""
    if provider.kernel is None:
        return {}
    try:
        return {"kernel": provider.kernel(case, dtype, device, backward)}
    except Exception as error:  # noqa: BLE001 - reported in the row
        return {"kernel": f"unknown ({type(error).__name__})"}


def collective_bytes(call):
    """(call(), bytes this process sent into all-reduces and all-gathers during it)."""
    if not dist.is_initialized():
        return call(), 0
    counted = [0]
    originals = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        counted[0] += tensor.numel() * tensor.element_size()
        return originals[0](tensor, *args, **kwargs)

    def all_gather(tensors, tensor, *args, **kwargs):
        counted[0] += tensor.numel() * tensor.element_size()
        return originals[1](tensors, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        return call(), counted[0]
    finally:
        dist.all_reduce, dist.all_gather = originals


def _loop(call, calls: int):
    if calls == 1:
        return call

    def loop():
        for _ in range(calls):
            call()
    return loop


RANK_DEADLINE_S = 3600
# How a case process writes each row on its stdout, as soon as it is made (what else it prints is not a row).
ROW_MARK = "perceiver-fast-bench-row "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUDGET_CUT = "the run's --budget-s ran out while it measured"
NOT_STARTED = "not started: the run's --budget-s {budget:g} was spent"
BUDGET_REASONS = (BUDGET_CUT, NOT_STARTED.split("{")[0])  # how the rows that the budget cut begin


def rows_of(job: dict, output: tuple[str, str, int], stopped: bool) -> list[dict]:
    """The rows a case process wrote (stdout, stderr, exit code). One that failed, or was stopped at the
    run's budget, keeps the rows it made before; the providers it did not reach get the reason."""
    out, err, code = output
    rows = [json.loads(line[len(ROW_MARK):]) for line in out.splitlines() if line.startswith(ROW_MARK)]
    if code == 0:
        return rows
    reason = (err.strip() or f"exit code {code}").splitlines()[-1][:200]
    why = BUDGET_CUT if stopped else f"the measuring process failed: {reason}"
    done = {row["provider"] for row in rows}
    names = job.get("only") or [p.name for p in providers_for(job["case"]["level"])]
    return rows + [{"case": job["case"], "dtype": job["dtype_name"], "pass": job["pass_name"], "provider": name,
                    "not_run": why} for name in names if name not in done]


def run_job_in_subprocess(job: dict, deadline: float | None = None) -> list[dict]:
    """measure(**job) in a fresh Python process, so that no case's memory or caches reach the next; in
    one process per rank for a sharded case, rank 0's rows with every rank's peak memory. Its processes
    are stopped at `deadline` (time.monotonic()) if they run that long, and its rows then say so."""
    ranks = job["case"].get("ranks", 1)
    command = [sys.executable, "-m", "perceiver_fast.bench.run", json.dumps(job)]
    where = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(ranks)}
    # Files, not pipes: the processes are polled, not read, until they end.
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(ranks)]
    procs = [subprocess.Popen(command, stdout=out, stderr=err, text=True,
                              env=os.environ if ranks == 1 else {**os.environ, **where, "RANK": str(rank)})
             for rank, (out, err) in enumerate(files)]
    # A rank that fails leaves the others waiting in a collective: stop them all at once.
    stop_at = min(float("inf") if deadline is None else deadline, time.monotonic() + RANK_DEADLINE_S)
    stopped = False
    while any(p.poll() is None for p in procs):
        stopped = time.monotonic() > stop_at
        if any(p.returncode for p in procs) or stopped:
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    outputs = []
    for p, (out, err) in zip(procs, files):
        p.wait()
        out.seek(0)
        err.seek(0)
        outputs.append((out.read(), err.read(), p.returncode))
    failed = next((output for output in outputs if output[2] != 0), None)
    if failed is not None:
        # A sharded case's row needs every rank's numbers: none of its rows are kept.
        return rows_of(job, (failed[0] if ranks == 1 else "", *failed[1:]), stopped)
    every = [rows_of(job, output, False) for output in outputs]
    rows = every[0]
    if ranks > 1:
        for row, *others in zip(*every):
            if "peak_extra_mib" in row:
                row["peak_extra_mib_per_rank"] = [row["peak_extra_mib"]] + [o["peak_extra_mib"] for o in others]
                row["peak_extra_mib"] = max(row["peak_extra_mib_per_rank"])
    return rows


# A model case runs in this many rounds of its providers (A B C A B C), its rows merged: the
# machine's slow spells, which last about as long as one provider's process, reach every provider.
MODEL_ROUNDS = 2


def _processes(case: Case, only: list[str] | None) -> list[list[str] | None]:
    """The providers of each process a case runs in: all in one, or at model level one process per
    provider and round, so that no runtime's threads, caches or allocator state reach another's timing."""
    if case.level != "model":
        return [only]
    return [[p.name] for _ in range(MODEL_ROUNDS) for p in providers_for(case.level) if not only or p.name in only]


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (case, dtype, pass, provider): the first round's, with the median over every
    round's times (times_ms) and the largest peak; a provider that failed in any round is reported
    with that round's reason."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (json.dumps(row["case"], sort_keys=True), row["dtype"], row["pass"], row["provider"])
        first = merged.setdefault(key, row)
        if first is row:
            continue
        if "not_run" in row or "not_run" in first:
            # A round the budget cut short leaves the other round's measurement; a failure wins over it.
            kept = [r for r in (first, row) if "not_run" not in r or not r["not_run"].startswith(BUDGET_REASONS)]
            failed = [r for r in kept if "not_run" in r]
            merged[key] = (failed or kept or [first])[0]
            continue
        first["times_ms"] = first["times_ms"] + row["times_ms"]
        first["ms"] = statistics.median(first["times_ms"])
        first["peak_extra_mib"] = max(first["peak_extra_mib"], row["peak_extra_mib"])
    return list(merged.values())


def run_cases(cases: list[Case], dtypes: list[str], passes: list[str], device: str, repeats: int,
              progress=print, only: list[str] | None = None, full: bool = False,
              budget_s: float | None = None) -> list[dict]:
    """Every case x dtype x pass, one process each (one per provider and round at model level, the
    rounds merged), with a progress line per process (measure's `only` and `full` for all of them).
    budget_s: no process starts after that many seconds, and one still running then is stopped; their
    rows say so."""
    jobs = [(case, d, p, names) for case in cases for d in dtypes for p in passes for names in _processes(case, only)]
    rows, start = [], time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    for index, (case, dtype_name, pass_name, names) in enumerate(jobs, 1):
        job = {"case": asdict(case), "dtype_name": dtype_name, "pass_name": pass_name, "device": device,
               "repeats": repeats, "only": names, "full": full}
        if deadline is not None and time.monotonic() >= deadline:
            rows += [{"case": job["case"], "dtype": dtype_name, "pass": pass_name, "provider": name,
                      "not_run": NOT_STARTED.format(budget=budget_s)}
                     for name in names or [p.name for p in providers_for(case.level)]]
            continue
        found = run_job_in_subprocess(job, deadline)
        rows += found
        timed = ", ".join(f"{r['provider']} {format_ms(r['ms'])} ms" for r in found if "ms" in r)
        progress(f"[{index}/{len(jobs)} {time.monotonic() - start:5.0f} s] {case.level} {case.label()} "
                 f"{dtype_name} {pass_name}: {timed or 'nothing ran'}")
    return merge_rounds(rows)


def main(argv=None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    case = Case(**job["case"])
    if case.threads:
        torch.set_num_threads(case.threads)
    if "WORLD_SIZE" in os.environ:  # one rank of a sharded case (run_job_in_subprocess)
        dist.init_process_group("gloo", timeout=timedelta(seconds=RANK_DEADLINE_S))
    measure(case, job["dtype_name"], job["pass_name"], job["device"], job["repeats"], job.get("only"),
            job.get("full", False), emit=lambda row: print(ROW_MARK + json.dumps(row), flush=True))
    if dist.is_initialized():
        dist.barrier()  # the ranks leave together: one tearing the group down while another uses it aborts
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
