"""Higher-order gradients (a backward with create_graph=True), backend by backend: where a backend
declares them (Capabilities.double_backward) second-order gradients match finite differences in
float64 (gradgradcheck); where it does not, the first backward that asks for them raises
BackendUnsupportedError naming the backend and those that have them. Run with TRITON_INTERPRET=1 to
cover the Triton backend on the CPU."""

import pytest
import torch

import perceiver_fast as pf
from perceiver_fast.dispatch import BACKENDS
from perceiver_fast.validation import validate_attention

BATCH, HEADS, QUERIES, KEYS, DIM_QK, DIM_V, CHANNELS = 2, 2, 3, 5, 4, 3, 6


def _key_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, KEYS, dtype=torch.bool)
    mask[1, ::2] = False
    return mask


def cross(dtype):
    tensors = [torch.randn(BATCH, HEADS, n, d, dtype=dtype, requires_grad=True)
               for n, d in ((QUERIES, DIM_QK), (KEYS, DIM_QK), (KEYS, DIM_V))]
    return tensors, lambda backend, q, k, v: pf.cross_attention(q, k, v, key_mask=_key_mask(), causal=True,
                                                                backend=backend)


def latent(dtype):
    tensors = [torch.randn(BATCH, HEADS, QUERIES, d, dtype=dtype, requires_grad=True) for d in (DIM_QK, DIM_QK, DIM_V)]
    return tensors, lambda backend, q, k, v: pf.latent_attention(q, k, v, causal=True, backend=backend)


def fused_input(method):
    def make(dtype):
        shapes = [(BATCH, HEADS, QUERIES, DIM_QK), (BATCH, KEYS, CHANNELS), (HEADS * DIM_QK, CHANNELS),
                  (HEADS * DIM_QK,), (HEADS * DIM_V, CHANNELS), (HEADS * DIM_V,), (CHANNELS,), (CHANNELS,)]
        tensors = [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in shapes]
        return tensors, lambda backend, q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias: (
            pf.fused_input_attention(q, x, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias,
                                     norm_weight=norm_weight, norm_bias=norm_bias, key_mask=_key_mask(),
                                     method=method, backend=backend))
    return make


OPS = {"cross_attention": cross, "latent_attention": latent, "fused_input_attention shortcut": fused_input("shortcut"),
       "fused_input_attention projection": fused_input("projection")}


def runnable_here(backend, dtype) -> bool:
    q = torch.randn(1, 1, 2, DIM_QK, dtype=dtype, requires_grad=True)
    return not backend.refusals(validate_attention(q, q, q), explicit=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_higher_order_gradients_work_or_are_refused_at_the_first_backward(backend, op):
    dtype = torch.float64 if backend.capabilities.double_backward else torch.float32
    if not runnable_here(backend, dtype):
        pytest.skip(f"backend {backend.name!r} cannot run {dtype} gradients on the CPU here")
    tensors, call = OPS[op](dtype)
    if backend.capabilities.double_backward:
        assert torch.autograd.gradgradcheck(lambda *t: call(backend.name, *t), tensors)
        return
    out = call(backend.name, *tensors)
    with pytest.raises(pf.BackendUnsupportedError) as refusal:
        torch.autograd.grad(out.sum(), tensors, create_graph=True)
    message = str(refusal.value)
    able = [b.name for b in BACKENDS if b.capabilities.double_backward]
    assert able == ["reference"]
    assert (f"higher-order gradients (a backward with create_graph=True) are not supported on backend "
            f"{backend.name!r}") in message
    assert "Backends that support them: 'reference'; pass backend='reference'" in message
    # the first-order backward of the same graph still runs
    assert all(g is not None for g in torch.autograd.grad(out.sum(), tensors))


def test_a_gradient_penalty_trains_through_the_reference_backend():
    """The use that asks for higher-order gradients: a loss on a gradient's norm, backpropagated."""
    (q, k, v), call = cross(torch.float64)
    out = call("reference", q, k, v)
    grad_q, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    grad_q.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sharded_calls_refuse_higher_order_gradients_on_every_backend():
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        (q, k, v), _ = cross(torch.float64)
        for backend in ("reference", "cpu"):
            out = pf.cross_attention(q, k, v, key_mask=_key_mask(), backend=backend, process_group=dist.group.WORLD)
            with pytest.raises(pf.BackendUnsupportedError, match="not supported for cross_attention with a "
                                                                 "process_group, on any backend"):
                torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
            assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))
    finally:
        dist.destroy_process_group()
