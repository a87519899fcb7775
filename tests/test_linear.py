"""The linear op (pf.linear, perceiver_fast::linear) against float64 on every backend and GEMM path:
forward and gradients for every activation, with and without bias and residual, in float32,
bfloat16 and float64; opcheck and torch.compile; packed weights following every change of a
weight; autocast; bad input."""

from __future__ import annotations

import contextlib
import copy
import gc
import io

import pytest
import torch

import perceiver_fast as pf
from checks import FP32_RTOL, rel_error
from perceiver_fast.backends import cpu_linear
from perceiver_fast.ops.linear import linear, linear_backward
from perceiver_fast.reference import linear_reference

ACTIVATIONS = ("none", "gelu", "gelu_tanh")
# x's shape, out features: a latent layer's odd-sized cousins, one row, 1-D x, a head dim of 261.
SHAPES = {"3d": ((2, 7, 24), 40), "one-row": ((1, 33), 17), "1d": ((20,), 9), "d261": ((3, 5, 261), 261)}
# (backend, GEMM path of the cpu backend's kernels): every path this machine has.
PATHS = [("cpu", "onednn"), ("cpu", "torch"), ("reference", None)]
# dtype -> the backends that run it.
DTYPES = {torch.float32: PATHS, torch.bfloat16: PATHS, torch.float64: [("reference", None)]}


@contextlib.contextmanager
def forced_gemm(choice):
    cpu_linear.force_gemm(choice)
    try:
        yield
    finally:
        cpu_linear.force_gemm(None)


def _cases() -> list:
    return [pytest.param(dtype, backend, gemm, id=f"{str(dtype)[6:]}-{backend}{'-' + gemm if gemm else ''}")
            for dtype, paths in DTYPES.items() for backend, gemm in paths]


def random_linear(x_shape, out_features, dtype, bias=True, residual=False, requires_grad=True):
    """x, weight, bias, residual at nn.Linear's scale (so GELU sees both of its sides)."""
    x = torch.randn(*x_shape, dtype=dtype)
    weight = torch.randn(out_features, x_shape[-1], dtype=dtype) / x_shape[-1] ** 0.5
    b = torch.randn(out_features, dtype=dtype) if bias else None
    r = torch.randn(*x_shape[:-1], out_features, dtype=dtype) if residual else None
    return [t if t is None else t.requires_grad_(requires_grad) for t in (x, weight, b, r)]


def _with_grads(fn, tensors, dy):
    leaves = [t for t in tensors if t is not None]
    y = fn(*tensors)
    return y, torch.autograd.grad(y, leaves, dy)


def _assert_close(name, actual, expected64, same_dtype, dtype):
    """float32 and float64 within FP32_RTOL of float64; bfloat16 within twice the error of torch's own
    bfloat16 computation (plus the error of rounding the exact result), as docs/design.md says."""
    error = rel_error(actual, expected64)
    if dtype == torch.bfloat16:
        allowed = 2 * rel_error(same_dtype, expected64) + 2 * rel_error(expected64.to(dtype), expected64) + 1e-3
    else:
        allowed = FP32_RTOL
    assert error <= allowed, f"{name}: relative error {error:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype,backend,gemm", _cases())
def test_matches_float64_with_gradients(shape, activation, bias, residual, dtype, backend, gemm):
    x_shape, out_features = shape
    tensors = random_linear(x_shape, out_features, dtype, bias, residual)
    dy = torch.randn(*x_shape[:-1], out_features, dtype=dtype)

    def reference(dtype_of):
        cast = [None if t is None else t.detach().to(dtype_of).requires_grad_() for t in tensors]
        return _with_grads(lambda x, w, b, r: linear_reference(x, w, b, activation=activation, residual=r), cast,
                           dy.to(dtype_of))

    with forced_gemm(gemm):
        y, grads = _with_grads(lambda x, w, b, r: pf.linear(x, w, b, activation=activation, residual=r,
                                                            backend=backend), tensors, dy)
    y64, grads64 = reference(torch.float64)
    y_same, grads_same = reference(dtype)
    assert y.shape == y64.shape and y.dtype == dtype
    _assert_close("y", y, y64, y_same, dtype)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), tensors) if t is not None]
    for name, g, g64, g_same in zip(names, grads, grads64, grads_same):
        assert g.dtype == dtype, name
        _assert_close(name, g, g64, g_same, dtype)


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(gemm, activation, dtype):
    x, weight, bias, residual = random_linear((6, 24), 10, dtype, residual=True)
    with forced_gemm(gemm):
        for save in (False, True):
            torch.library.opcheck(linear, (x, weight, bias, residual, activation, save, "cpu"))
            torch.library.opcheck(linear, (x, weight, None, None, activation, save, "cpu"))
        _, preactivation = linear(x, weight, bias, None, activation, True, "cpu")
        dy = torch.randn(6, 10, dtype=dtype)
        for grads in ([True, True, True], [False, True, False], [True, False, False]):
            for saved in (preactivation.detach(), preactivation.new_empty(0)):  # saved, or computed again
                torch.library.opcheck(linear_backward, (dy, x.detach(), weight.detach(), bias.detach(), saved,
                                                        activation, grads, "cpu"))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiles_fullgraph_and_matches_eager(backend):
    x, weight, bias, residual = random_linear((2, 9, 32), 48, torch.float32, residual=True)

    def layer(x, weight, bias, residual):  # an MLP: GELU fused into the first GEMM, the residual into the second
        hidden = pf.linear(x, weight, bias, activation="gelu", backend=backend)
        return pf.linear(hidden[..., :32], weight[:, :32], bias, residual=residual, backend=backend)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    eager = layer(x, weight, bias, residual)
    out = compiled(x, weight, bias, residual)
    assert rel_error(out, eager) < FP32_RTOL
    grads = torch.autograd.grad(out.sum(), [x, weight, bias, residual])
    grads_eager = torch.autograd.grad(eager.sum(), [x, weight, bias, residual])
    for g, e in zip(grads, grads_eager):
        assert rel_error(g, e) < FP32_RTOL


def _fresh_layer(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Linear(32, 24).to(dtype)


def _check_uses_current_weight(layer, x):
    expected = linear_reference(x.double(), layer.weight.double(), layer.bias.double())
    assert rel_error(pf.linear(x, layer.weight, layer.bias, backend="cpu"), expected) < FP32_RTOL


@pytest.mark.parametrize("change", ["optimizer-step", "load_state_dict", "copy-under-no_grad", "to-and-back",
                                    "data-assignment"])
def test_packed_weight_follows_changes(change):
    layer, x = _fresh_layer(), torch.randn(5, 32)
    with forced_gemm("onednn"):
        _check_uses_current_weight(layer, x)  # packs it
        if change == "optimizer-step":
            optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
            pf.linear(x, layer.weight, layer.bias, activation="gelu").sum().backward()
            optimizer.step()
        elif change == "load_state_dict":
            layer.load_state_dict({name: torch.randn_like(t) for name, t in layer.state_dict().items()})
        elif change == "copy-under-no_grad":
            with torch.no_grad():
                layer.weight.copy_(torch.randn_like(layer.weight))
        elif change == "to-and-back":  # new storage, the same values
            layer.to(torch.float64).to(torch.float32)
        else:
            layer.weight.data = torch.randn_like(layer.weight)
        _check_uses_current_weight(layer, x)


def test_one_packed_copy_per_weight_freed_with_it():
    gc.collect()
    layer, x = _fresh_layer(), torch.randn(5, 32)
    before = len(cpu_linear._packed)
    with forced_gemm("onednn"):
        for dtype in (torch.float32, torch.bfloat16, torch.float32):  # a dtype change repacks in place
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                pf.linear(x, layer.weight, layer.bias, backend="cpu")
            assert layer.weight in cpu_linear._packed and len(cpu_linear._packed) == before + 1
            assert cpu_linear._packed[layer.weight][0][2] == dtype
    del layer
    gc.collect()
    assert len(cpu_linear._packed) == before


def test_inference_mode_weight_is_never_packed():
    with torch.inference_mode():
        layer, x = _fresh_layer(), torch.randn(5, 32)
        with forced_gemm("onednn"):
            _check_uses_current_weight(layer, x)
            layer.weight.mul_(-1)  # no version counter under inference_mode
            _check_uses_current_weight(layer, x)
        assert layer.weight not in cpu_linear._packed


def test_autocast_bfloat16_like_f_linear():
    """fp32 parameters under bfloat16 autocast: computed in bfloat16 as F.linear would, gradients in float32;
    a float32 residual is added after, with type promotion, as F.linear(...) + residual would."""
    layer, x = _fresh_layer(), torch.randn(4, 32, requires_grad=True)
    residual = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pf.linear(x, layer.weight, layer.bias, activation="gelu", residual=residual, backend="cpu")
        torch_own = torch.nn.functional.gelu(torch.nn.functional.linear(x, layer.weight, layer.bias)) + residual
    assert ours.dtype == torch_own.dtype == torch.float32
    assert rel_error(ours, torch_own) < 1e-2
    grads = torch.autograd.grad(ours.sum(), [x, layer.weight, layer.bias, residual])
    grads_torch = torch.autograd.grad(torch_own.sum(), [x, layer.weight, layer.bias, residual])
    for g, e in zip(grads, grads_torch):
        assert g.dtype == e.dtype == torch.float32
        assert rel_error(g, e) < 2e-2


def test_empty_batch_runs_torchs_own():
    x, weight, bias, _ = random_linear((0, 8), 5, torch.float32)
    assert "x has no rows (an empty batch)" in pf.explain(pf.linear, x, weight, bias)["cpu"]
    assert pf.linear(x, weight, bias).shape == (0, 5)


def test_explain_names_the_gemm():
    x, weight, bias, _ = random_linear((512, 256), 256, torch.float32)  # 2^25 multiply-adds: not too small
    with forced_gemm("torch"):
        assert pf.explain(pf.linear, x, weight, bias)["cpu"][0].startswith("runs torch's own GEMM")
    with forced_gemm("onednn"):
        assert pf.explain(pf.linear, x, weight, bias)["cpu"][0].startswith("runs oneDNN GEMMs")
    assert pf.explain(pf.linear, x.double(), weight.double())["cpu"] == ["dtype float64 not supported by its linear op "
                                                                         "(supports bfloat16, float32)"]
    assert pf.explain(pf.linear, x, weight)["triton"] == ["has no linear op"]


def test_higher_order_gradients_refused_on_cpu_and_given_by_the_reference():
    x, weight, bias, _ = random_linear((3, 4), 2, torch.float64)
    with pytest.raises(pf.BackendUnsupportedError, match="perceiver_fast::linear_backward"):
        y = pf.linear(x.float(), weight.float(), bias.float(), activation="gelu", backend="cpu")
        torch.autograd.grad(y.sum(), [x], create_graph=True)
    torch.autograd.gradgradcheck(lambda *t: pf.linear(*t, activation="gelu", backend="reference"), (x, weight, bias))


@pytest.mark.parametrize("call,error,message", [
    (lambda x, w, b: pf.linear(x[..., :7], w, b), ValueError, "x must have in_features = 8"),
    (lambda x, w, b: pf.linear(x, w[None], b), ValueError, "weight must be 2-D"),
    (lambda x, w, b: pf.linear(x, w, b[:4]), ValueError, r"bias must have shape \(out_features,\) = \(5,\)"),
    (lambda x, w, b: pf.linear(x, w, b, residual=torch.zeros(5)), ValueError, "it is not broadcast"),
    (lambda x, w, b: pf.linear(x, w, b, residual=1.0), TypeError, "residual must be a torch.Tensor"),
    (lambda x, w, b: pf.linear(x, w, b, activation="relu"), ValueError, "activation must be one of"),
    (lambda x, w, b: pf.linear(x.double(), w, b), TypeError, "must share one dtype"),
    (lambda x, w, b: pf.linear(x.long(), w, b), TypeError, "x must be a floating tensor"),
    (lambda x, w, b: pf.linear(x.tolist(), w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b: pf.linear(x.double(), w.double(), b.double(), backend="cpu"), pf.BackendUnsupportedError,
     "dtype float64 not supported by its linear op"),
    (lambda x, w, b: pf.linear(x, w, b, backend="triton"), pf.BackendUnsupportedError, "has no linear op"),
])
def test_bad_input_names_the_argument(call, error, message):
    x, weight, bias, _ = random_linear((6, 8), 5, torch.float32)
    with pytest.raises(error, match=message):
        call(x, weight, bias)


def test_pickled_and_deep_copied_weights_pack_their_own():
    layer, x = _fresh_layer(), torch.randn(5, 32)
    with forced_gemm("onednn"):
        _check_uses_current_weight(layer, x)
        copied = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (copied, loaded):
            with torch.no_grad():
                other.weight.mul_(2)
            _check_uses_current_weight(other, x)
        _check_uses_current_weight(layer, x)


def test_probe_leaves_torchs_generator_alone():
    # the caller's dropout seeds come from torch's default generator: a first call must not move it
    cpu_linear.onednn_speedup.cache_clear()
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert cpu_linear.gemm(torch.float32) in ("onednn", "torch")
    assert cpu_linear.gemm(torch.float32, rows=1) in ("onednn", "torch")
    assert torch.equal(torch.rand(3), want)
