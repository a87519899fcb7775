"""The ops under torch.library and torch.compile: opcheck of every registered op, fullgraph compiles of
the public functions against eager, and patched models that compile with no more graph breaks than
the originals and give the eager outputs."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo as dynamo

import perceiver_fast as pf
from checks import FP32_RTOL, random_inputs, random_key_mask, rel_error
from perceiver_fast.ops.attention import attention, attention_backward
from perceiver_fast.ops.input_attention import input_attention, input_attention_backward
from perceiver_fast.ops.kernel_table import KernelTable

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")

# (B, H, N, M, Dqk, Dv): odd head dims, one over FlashAttention's limit, qk != v.
OPCHECK_SHAPES = {"odd-dims": (2, 2, 5, 9, 3, 5), "d261": (1, 1, 4, 11, 261, 261), "qk32-v48": (2, 1, 6, 6, 32, 48)}
MASKINGS = [(False, False), (True, False), (False, True), (True, True)]


def opcheck_attention(kernel, shape, key_mask, causal, device="cpu", dtype=torch.float32):
    B, H, N, M, dqk, dv = shape
    q, k, v = random_inputs(B, H, N, M, dqk, dv, dtype=dtype, device=device)
    mask = random_key_mask(B, M, device=device) if key_mask else None
    settings = (causal, dqk ** -0.5, 0.0, None, kernel, "cross", [])
    torch.library.opcheck(attention, (q, k, v, mask, *settings))
    out, lse = attention(q, k, v, mask, *settings)
    dout = torch.randn_like(out)
    torch.library.opcheck(attention_backward, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask,
                                               *settings))


@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES.values(), ids=OPCHECK_SHAPES.keys())
def test_opcheck_attention_cpu_kernel(shape, key_mask, causal):
    opcheck_attention("cpu", shape, key_mask, causal)


@interpreted
@pytest.mark.parametrize("key_mask,causal", [(True, True)])
def test_opcheck_attention_triton_kernel(key_mask, causal):
    opcheck_attention("triton", OPCHECK_SHAPES["odd-dims"], key_mask, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES.values(), ids=OPCHECK_SHAPES.keys())
def test_opcheck_attention_triton_gpu(shape, key_mask, causal):
    opcheck_attention("triton", shape, key_mask, causal, device="cuda", dtype=torch.bfloat16)


def input_attention_args(method, key_mask, causal, device="cpu", kernel="cpu"):
    B, H, N, M, C, dqk, dv = 2, 2, 5, 13, 7, 3, 5
    x = (torch.randn(B, M, C, device=device) + 0.5).requires_grad_()
    mask = random_key_mask(B, M, device=device) if key_mask else None
    if method == "shortcut":
        q = torch.randn(B, H, N, C, device=device, requires_grad=True)
        weights = (None,) * 4
    else:
        q = torch.randn(B, H, N, dqk, device=device, requires_grad=True)
        weights = tuple(torch.randn(*shape, device=device, requires_grad=True)
                        for shape in ((H * dqk, C), (H * dqk,), (H * dv, C), (H * dv,)))
    return q, x, True, 1e-5, *weights, mask, causal, 0.4, 0.0, None, kernel, []


def opcheck_input_attention(method, key_mask, causal, device="cpu", kernel="cpu"):
    args = input_attention_args(method, key_mask, causal, device, kernel)
    torch.library.opcheck(input_attention, args)
    out, lse = input_attention(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(input_attention_backward, (torch.randn_like(out), *plain[:8], out.detach(), lse,
                                                     *plain[8:]))


@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_opcheck_input_attention_cpu_kernel(method, key_mask, causal):
    opcheck_input_attention(method, key_mask, causal)


@interpreted
@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_opcheck_input_attention_triton_kernel(method):
    opcheck_input_attention(method, True, True, kernel="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_opcheck_input_attention_triton_gpu(method, key_mask, causal):
    opcheck_input_attention(method, key_mask, causal, device="cuda", kernel="triton")


def test_registered_ops_refuse_unknown_kernels():
    q, k, v = random_inputs(1, 1, 2, 3, 4, 4, requires_grad=False)
    with pytest.raises(ValueError, match="kernel must be one of 'cpu', .* for the attention, got 'flash'"):
        attention(q, k, v, None, False, 0.5, 0.0, None, "flash", "cross", [])
    forward_only = KernelTable("attention")
    forward_only.register("forward-only", lambda *args: None)
    with pytest.raises(ValueError, match="kernel 'forward-only' has no backward of the attention"):
        forward_only.backward("forward-only")


def assert_compiled_matches_eager(fn, inputs, tolerance=FP32_RTOL):
    """fn compiled with fullgraph=True against fn eager: output and the gradient of every input."""
    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(*inputs), fn(*inputs)
    assert rel_error(got, want) <= tolerance
    dout = torch.randn_like(want)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for g, w in zip(torch.autograd.grad(got, leaves, dout), torch.autograd.grad(want, leaves, dout)):
        assert rel_error(g, w) <= tolerance


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def test_cross_attention_compiles_with_key_mask_and_causal():
    q, k, v = random_inputs(2, 2, 7, 19, 261, 5)
    mask = random_key_mask(2, 19, empty_batch=True)
    assert_compiled_matches_eager(lambda q, k, v, m: pf.cross_attention(q, k, v, key_mask=m, causal=True),
                                  (q, k, v, mask))


def test_latent_attention_compiles():
    q, k, v = random_inputs(2, 4, 16, 16, 8, 8)
    assert_compiled_matches_eager(lambda q, k, v: pf.latent_attention(q, k, v, causal=True), (q, k, v))


@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_fused_input_attention_compiles(method):
    B, H, N, M, C, dqk, dv = 2, 2, 6, 21, 10, 4, 6
    x = torch.randn(B, M, C, requires_grad=True)
    q = torch.randn(B, H, N, dqk, requires_grad=True)
    k_weight, v_weight = torch.randn(H * dqk, C, requires_grad=True), torch.randn(H * dv, C, requires_grad=True)
    norm_weight = (torch.rand(C) + 0.5).requires_grad_()
    mask = random_key_mask(B, M, empty_batch=False)

    def layer(q, x, k_weight, v_weight, norm_weight, mask):
        return pf.fused_input_attention(q, x, k_weight=k_weight, v_weight=v_weight, norm_weight=norm_weight,
                                        key_mask=mask, causal=True, method=method)

    assert_compiled_matches_eager(layer, (q, x, k_weight, v_weight, norm_weight, mask))


def graph_breaks(fn) -> int:
    dynamo.reset()
    return dynamo.explain(fn)().graph_break_count


def check_patched_model_compiles(model, run):
    """The patched model breaks the graph no more often than the original and, compiled, gives the
    patched model's eager output (itself checked against the original by the drop-in tests)."""
    fast = copy.deepcopy(model)
    pf.patch(fast)
    original_breaks = graph_breaks(lambda: run(model))
    assert graph_breaks(lambda: run(fast)) <= original_breaks
    dynamo.reset()
    eager = run(fast)
    compiled = torch.compile(lambda: run(fast))()
    assert rel_error(compiled, eager) <= FP32_RTOL
    assert rel_error(eager, run(model)) <= FP32_RTOL
    return original_breaks


def test_patched_hf_model_with_padding_mask_compiles_without_breaks():
    hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
    from transformers import PerceiverConfig

    config = PerceiverConfig(num_latents=16, d_latents=64, d_model=32, num_self_attends_per_block=2,
                             num_cross_attention_heads=1, num_self_attention_heads=4,
                             attention_probs_dropout_prob=0.0)
    model = hf.PerceiverModel(config).eval()
    x = torch.randn(3, 50, 32)
    mask = torch.ones(3, 50)
    mask[1, 30:] = 0
    mask[2, 10:] = 0
    assert check_patched_model_compiles(model, lambda m: m(inputs=x, attention_mask=mask).last_hidden_state) == 0


def test_patched_lucidrains_perceiver_io_with_mask_compiles():
    pytest.importorskip("perceiver_pytorch")
    from perceiver_pytorch import PerceiverIO

    model = PerceiverIO(dim=12, queries_dim=8, depth=2, num_latents=10, latent_dim=32, cross_heads=1,
                        latent_heads=4, cross_dim_head=16, latent_dim_head=8).eval()
    data, queries = torch.randn(2, 40, 12), torch.randn(2, 5, 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    check_patched_model_compiles(model, lambda m: m(data, mask=mask, queries=queries))


def test_patched_krasserm_models_compile():
    pytest.importorskip("perceiver.model.core")
    from test_patch_krasserm import causal_model, pad_mask, perceiver_io, run_io

    x, mask = torch.randn(3, 60, 20), pad_mask(3, 60)
    check_patched_model_compiles(perceiver_io(), lambda m: run_io(m, x, mask))
    tokens, left_padding = torch.randint(0, 40, (3, 48)), pad_mask(3, 48, left=True)
    check_patched_model_compiles(causal_model(), lambda m: m(tokens, prefix_len=32, pad_mask=left_padding).logits)
