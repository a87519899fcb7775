"""pytest-benchmark suites over a named case set of `perceiver-fast bench` (perceiver_fast/bench/sets.py):
its cases and providers, float32 and bfloat16, its passes, on CUDA when present and the set runs
there, else the CPU.

    pytest benchmarks/test_suite.py --benchmark-json out.json                           # the quick set
    PERCEIVER_FAST_BENCH_SET=layer pytest benchmarks/test_suite.py --benchmark-json out.json  # another set

A provider that cannot run a case is skipped with its reason. Each test's extra_info records the
case, the attention FLOPs (the report's count; none at model level) and the call's peak extra
memory (perceiver_fast.peak_memory). `perceiver-fast bench` runs the same (one process per case
there, for memory).
"""

from __future__ import annotations

import os

import pytest
import torch

from perceiver_fast.peak_memory import peak_extra_mib
from perceiver_fast.bench.levels import providers_for
from perceiver_fast.bench.providers import why_not
from perceiver_fast.bench.run import DTYPES
from perceiver_fast.bench.sets import SETS

SET = SETS[os.environ.get("PERCEIVER_FAST_BENCH_SET", "quick")]
DEVICE = "cuda" if torch.cuda.is_available() and "cuda" in SET.devices else "cpu"


def _params():
    return [pytest.param(case, provider, id=f"{case.level}-{case.name}-B{case.B}-M{case.M}"
                         f"{'-padded' if case.padded_inputs else ''}-{provider.name}")
            for case in SET.cases(DEVICE) for provider in providers_for(case.level)
            if not SET.providers or provider.name in SET.providers]


@pytest.mark.parametrize("pass_name", SET.passes)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("case, provider", _params())
def test_case(benchmark, case, provider, dtype_name, pass_name):
    dtype, backward = DTYPES[dtype_name], pass_name == "forward+backward"
    reason = why_not(provider, case, dtype, DEVICE, backward, full=SET.name == "full")
    if reason:
        pytest.skip(reason)
    threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        _measure(benchmark, case, provider, call=provider.prepare(case, dtype, DEVICE, backward),
                 dtype_name=dtype_name, pass_name=pass_name)
    finally:
        torch.set_num_threads(threads)


def _measure(benchmark, case, provider, call, dtype_name, pass_name):
    benchmark.group = f"{case.level} {case.label()} {dtype_name} {pass_name}"
    if DEVICE == "cuda":
        def timed():
            call()
            torch.cuda.synchronize()
    else:
        timed = call
    benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
    _, peak = peak_extra_mib(call, DEVICE)
    flops = case.attention_flops(pass_name)
    benchmark.extra_info.update(case=case.to_dict(), provider=provider.name, dtype=dtype_name, pass_name=pass_name,
                                attention_gflop=None if flops is None else flops / 1e9, peak_extra_mib=peak,
                                device=DEVICE)
