"""The cpu backend under torch's float32 matmul precision (perceiver_fast/backends/cpu.py): "ieee" runs
full float32; "tf32" runs the attention kernels' split bfloat16 products (about 16 significant bits)
and "bf16" bfloat16 products, each with float32 accumulation, where the one-time probe finds them
faster, within a bound from their significant bits, and says so in pf.explain."""

import pytest
import torch
from checks import (CROSS_SHAPES, besides_level, ISA_PATHS, forced_cpu_path, MASKINGS, check_attention, kernel_runner, random_inputs, random_key_mask,
                    reference_with_grads)

import perceiver_fast as pf
from perceiver_fast.backends import cpu as cpu_backend
from perceiver_fast.extension import compiled as _C


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


@pytest.fixture(params=[2.0, 1.0], ids=["faster", "slower"])
def probe(request, monkeypatch):
    """Both answers of the one-time speed probes, whatever this CPU measures (a timing near the
    threshold must not decide which branch a test checks)."""
    monkeypatch.setattr(cpu_backend, "bf16_products_speedup", lambda: request.param)
    monkeypatch.setattr(cpu_backend, "split_products_speedup", lambda: request.param)
    return request.param


@pytest.mark.parametrize("measure", ["bf16_products_speedup", "split_products_speedup"])
def test_the_probes_measure_a_speedup(measure):
    speedup = getattr(cpu_backend, measure).__wrapped__()
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


# Each mode's products against float64: bfloat16 rounds inputs to 8 significant bits, split
# bfloat16 keeps about 16 (a float32 as hi + lo, lo * lo dropped); float32 sums. Outputs and
# gradients stay within a few units of that rounding (2^-8, 2^-16) of the float64 results.
SIGNIFICANT_BITS = {"bfloat16": 8, "split-bfloat16": 16}


@pytest.mark.parametrize("fused", [False, True], ids=["attention", "fused-input"])
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_each_mode_against_full_float32_and_float64(precision, probe, mode, fused):
    full = run(fused=fused)
    precision(mode)
    got = run(fused=fused)
    assert all(t.dtype == torch.float32 for t in got)
    faster = probe >= cpu_backend.SPEEDUP_NEEDED
    expected = {"bf16": "bfloat16" if faster else "float32",
                "tf32": "split-bfloat16" if faster and not fused else "float32"}[mode]
    products = cpu_backend.float32_products(fused=fused)
    assert products == expected
    if products == "float32":  # tf32 on the fused kernels or where split is slower; bf16 where it is slower
        for a, b in zip(got, full):
            assert torch.equal(a, b)
        return
    precision("ieee")
    exact = run(dtype=torch.float64, fused=fused)
    unit = 2.0 ** -SIGNIFICANT_BITS[products]
    names = ("out", "dq", "dx", "dwk", "dbk", "dwv", "dbv") if fused else ("out", "dq", "dk", "dv")
    largest = max(t.norm().item() for t in exact)
    for name, a, b, reference in zip(names, got, full, exact):
        if name == "dbk":  # exactly 0: a shift of every key by one vector moves a row's scores by a constant
            assert (a.double() - reference).norm() <= 4 * unit * largest, name
            continue
        error = relative_error(a, reference)
        assert error <= 4 * unit, (name, error)
        assert error > relative_error(b, reference), (name, f"no {products} rounding seen: did it run?")


@pytest.fixture(params=["tf32", "bf16"])
def faster_products(request, precision, monkeypatch):
    """torch's precision "tf32" or "bf16" with its faster products (split bfloat16, bfloat16) taken
    whatever the probes measure; returns their name."""
    monkeypatch.setattr(cpu_backend, "split_products_speedup", lambda: 2.0)
    monkeypatch.setattr(cpu_backend, "bf16_products_speedup", lambda: 2.0)
    precision(request.param)
    products = cpu_backend.float32_products()
    assert products == {"tf32": "split-bfloat16", "bf16": "bfloat16"}[request.param]
    return products


# "tf32" promises TF32's accuracy, 11 significant bits: the contract tests hold the split products
# (about 16) to 4 x 2^-11 relative of float64; bfloat16 products (8) would fail it.
SPLIT_RTOL = 4 * 2.0 ** -11


def run_rounded_to_bf16(run, q, k, v, **kwargs):
    """out and lse of run on q, k, v rounded to bfloat16, out back in float32 (what the "bf16" mode
    promises to be)."""
    out, lse = run(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kwargs)
    return out.float(), lse


# The packing paths: AVX-512 packers on brgemm's VNNI layout ("native"), at::mm's plain layout, and
# the scalar packers of each lower level. On a CPU without a bfloat16 brgemm the first is the second.
GEMM_PATHS = ["native", "portable-gemm", *ISA_PATHS]


@pytest.fixture(params=GEMM_PATHS)
def gemm_path(request):
    with forced_cpu_path(request.param):
        yield request.param


def test_faster_products_run_on_every_path(faster_products, precision, gemm_path):
    """The contract tests below would pass on full float32 too: here the products' own rounding shows."""
    q, k, v = random_inputs(2, 2, 33, 70, 24, 40)
    dout = torch.randn(2, 2, 33, 40)

    def errors():
        out = pf.cross_attention(q, k, v, causal=True, backend="cpu")
        return [relative_error(a, b) for a, b in zip([out, *torch.autograd.grad(out, (q, k, v), dout)],
                                                     [out64, *grads64])]

    out64, _, grads64 = reference_with_grads(q, k, v, dout, causal=True)
    faster = errors()
    precision("ieee")
    full = errors()
    unit = 2.0 ** -SIGNIFICANT_BITS[faster_products]
    for name, a, b in zip(("out", "dq", "dk", "dv"), faster, full):
        assert unit / 16 < a <= 4 * unit and a > 8 * b, (name, a, b)


@pytest.mark.parametrize("tiling", [(0, 0, 0), (16, 8, 3), (7, 5, 4, 5)], ids=["default", "small-tiles", "chunks"])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", CROSS_SHAPES.values(), ids=CROSS_SHAPES.keys())
def test_faster_products_pass_the_contract(faster_products, gemm_path, shape, key_mask, causal, tiling):
    """float32 inputs on the faster products (every packing path), with masks, causal rows without
    keys, tile tails and query chunks. Split products: against float64 within SPLIT_RTOL. bfloat16
    products: exactly the bfloat16 kernels on the rounded inputs, outputs and gradients (those
    kernels' accuracy is the bfloat16 contract of tests/test_cpu_attention.py; a bound against
    float64 on float32 inputs would add their input rounding to gradients that cancel, such as dq
    of a row with few keys, and fail now and then on a correct kernel)."""
    run = kernel_runner("cpu", tiling=tiling)
    if faster_products == "split-bfloat16":
        check_attention(run, shape, torch.float32, key_mask, causal, rtol=SPLIT_RTOL)
        return
    assert_runs_as_bf16_kernels(run, shape, key_mask, causal)


def assert_runs_as_bf16_kernels(run, shape, key_mask, causal, dropout_p=0.0):
    B, H, N, M, dqk, dv = shape
    q, k, v = random_inputs(B, H, N, M, dqk, dv)
    mask = random_key_mask(B, M) if key_mask else None
    seed = int(torch.randint(2**31, ()))
    dropout = dict(dropout_p=dropout_p) if dropout_p else {}
    results = []
    for call in (run, lambda *a, **kw: run_rounded_to_bf16(run, *a, **kw)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out, lse = call(*leaves, key_mask=mask, causal=causal, **dropout)
        torch.manual_seed(seed + 1)
        dout = torch.randn_like(out)
        results.append([out, lse, *(g.float() for g in torch.autograd.grad(out, leaves, dout))])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert a.dtype == torch.float32 and torch.equal(a, b), name


def test_faster_products_with_dropout(faster_products):
    run = kernel_runner("cpu", tiling=(16, 8, 3))
    if faster_products == "split-bfloat16":
        check_attention(run, CROSS_SHAPES["small"], torch.float32, True, True, dropout_p=0.3, rtol=SPLIT_RTOL)
        return
    assert_runs_as_bf16_kernels(run, CROSS_SHAPES["small"], True, True, dropout_p=0.3)


def test_split_products_need_float32_inputs():
    q, k, v = (t.detach().double() for t in random_inputs(1, 1, 4, 8, 8, 8))
    with pytest.raises(RuntimeError, match="split_bf16 needs float32 inputs, got Double"):
        _C.cpu_attention_forward(q, k, v, None, False, 0.5, split_bf16=True)


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
    x = torch.randn(1, 30, 16)
    faster = probe >= cpu_backend.SPEEDUP_NEEDED
    assert besides_level(pf.explain(q, k, v)["cpu"]) == []
    precision("tf32")
    note = besides_level(pf.explain(q, k, v)["cpu"])
    expected = ("runs float32 with split bfloat16 products" if faster else
                "runs full float32 (more precise than the 'tf32' precision torch allows): split bfloat16 products ran only")
    assert len(note) == 1 and note[0].startswith(expected), note
    weights = dict(k_weight=torch.randn(32, 16), v_weight=torch.randn(32, 16))
    fused_note = besides_level(pf.explain(pf.fused_input_attention, q, x, **weights, method="projection")["cpu"])
    assert fused_note == ["runs full float32 (more precise than the 'tf32' precision torch allows): the fused input "
                          "kernels have no split products"], fused_note
    torch.set_float32_matmul_precision("medium")  # torch's own API sets fp32_precision to "bf16"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    note = besides_level(pf.explain(q, k, v)["cpu"])
    expected = "runs float32 with bfloat16 products" if faster else "runs full float32 although"
    assert len(note) == 1 and note[0].startswith(expected), note
    assert besides_level(pf.explain(q.double(), k.double(), v.double())["cpu"]) == []
