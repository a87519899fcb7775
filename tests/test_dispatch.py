"""Backend selection: capabilities, auto choice, explicit refusals that say why."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from checks import besides_level

import perceiver_fast as pf
from perceiver_fast.backends import TritonBackend
from perceiver_fast.dispatch import BACKENDS, select_backend
from perceiver_fast.validation import validate_attention as validate
from perceiver_fast.validation import validate_input_attention


def problem(dtype=torch.float32, **kw):
    q, k, v = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 5, 8, dtype=dtype), torch.randn(1, 2, 5, 4, dtype=dtype)
    return validate(q, k, v, **kw)


@pytest.fixture
def interpreting(monkeypatch):
    """Sets whether the Triton backend takes CPU tensors (as TRITON_INTERPRET=1 at import does)."""
    return lambda on: monkeypatch.setattr(TritonBackend, "interpreting", on)


def test_every_backend_declares_its_capabilities():
    names = [b.name for b in BACKENDS]
    assert names + ["onnx"] == list(pf.BACKEND_NAMES) and len(set(names)) == len(names)
    assert names[-1] == "reference", "the reference is the last resort of auto dispatch"
    for backend in BACKENDS:
        caps = backend.capabilities
        assert caps.devices and caps.dtypes and caps.max_dim_qk >= 1 and caps.max_dim_v >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_on_cpu_picks_the_cpu_backend(interpreting, dtype):
    interpreting(False)
    assert select_backend(problem(dtype), None).name == "cpu"
    assert select_backend(problem(dtype), "auto").name == "cpu"


def test_auto_on_cpu_falls_back_to_reference_for_float16(interpreting):
    interpreting(False)
    assert select_backend(problem(torch.float16), None).name == "reference"
    with pytest.raises(pf.BackendUnsupportedError, match="dtype float16 not supported"):
        select_backend(problem(torch.float16), "cpu")


def test_auto_never_picks_the_interpreter(interpreting):
    interpreting(True)
    assert select_backend(problem(), None).name == "cpu"
    assert select_backend(problem(), "triton").name == "triton"


def test_cpu_backend_refuses_other_devices():
    q, k, v = (torch.randn(1, 2, n, 8, device="meta") for n in (3, 5, 5))
    cpu = next(b for b in BACKENDS if b.name == "cpu")
    assert cpu.refusals(validate(q, k, v), explicit=True) == ["device meta not supported (supports cpu)"]


def test_explicit_backend_refusal_lists_reasons(interpreting):
    interpreting(False)
    with pytest.raises(pf.BackendUnsupportedError) as info:
        select_backend(problem(torch.float64), "triton")
    message = str(info.value)
    assert "backend 'triton' cannot run attention (cross) B=1 H=2 N=3 M=5 Dqk=8 Dv=4 float64 on cpu" in message
    assert "dtype float64 not supported" in message
    assert "TRITON_INTERPRET=1" in message
    assert isinstance(info.value, ValueError)


def test_public_function_raises_for_explicit_refusal(interpreting):
    interpreting(False)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(pf.BackendUnsupportedError, match="Triton interpreter"):
        pf.cross_attention(q, k, v, backend="triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be None, 'auto' or one of 'triton', 'cuda', 'cpu', 'reference'"):
        select_backend(problem(), "flash")
    with pytest.raises(TypeError, match="backend must be a str or None"):
        select_backend(problem(), 3)


def test_explain_reports_each_backend(interpreting):
    interpreting(False)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    reasons = pf.explain(q, k, v)
    assert list(reasons) == ["triton", "cuda", "cpu", "reference"]
    assert reasons["reference"] == [] and besides_level(reasons["cpu"]) == []
    assert any("TRITON_INTERPRET" in r for r in reasons["triton"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_backend_output_dtype_and_lse(dtype):
    q, k, v = torch.randn(2, 1, 3, 4, dtype=dtype), torch.randn(2, 1, 5, 4, dtype=dtype), torch.randn(2, 1, 5, 6, dtype=dtype)
    out, lse = pf.cross_attention(q, k, v, return_lse=True, backend="reference")
    assert out.dtype == dtype and out.shape == (2, 1, 3, 6)
    assert lse.dtype == torch.float32 and lse.shape == (2, 1, 3)


def input_problem(dtype=torch.float32, method="auto", **kw):
    q, x = torch.randn(1, 2, 3, 4, dtype=dtype), torch.randn(1, 6, 5, dtype=dtype)
    weights = dict(k_weight=torch.randn(8, 5, dtype=dtype), v_weight=torch.randn(6, 5, dtype=dtype))
    return (q, x), weights, validate_input_attention(q, x, **weights, method=method, **kw)


@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_auto_runs_the_input_attention_fused_on_the_cpu(interpreting, method):
    interpreting(False)
    _, _, problem = input_problem(method=method)
    backend = select_backend(problem, None)
    assert backend.name == "cpu" and backend.unfused_reason(problem) is None


def test_input_attention_the_cpu_kernel_cannot_run_goes_composed_or_raises(interpreting):
    interpreting(False)
    args, weights, problem = input_problem(torch.float16)
    assert select_backend(problem, None).name == "reference"  # composed on the reference attention
    with pytest.raises(pf.BackendUnsupportedError, match="backend 'cpu' cannot run input attention .*float16"):
        select_backend(problem, "cpu")
    verdicts = pf.explain(pf.fused_input_attention, *args, **weights)
    assert verdicts["reference"] == ["runs unfused: has no fused input attention"]
    assert any("dtype float16 not supported" in r for r in verdicts["cpu"])


def test_a_named_backend_that_fuses_another_method_runs_composed(interpreting, monkeypatch):
    interpreting(True)
    _, _, problem = input_problem(method="projection")
    triton = select_backend(problem, "triton")
    assert triton.unfused_reason(problem) is None  # Triton fuses both methods
    monkeypatch.setattr(type(triton), "fused_input_methods", frozenset({"shortcut"}))
    assert triton.unfused_reason(problem) == "fuses only the shortcut method, not projection"
    shortcut = input_problem(method="shortcut")[2]
    assert select_backend(shortcut, "triton").unfused_reason(shortcut) is None


def test_explain_takes_any_op_and_names_bad_ones(interpreting):
    interpreting(False)
    q = torch.randn(1, 2, 4, 8)
    assert besides_level(pf.explain(pf.latent_attention, q, q, q)["cpu"]) == []
    assert besides_level(pf.explain(pf.cross_attention, q, q, q, backend="reference", return_lse=True)["cpu"]) == []
    with pytest.raises(TypeError, match="op must be one of pf.cross_attention"):
        pf.explain(print, q, q, q)
    with pytest.raises(ValueError, match="latent_attention is self-attention"):
        pf.explain(pf.latent_attention, q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))


@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_a_capped_instruction_set_level_still_runs_the_cpu_kernels_and_explain_says_how_it_measured(level):
    """The level is settled at import (PERCEIVER_FAST_CPU_ISA), so a process of its own: auto dispatch
    keeps the cpu backend (SDPA does not keep the contract on non-finite inputs) and says how the
    level's kernels measured against SDPA; at avx512_bf16 it says nothing."""
    from perceiver_fast import extension
    if extension.compiled is None or level not in extension.compiled.cpu_features()["isa_levels"]:
        pytest.skip(f"no {level} level on this architecture")
    code = ("import torch, perceiver_fast as pf\n"
            "from perceiver_fast.dispatch import select_backend\n"
            "from perceiver_fast.validation import validate_attention\n"
            "q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 7, 8)\n"
            "print(select_backend(validate_attention(q, k, k), None).name)\n"
            "print(pf.explain(q, k, k)['cpu'])\n")
    env = {**os.environ, "PERCEIVER_FAST_CPU_ISA": level}
    # Out of the source tree, so that the package imported is the one under test (an installed copy in CI's other venvs).
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           cwd=tempfile.gettempdir()).stdout.splitlines()
    assert lines[0] == "cpu"
    assert f"runs at instruction-set level {level!r}: " in lines[1] and "SDPA" in lines[1]
