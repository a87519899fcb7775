"""Backend selection: capabilities, auto choice, explicit refusals that say why."""

import pytest
import torch

import perceiver_fast as pf
from perceiver_fast.backends import TritonBackend
from perceiver_fast.dispatch import BACKENDS, select_backend
from perceiver_fast.validation import validate_attention as validate


def problem(dtype=torch.float32, **kw):
    q, k, v = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 5, 8, dtype=dtype), torch.randn(1, 2, 5, 4, dtype=dtype)
    return validate(q, k, v, **kw)


@pytest.fixture
def interpreting(monkeypatch):
    """Sets whether the Triton backend takes CPU tensors (as TRITON_INTERPRET=1 at import does)."""
    return lambda on: monkeypatch.setattr(TritonBackend, "interpreting", on)


def test_every_backend_declares_its_capabilities():
    names = [b.name for b in BACKENDS]
    assert names == list(pf.BACKEND_NAMES) and len(set(names)) == len(names)
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
    assert reasons["reference"] == [] and reasons["cpu"] == []
    assert any("TRITON_INTERPRET" in r for r in reasons["triton"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_backend_output_dtype_and_lse(dtype):
    q, k, v = torch.randn(2, 1, 3, 4, dtype=dtype), torch.randn(2, 1, 5, 4, dtype=dtype), torch.randn(2, 1, 5, 6, dtype=dtype)
    out, lse = pf.cross_attention(q, k, v, return_lse=True, backend="reference")
    assert out.dtype == dtype and out.shape == (2, 1, 3, 6)
    assert lse.dtype == torch.float32 and lse.shape == (2, 1, 3)
