"""pytest-benchmark suites over the benchmark cases: op level (cross_attention, latent_attention) and
layer level (a full cross-attention or latent self-attention layer), every provider, float32 and
bfloat16, forward and forward+backward, on CUDA when present, else the CPU.

    pytest benchmarks/test_suite.py --benchmark-json out.json            # the quick set
    PERCEIVER_FAST_BENCH_FULL=1 pytest benchmarks/test_suite.py ...      # every published shape

A provider that cannot run a case is skipped with its reason. Each test's extra_info records the
case, the attention FLOPs and the call's peak extra memory (perceiver_fast.bench.memory). The
same cases and providers make `perceiver-fast bench` (one process per case there, for memory).
"""

from __future__ import annotations

import os

import pytest
import torch

from perceiver_fast.bench.cases import full_cases, quick_cases
from perceiver_fast.bench.memory import peak_extra_mib
from perceiver_fast.bench.providers import layer_providers, op_providers
from perceiver_fast.bench.run import DTYPES, PASSES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = (full_cases if os.environ.get("PERCEIVER_FAST_BENCH_FULL") == "1" else quick_cases)(DEVICE)


def _params(level, providers):
    return [pytest.param(case, provider, id=f"{case.level}-{case.name}-M{case.M}-{provider.name}")
            for case in CASES if case.level == level for provider in providers]


def run(benchmark, case, provider, dtype_name, pass_name):
    dtype = DTYPES[dtype_name]
    reason = provider.refusal(case, dtype, DEVICE)
    if not reason and DEVICE == "cpu" and os.environ.get("PERCEIVER_FAST_BENCH_FULL") != "1":
        reason = provider.full_set_only_on_cpu
    if reason:
        pytest.skip(reason)
    call = provider.prepare(case, dtype, DEVICE, pass_name == "forward+backward")
    benchmark.group = f"{case.level} {case.label()} {dtype_name} {pass_name}"
    if DEVICE == "cuda":
        def timed():
            call()
            torch.cuda.synchronize()
    else:
        timed = call
    benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
    _, peak = peak_extra_mib(call, DEVICE)
    benchmark.extra_info.update(case=case.to_dict(), provider=provider.name, dtype=dtype_name, pass_name=pass_name,
                                attention_gflop=case.attention_flops() * (3 if pass_name != "forward" else 1) / 1e9,
                                peak_extra_mib=peak, device=DEVICE)


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("case, provider", _params("op", op_providers()))
def test_op(benchmark, case, provider, dtype_name, pass_name):
    run(benchmark, case, provider, dtype_name, pass_name)


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("case, provider", _params("layer", layer_providers()))
def test_layer(benchmark, case, provider, dtype_name, pass_name):
    run(benchmark, case, provider, dtype_name, pass_name)
