"""The cpu backend under torch's float32 matmul precision (perceiver_fast/backends/cpu.py): "ieee" and
"tf32" run full float32; "bf16" runs bfloat16 products with float32 accumulation where the one-time
probe finds them faster, within a bound from bfloat16's 8 significant bits, and says so in pf.explain."""

import pytest
import torch
from checks import random_inputs, reference_with_grads

import perceiver_fast as pf
from perceiver_fast.backends import cpu as cpu_backend


@pytest.fixture
def precision():
    """Sets torch.backends.mkldnn.matmul.fp32_precision for one test, then restores it."""
    saved = torch.backends.mkldnn.matmul.fp32_precision

    def set_to(value):
        torch.backends.mkldnn.matmul.fp32_precision = value

    yield set_to
    torch.set_float32_matmul_precision("highest")  # undoes the legacy API's setting on every backend
    torch.backends.mkldnn.matmul.fp32_precision = saved
    assert torch.get_float32_matmul_precision() == "highest"  # no mix of the two APIs left behind


@pytest.fixture(params=[2.0, 1.0], ids=["bf16-faster", "bf16-slower"])
def probe(request, monkeypatch):
    """Both answers of the one-time speed probe, whatever this CPU measures (a timing near the
    threshold must not decide which branch a test checks)."""
    monkeypatch.setattr(cpu_backend, "bf16_products_speedup", lambda: request.param)
    return request.param


def test_the_probe_measures_a_speedup():
    speedup = cpu_backend.bf16_products_speedup.__wrapped__()
    assert 0.05 < speedup < 50, speedup


def make_inputs(fused: bool) -> list[torch.Tensor]:
    """float32 inputs of one call: q, k, v, or q, x and the projection weights and biases."""
    torch.manual_seed(0)
    if fused:
        return [torch.randn(2, 2, 9, 8), torch.randn(2, 37, 12), torch.randn(16, 12), torch.randn(16),
                torch.randn(16, 12), torch.randn(16)]
    return [t.detach() for t in random_inputs(2, 2, 9, 37, 16, 8)]


def run(fused=False, dtype=torch.float32, causal=True):
    """out and every input's gradient of one cpu-backend call on make_inputs(fused), in dtype."""
    leaves = [t.to(dtype).requires_grad_() for t in make_inputs(fused)]
    if fused:
        q, x, wk, bk, wv, bv = leaves
        out = pf.fused_input_attention(q, x, k_weight=wk, k_bias=bk, v_weight=wv, v_bias=bv, method="projection",
                                       causal=causal, backend="cpu")
    else:
        out = pf.cross_attention(*leaves, causal=causal, backend="cpu")
    torch.manual_seed(1)
    dout = torch.randn(out.shape).to(dtype)
    return [out, *torch.autograd.grad(out, leaves, dout)]


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("fused", [False, True], ids=["attention", "fused-input"])
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_each_mode_against_full_float32_and_float64(precision, probe, mode, fused):
    full = run(fused=fused)
    precision(mode)
    got = run(fused=fused)
    assert all(t.dtype == torch.float32 for t in got)
    assert cpu_backend.float32_products() == ("bfloat16" if mode == "bf16" and probe >= cpu_backend.BF16_SPEEDUP_NEEDED else "float32")
    if cpu_backend.float32_products() == "float32":  # tf32, or bf16 where bfloat16 is not faster
        for a, b in zip(got, full):
            assert torch.equal(a, b)
        return
    # bf16: inputs rounded to 8 significant bits, products of two of them, float32 sums: the outputs
    # and gradients stay within a few units of bfloat16's rounding (2^-8) of the float64 results.
    precision("ieee")
    exact = run(dtype=torch.float64, fused=fused)
    names = ("out", "dq", "dx", "dwk", "dbk", "dwv", "dbv") if fused else ("out", "dq", "dk", "dv")
    largest = max(t.norm().item() for t in exact)
    for name, a, b, reference in zip(names, got, full, exact):
        if name == "dbk":  # exactly 0: a shift of every key by one vector moves a row's scores by a constant
            assert (a.double() - reference).norm() <= 4 * 2**-8 * largest, name
            continue
        error = relative_error(a, reference)
        assert error <= 4 * 2**-8, (name, error)
        assert error > relative_error(b, reference), (name, "no bfloat16 rounding seen: did bf16 run?")


def test_bf16_mode_runs_the_bfloat16_kernels_on_rounded_inputs(precision, monkeypatch):
    monkeypatch.setattr(cpu_backend, "bf16_products_speedup", lambda: 2.0)
    precision("bf16")
    q, k, v = random_inputs(1, 2, 7, 30, 16, 16)
    out = pf.cross_attention(q, k, v, causal=True, backend="cpu")
    precision("ieee")
    halved = pf.cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, backend="cpu")
    assert torch.equal(out, halved.float())


def test_other_dtypes_ignore_the_float32_precision(precision):
    for dtype in (torch.float64, torch.bfloat16):
        before = run(dtype=dtype)
        precision("bf16")
        after = run(dtype=dtype)
        precision("ieee")
        assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(after, before))


def test_explain_says_which_mode_runs(precision, probe):
    q, k, v = random_inputs(1, 2, 7, 30, 16, 16)
    assert pf.explain(q, k, v)["cpu"] == []
    precision("tf32")
    assert pf.explain(q, k, v)["cpu"] == ["runs full float32 (more precise than the 'tf32' precision torch allows)"]
    torch.set_float32_matmul_precision("medium")  # torch's own API sets fp32_precision to "bf16"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    note = pf.explain(q, k, v)["cpu"]
    expected = "runs float32 with bfloat16 products" if probe >= cpu_backend.BF16_SPEEDUP_NEEDED else "runs full float32 although"
    assert len(note) == 1 and note[0].startswith(expected), note
    assert pf.explain(q.double(), k.double(), v.double())["cpu"] == []
