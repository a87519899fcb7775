"""The fused input attention (LayerNorm + K/V projection + attention) against the unfused float64 computation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import perceiver_fast as pf
from perceiver_fast import fused_input_attention
from perceiver_fast.dispatch import select_backend
from perceiver_fast.extension import LOAD_ERROR
from perceiver_fast.flops import choose_method, method_flops, visible_pairs
from perceiver_fast.ops.input_attention import input_attention, input_attention_backward
from perceiver_fast.reference import input_attention_reference
from perceiver_fast.validation import validate_input_attention

from checks import FP32_RTOL, assert_lse_matches, assert_matches, random_key_mask, rel_error
from model_checks import largest_tensor_in

pytestmark = pytest.mark.skipif(LOAD_ERROR is not None, reason=str(LOAD_ERROR))

LEAVES = ("q", "x", "k_weight", "k_bias", "v_weight", "v_bias", "norm_weight", "norm_bias")


def random_layer(B, H, N, M, C, dqk, dv, dtype=torch.float32, norm="affine", device="cpu"):
    """q, x and the parameters of the input side of a layer; x off-centre so that LayerNorm matters."""
    t = {"q": torch.randn(B, H, N, dqk), "x": torch.randn(B, M, C) * 2 + 0.7,
         "k_weight": torch.randn(H * dqk, C) / C ** 0.5, "k_bias": torch.randn(H * dqk),
         "v_weight": torch.randn(H * dv, C) / C ** 0.5, "v_bias": torch.randn(H * dv),
         "norm_weight": torch.rand(C) + 0.5, "norm_bias": torch.randn(C)}
    if norm != "affine":
        del t["norm_weight"], t["norm_bias"]
    t = {name: value.to(device, dtype).requires_grad_() for name, value in t.items()}
    return t, (None if norm == "none" else 1e-5)


def reference_and_grads(t, eps, dout, *, key_mask=None, causal=False, dtype=torch.float64):
    leaves = {name: value.detach().cpu().to(dtype).requires_grad_() for name, value in t.items()}
    key_mask = None if key_mask is None else key_mask.cpu()
    out = input_attention_reference(**leaves, norm_eps=eps, key_mask=key_mask, causal=causal)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.cpu().to(dtype))
    return out, dict(zip(leaves, grads))


def fused_and_grads(t, eps, dout, **kwargs):
    out = fused_input_attention(**t, norm_eps=eps, **kwargs)
    grads = torch.autograd.grad(out, list(t.values()), dout, allow_unused=True)
    return out, dict(zip(t, grads))


def assert_grads_match(grads, expected, same_dtype=None):
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in expected.values()))
    for name, g in expected.items():
        got = grads[name]
        assert got is not None, f"d{name}: no gradient"
        got = got.cpu()
        if name == "k_bias" or g.norm() < 1e-6 * total:
            # The key bias cancels in the softmax: its exact gradient is 0; judge against all gradients.
            err = (got.double() - g).norm() / (total if total > 0 else 1)
            assert err <= 1e-3 if got.dtype == torch.bfloat16 else err <= FP32_RTOL, f"d{name}: {err:.3g}"
        else:
            assert_matches(f"d{name}", got, g, None if same_dtype is None else same_dtype[name])


# (B, H, N, M, C, Dqk, Dv): C below and above the head dims, one and several heads, odd sizes,
# a single key, a single query.
SHAPES = [(2, 1, 7, 33, 13, 9, 11), (1, 1, 16, 50, 40, 24, 24), (2, 3, 5, 37, 20, 8, 12), (1, 2, 9, 1, 6, 5, 3),
          (2, 2, 1, 70, 10, 16, 4), (1, 4, 12, 130, 32, 8, 8)]


@pytest.mark.parametrize("method", ["shortcut", "projection"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "key_mask", "causal", "both"])
def test_fused_matches_float64_unfused(method, shape, masking):
    B, H, N, M, C, dqk, dv = shape
    t, eps = random_layer(*shape)
    key_mask = random_key_mask(B, M) if masking in ("key_mask", "both") else None
    causal = masking in ("causal", "both")
    dout = torch.randn(B, H, N, dv)
    expected, expected_grads = reference_and_grads(t, eps, dout, key_mask=key_mask, causal=causal)
    out, grads = fused_and_grads(t, eps, dout, key_mask=key_mask, causal=causal, method=method)
    assert out.dtype == torch.float32
    assert_matches("out", out, expected)
    assert_grads_match(grads, expected_grads)


def check_triton(device, dtype, shape, masking, method, norm="affine"):
    B, H, N, M, C, dqk, dv = shape
    t, eps = random_layer(*shape, dtype=dtype, device=device, norm=norm)
    problem = validate_input_attention(**t, norm_eps=eps, method=method)
    assert select_backend(problem, "triton").unfused_reason(problem) is None, f"Triton fuses the {method}"
    key_mask = random_key_mask(B, M, device=device) if masking in ("key_mask", "both") else None
    causal = masking in ("causal", "both")
    dout = torch.randn(B, H, N, dv, device=device, dtype=dtype)
    expected, expected_grads = reference_and_grads(t, eps, dout, key_mask=key_mask, causal=causal)
    same_dtype = same_dtype_grads = None
    if dtype != torch.float32:
        same_dtype, same_dtype_grads = reference_and_grads(t, eps, dout, key_mask=key_mask, causal=causal, dtype=dtype)
    out, grads = fused_and_grads(t, eps, dout, key_mask=key_mask, causal=causal, method=method, backend="triton")
    assert out.dtype == dtype
    assert_matches("out", out.cpu(), expected, same_dtype)
    assert_grads_match(grads, expected_grads, same_dtype_grads)


interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@interpreted
@pytest.mark.parametrize("method", ["shortcut", "projection"])
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:5], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "both"])
def test_triton_matches_float64_unfused(method, shape, masking):
    check_triton("cpu", torch.float32, shape, masking, method)


@interpreted
@pytest.mark.parametrize("method", ["shortcut", "projection"])
@pytest.mark.parametrize("norm", ["plain", "none"])
def test_triton_without_affine_or_layer_norm(method, norm):
    """LayerNorm without its affine part, and no LayerNorm (x used as it is: dx comes straight from the kernel)."""
    check_triton("cpu", torch.float32, (2, 3, 5, 37, 20, 8, 12), "both", method, norm=norm)


@interpreted
def test_triton_projection_bfloat16():
    check_triton("cpu", torch.bfloat16, (2, 2, 9, 70, 24, 16, 8), "both", "projection")


@interpreted
def test_triton_projection_without_biases():
    """Projections without biases: the kernels add zeros, and the op gives the absent biases empty gradients."""
    B, H, N, M, C, dqk, dv = 2, 2, 6, 40, 12, 8, 4
    t, eps = random_layer(B, H, N, M, C, dqk, dv)
    del t["k_bias"], t["v_bias"]
    dout = torch.randn(B, H, N, dv)
    leaves = {name: value.detach().double().requires_grad_() for name, value in t.items()}
    expected = input_attention_reference(**leaves, k_bias=None, v_bias=None, norm_eps=eps)
    expected_grads = dict(zip(leaves, torch.autograd.grad(expected, list(leaves.values()), dout.double())))
    out = fused_input_attention(**t, norm_eps=eps, method="projection", backend="triton")
    assert_matches("out", out, expected)
    assert_grads_match(dict(zip(t, torch.autograd.grad(out, list(t.values()), dout))), expected_grads)
    q, x, k_weight, v_weight = (t[name].detach() for name in ("q", "x", "k_weight", "v_weight"))
    out, lse = input_attention(q, x, False, 0.0, k_weight, None, v_weight, None, None, False, 0.5, 0.0, None,
                               "triton", [])
    grads = input_attention_backward(torch.randn_like(out), q, x, False, 0.0, k_weight, None, v_weight, None, out, lse,
                                     None, False, 0.5, 0.0, None, "triton", [])
    assert grads[3].numel() == 0 and grads[5].numel() == 0 and grads[3] is not grads[5]


@interpreted
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("heads,dqk,dv,channels", [(2, 6, 7, 10), (1, 70, 20, 40)], ids=["small", "two-head-chunks"])
def test_triton_projection_key_splits_and_chunks(splits, heads, dqk, dv, channels):
    """Key ranges split over programs (merged after), forward chunks of keys carried over the running
    state, tiles cut at the input's end, a batch item without keys and one whose first keys are masked;
    head dims over one tile (two passes over the value chunks, two head-dim blocks in the backward)."""
    from perceiver_fast.kernels import tiles

    B, N, M = 2, 11, 700
    x = (torch.randn(B, M, channels, dtype=torch.float64) + 1).requires_grad_()
    key_mask = random_key_mask(B, M, empty_batch=True)
    key_mask[1, :20] = False
    q = torch.randn(B, heads, N, dqk, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
               for shape in ((heads * dqk, channels), (heads * dqk,), (heads * dv, channels), (heads * dv,))]
    normed = F.layer_norm(x, (channels,), eps=1e-5)
    k = F.linear(normed, *weights[:2]).view(B, M, heads, dqk).transpose(1, 2)
    v = F.linear(normed, *weights[2:]).view(B, M, heads, dv).transpose(1, 2)
    expected, expected_lse = pf.attention_reference(q, k, v, key_mask=key_mask, causal=True, scale=0.3)
    assert tiles.projection_config(dqk, dv, channels, True).chunk_keys < M  # several chunks per split
    leaves32 = [t.detach().float().requires_grad_() for t in (q, x, *weights)]
    out, lse = input_attention(*leaves32[:2], True, 1e-5, *leaves32[2:], key_mask, True, 0.3, 0.0, None, "triton",
                               [splits])
    assert rel_error(out, expected) <= FP32_RTOL
    assert_lse_matches(lse, expected_lse)
    dout = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [q, x, *weights], dout)
    grads = torch.autograd.grad(out, leaves32, dout.float())
    total = torch.sqrt(sum(g.norm() ** 2 for g in expected_grads))
    for name, got, want in zip(LEAVES, grads, expected_grads):
        assert (got.double() - want).norm() <= FP32_RTOL * total, f"d{name}"


@interpreted
@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_triton_workspace_does_not_grow_with_the_input(method):
    """The Triton kernels make K and V tile by tile (projection) or read x through a stride-0 view
    (shortcut), and the backward adds every head's share into one buffer inside the kernel. So of
    what the forward makes, only the two row-statistics vectors (4 bytes per input row each) grow
    with the input, and the backward's largest tensor is the float32 gradient of the normalised x
    (the size of dx), where the composed method makes K and V of every head (here 2 times x each)
    and the backward their gradients."""
    from perceiver_fast.kernels import (input_attention_backward, input_attention_forward,
                                        projected_attention_backward, projected_attention_forward)

    # The launchers themselves: a dispatch probe sees a registered op's outputs, not what it makes inside.
    B, H, N, C, D = 1, 4, 8, 128, 64
    forward_largest = []
    for M in (1024, 4096):
        x = torch.randn(B, M, C) + 0.5
        if method == "shortcut":
            q = torch.randn(B, H, N, C)
            forward, backward, weights = input_attention_forward, input_attention_backward, ()
        else:
            q = torch.randn(B, H, N, D)
            forward, backward = projected_attention_forward, projected_attention_backward
            weights = (torch.randn(H * D, C) / 4, torch.randn(H * D), torch.randn(H * D, C) / 4, torch.randn(H * D))
        forward_largest.append(largest_tensor_in(forward, q, x, True, 1e-5, *weights, None, True, 0.25,
                                                 besides=(x,))[0])
    assert forward_largest[1] <= max(forward_largest[0], 4 * 4096)
    assert forward_largest[1] < x.untyped_storage().nbytes() / 2
    out, lse = forward(q, x, True, 1e-5, *weights, None, True, 0.25)
    largest, op = largest_tensor_in(backward, torch.randn_like(out), q, x, True, 1e-5, *weights, out, lse,
                                    None, True, 0.25)
    assert largest == x.untyped_storage().nbytes(), f"backward made a {largest}-byte tensor in {op}"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["shortcut", "projection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 1, 64, 3000, 261, 261, 261), (1, 8, 128, 5000, 64, 64, 64),
                                            (1, 8, 256, 4096, 768, 32, 160)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "key_mask", "causal"])
def test_triton_gpu(method, dtype, shape, masking):
    check_triton("cuda", dtype, shape, masking, method)


@pytest.mark.parametrize("method", ["shortcut", "projection"])
@pytest.mark.parametrize("norm", ["affine", "plain", "none"])
def test_norm_variants_in_float64(method, norm):
    """LayerNorm with and without its affine part, and no LayerNorm; float64 in, float64 out."""
    t, eps = random_layer(2, 2, 6, 45, 12, 7, 9, dtype=torch.float64, norm=norm)
    dout = torch.randn(2, 2, 6, 9, dtype=torch.float64)
    key_mask = random_key_mask(2, 45)
    expected, expected_grads = reference_and_grads(t, eps, dout, key_mask=key_mask)
    out, grads = fused_and_grads(t, eps, dout, key_mask=key_mask, method=method)
    assert out.dtype == torch.float64
    assert rel_error(out, expected) <= 1e-12
    assert_grads_match(grads, expected_grads)


@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "projection"])
@pytest.mark.parametrize("tiling", [(4, 3, 1), (8, 5, 3), (16, 0, 7), (8, 5, 3, 2), (4, 3, 1, 4)],
                         ids=lambda t: "-".join(f"{name}{value}" for name, value in zip(("kt", "rb", "w", "qc"), t)))
def test_kernel_tile_edges_and_split_batches(shortcut, tiling):
    """Small key tiles and row blocks, more workers than batch items (split keys, merged slots), and
    query axes run in chunks of 2 and 4 rows (causal chunks over the keys they see)."""
    B, H, N, M, C, dqk, dv = 2, 2, 11, 53, 10, 6, 7
    x = (torch.randn(B, M, C, dtype=torch.float64) + 1).requires_grad_()
    key_mask = random_key_mask(B, M, empty_batch=False)
    key_mask[1, :20] = False
    if shortcut:
        q = torch.randn(B, H, N, C, dtype=torch.float64, requires_grad=True)
        leaves, weights = [q, x], {}
        k = v = F.layer_norm(x, (C,), eps=1e-5).unsqueeze(1).expand(B, H, M, C)
    else:
        q = torch.randn(B, H, N, dqk, dtype=torch.float64, requires_grad=True)
        weights = {"k_weight": torch.randn(H * dqk, C, dtype=torch.float64), "k_bias": torch.randn(H * dqk, dtype=torch.float64),
                   "v_weight": torch.randn(H * dv, C, dtype=torch.float64), "v_bias": torch.randn(H * dv, dtype=torch.float64)}
        for w in weights.values():
            w.requires_grad_()
        leaves = [q, x, *weights.values()]
        normed = F.layer_norm(x, (C,), eps=1e-5)
        k = F.linear(normed, weights["k_weight"], weights["k_bias"]).view(B, M, H, dqk).transpose(1, 2)
        v = F.linear(normed, weights["v_weight"], weights["v_bias"]).view(B, M, H, dv).transpose(1, 2)
    expected, expected_lse = pf.attention_reference(q, k, v, key_mask=key_mask, causal=True, scale=0.3)
    projection = [weights.get(name) for name in ("k_weight", "k_bias", "v_weight", "v_bias")]
    out, lse = input_attention(q, x, True, 1e-5, *projection, key_mask, True, 0.3, 0.0, None, "cpu", list(tiling))
    assert rel_error(out, expected) <= 1e-12
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - expected_lse[finite].double()).abs().max() <= 1e-5
    dout = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    grads = torch.autograd.grad(out, leaves, dout)
    total = torch.sqrt(sum(g.norm() ** 2 for g in expected_grads))
    for got, want in zip(grads, expected_grads):
        assert (got - want).norm() <= 1e-5 * total


@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_bfloat16_within_twice_the_bfloat16_reference_error(method):
    shape = (2, 2, 24, 300, 40, 32, 32)
    B, H, N, M, C, dqk, dv = shape
    t, eps = random_layer(*shape, dtype=torch.bfloat16)
    key_mask = random_key_mask(B, M, empty_batch=False)
    dout = torch.randn(B, H, N, dv, dtype=torch.bfloat16)
    expected, expected_grads = reference_and_grads(t, eps, dout, key_mask=key_mask)
    same_dtype, same_dtype_grads = reference_and_grads(t, eps, dout, key_mask=key_mask, dtype=torch.bfloat16)
    out, grads = fused_and_grads(t, eps, dout, key_mask=key_mask, method=method)
    assert out.dtype == torch.bfloat16
    assert_matches("out", out, expected, same_dtype)
    assert_grads_match(grads, expected_grads, same_dtype_grads)


def test_rows_without_keys_give_zero_with_biases():
    """Batch item 0 has no key: 0 out (not the value bias), and no NaN in any gradient."""
    for method in ("shortcut", "projection"):
        t, eps = random_layer(2, 2, 4, 30, 8, 8, 8)
        key_mask = torch.ones(2, 30, dtype=torch.bool)
        key_mask[0] = False
        out = fused_input_attention(**t, norm_eps=eps, key_mask=key_mask, method=method)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        out.sum().backward()
        assert all(torch.isfinite(v.grad).all() for v in t.values())
        assert torch.equal(t["x"].grad[0], torch.zeros_like(t["x"].grad[0]))


def test_shortcut_gives_the_key_bias_a_zero_gradient():
    t, eps = random_layer(1, 1, 4, 20, 8, 8, 8)
    fused_input_attention(**t, norm_eps=eps, method="shortcut").sum().backward()
    assert t["k_bias"].grad is not None
    assert torch.equal(t["k_bias"].grad, torch.zeros_like(t["k_bias"].grad))


@pytest.mark.parametrize("method", ["shortcut", "projection"])
def test_nothing_of_size_m_by_d_is_stored(method):
    """Forward stores nothing of half x's size; backward nothing larger than dx (the size of x).

    K and V of the unfused computation are each twice x's size here (per-head dims 2 C)."""
    B, H, N, M, C, d = 1, 2, 8, 4096, 16, 32
    t, eps = random_layer(B, H, N, M, C, d, d)
    x_bytes = t["x"].untyped_storage().nbytes()
    out = None

    def forward():
        nonlocal out
        out = fused_input_attention(**t, norm_eps=eps, method=method)

    largest, op = largest_tensor_in(forward)
    assert largest < x_bytes // 2, f"forward made a {largest}-byte tensor in {op}"
    largest, op = largest_tensor_in(lambda: out.sum().backward())
    assert largest <= x_bytes, f"backward made a {largest}-byte tensor in {op}"
    largest, _ = largest_tensor_in(input_attention_reference, **{k: v.detach() for k, v in t.items()}, norm_eps=eps)
    assert largest >= 2 * x_bytes  # the probe does see what the unfused computation stores


def test_method_flops_and_choice():
    # HF vision-fourier: one head of 261 over C = 261: the shortcut skips both projections.
    flops = method_flops(512, 50176, 261, 261, 261)
    assert flops["shortcut"] == 4 * 512 * 50176 * 261 + 2 * 512 * 261 * 522
    assert flops["projection"] == 2 * 50176 * 261 * 522 + 2 * 512 * 50176 * 522
    assert choose_method(512, 50176, 261, 261, 261) == "shortcut"
    # HF language: C = 768 against head dims 32 / 160: projecting is cheaper.
    assert choose_method(256, 2048, 768, 32, 160) == "projection"
    assert visible_pairs(3, 5, causal=True) == 3 + 4 + 5
    assert visible_pairs(4, 2, causal=True) == 0 + 0 + 1 + 2


def test_auto_uses_the_cheaper_method(monkeypatch):
    import perceiver_fast.validation as module

    chosen = []
    real = module.choose_method
    monkeypatch.setattr(module, "choose_method", lambda *a: chosen.append(real(*a)) or chosen[-1])
    for C, d in ((8, 16), (64, 4)):
        t, eps = random_layer(1, 1, 16, 40, C, d, d)
        expected = input_attention_reference(**t, norm_eps=eps)
        assert rel_error(fused_input_attention(**t, norm_eps=eps), expected) <= FP32_RTOL
    assert chosen == ["shortcut", "projection"]


def test_other_norms_run_unfused_through_nn_functional():
    """A norm that is not a plain LayerNorm (here RMSNorm) is applied as the module computes it."""
    t, _ = random_layer(2, 2, 5, 30, 12, 6, 6, norm="none")
    norm = torch.nn.RMSNorm(12)
    out = pf.nn.input_attention(t["q"], t["x"], norm=norm, k_weight=t["k_weight"], k_bias=t["k_bias"],
                                v_weight=t["v_weight"], v_bias=t["v_bias"])
    expected = input_attention_reference(t["q"], norm(t["x"]), k_weight=t["k_weight"], k_bias=t["k_bias"],
                                         v_weight=t["v_weight"], v_bias=t["v_bias"], norm_eps=None)
    assert rel_error(out, expected) <= FP32_RTOL


def test_autocast_runs_in_bfloat16():
    t, eps = random_layer(1, 2, 6, 40, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_input_attention(**t, norm_eps=eps)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, input_attention_reference(**t, norm_eps=eps)) <= 2e-2


def test_unfused_backends_give_the_same_result():
    t, eps = random_layer(2, 2, 6, 40, 16, 8, 8)
    expected = input_attention_reference(**t, norm_eps=eps)
    # Triton runs on CPU tensors only under its interpreter (as `make test` runs).
    backends = ("reference", "cpu", "auto") + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
    for backend in backends:
        assert rel_error(fused_input_attention(**t, norm_eps=eps, backend=backend), expected) <= FP32_RTOL


def test_bad_arguments_name_the_argument():
    t, eps = random_layer(2, 2, 6, 40, 16, 8, 8)
    cases = [
        ({"x": t["x"][0]}, ValueError, "x must be 3-D"),
        ({"x": t["x"][:1]}, ValueError, "batch size"),
        ({"k_weight": t["k_weight"][:, :5]}, ValueError, "k_weight must have shape"),
        ({"v_weight": t["v_weight"][:5]}, ValueError, "v_weight must have shape"),
        ({"k_bias": t["k_bias"][:3]}, ValueError, "k_bias must have shape"),
        ({"norm_weight": t["norm_weight"][:3]}, ValueError, "norm_weight must have shape"),
        ({"norm_eps": -1.0}, ValueError, "norm_eps"),
        ({"key_mask": torch.ones(2, 40)}, TypeError, "key_mask must have dtype torch.bool"),
        ({"key_mask": torch.ones(2, 39, dtype=torch.bool)}, ValueError, "key_mask must have shape"),
        ({"method": "fast"}, ValueError, "method must be one of"),
        ({"backend": "gpu"}, ValueError, "backend must be"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            fused_input_attention(**{**t, "norm_eps": eps, **change})
    half = {k: v.detach().half() for k, v in t.items()}
    with pytest.raises(pf.BackendUnsupportedError, match="backend 'cpu' cannot run input attention.*dtype float16 not supported"):
        fused_input_attention(**half, norm_eps=eps, backend="cpu")


@pytest.mark.parametrize("causal", [False, True])
def test_query_chunks_in_bfloat16(causal):
    """A query axis run in chunks (backends/cpu.py) sums dx and the weight gradients over the chunks
    in float32: no worse against float64 than the unchunked kernel."""
    B, H, N, M, C, dqk, dv = 2, 2, 37, 29, 16, 8, 8
    torch.manual_seed(0)
    q = torch.randn(B, H, N, dqk, dtype=torch.float64)
    x = torch.randn(B, M, C, dtype=torch.float64) + 1
    weights = [torch.randn(H * dqk, C, dtype=torch.float64), torch.randn(H * dqk, dtype=torch.float64),
               torch.randn(H * dv, C, dtype=torch.float64), torch.randn(H * dv, dtype=torch.float64)]
    key_mask = random_key_mask(B, M, empty_batch=False)
    dout = torch.randn(B, H, N, dv, dtype=torch.float64)

    def run(dtype, tiling):
        leaves = [t.to(dtype).requires_grad_() for t in (q, x, *weights)]
        out, _ = input_attention(leaves[0], leaves[1], True, 1e-5, *leaves[2:], key_mask, causal, 0.3, 0.0, None, "cpu",
                                     tiling)
        return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]

    exact = run(torch.float64, [0, 0, 0, 0])
    whole, chunked = run(torch.bfloat16, [0, 0, 0, 0]), run(torch.bfloat16, [0, 0, 0, 5])
    for name, want, got_whole, got_chunked in zip(("out", "dq", "dx", "dWk", "dbk", "dWv", "dbv"), exact, whole,
                                                  chunked):
        error_whole = (got_whole.double() - want).abs().max().item()
        error_chunked = (got_chunked.double() - want).abs().max().item()
        rounding = (want.to(torch.bfloat16).double() - want).abs().max().item()
        assert error_chunked <= 2 * error_whole + 2 * rounding, (name, error_chunked, error_whole)
