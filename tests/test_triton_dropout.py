"""Attention dropout inside the Triton kernels against the float64 reference with the same keep mask.

The kernels draw the mask from the seed tensor (perceiver_fast/dropout.py), forward and backward;
the reference takes it as `dropout_keep=reference.dropout_keep_mask(seed, ...)`. So the mask is
checked bit for bit (through the debug kernel `kernels.dropout_keep_mask`, which draws it with the
attention kernels' own helper) and the outputs and gradients with the tolerances of
tests/test_triton_attention.py. On the CPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1), with small shapes; the `gpu` tests run the compiled kernels on CUDA.
"""

import os

import pytest
import torch
from checks import assert_lse_matches, assert_matches

from perceiver_fast import reference

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


def kernels():
    from perceiver_fast import kernels as k  # needs triton; imported by the tests that run

    return k


def random_seed(device="cpu"):
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=device)


def keep_mask(seed, q, keys, p):
    B, H, N, _ = q.shape
    return reference.dropout_keep_mask(seed, B, H, N, keys, p)


def key_mask_with_empty_batch(B, M, device):
    """Random key mask whose first batch item has no key at all (its rows: out 0, lse -inf, no gradient)."""
    mask = torch.rand(B, M, device=device) > 0.3
    mask[0] = False
    return mask


def reference_with_grads(q, k, v, dout, dtype, **kwargs):
    """(out, lse, (dq, dk, dv)) of `attention_reference` computed in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention_reference(*leaves, **kwargs)
    return out, lse, torch.autograd.grad(out, leaves, dout.to(dtype))


# ---------------------------------------------------------------------------------------------------
# The mask

MASK_SHAPES = {"odd": (2, 3, 17, 37), "keys-under-4": (1, 2, 5, 3), "two-key-blocks": (3, 1, 33, 70),
               "one": (1, 1, 1, 1), "rows-over-block": (2, 2, 40, 64)}


@interpreted
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_mask_matches_reference_bit_for_bit(shape, p):
    seed = random_seed()
    keep = kernels().dropout_keep_mask(seed, *shape, p)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, reference.dropout_keep_mask(seed, *shape, p))


@interpreted
@pytest.mark.parametrize("seed", [(0, 0), (2**63 - 1, 2**63 - 1), (0xFFFFFFFF, 2**32 + 5), (2**32, 0xFFFFFFFF)],
                         ids=["zeros", "max", "low-words", "high-words"])
def test_mask_seed_words(seed):
    """Both halves of the seed word reach the key, and only the offset's low word the counter."""
    seed = torch.tensor(seed, dtype=torch.int64)
    keep = kernels().dropout_keep_mask(seed, 2, 2, 9, 21, 0.3)
    assert torch.equal(keep, reference.dropout_keep_mask(seed, 2, 2, 9, 21, 0.3))


@interpreted
def test_mask_keep_rate():
    keep = kernels().dropout_keep_mask(random_seed(), 2, 2, 32, 128, 0.25)  # 16384 draws: sd 0.0034
    assert abs(keep.float().mean().item() - 0.75) < 0.02


# ---------------------------------------------------------------------------------------------------
# Attention forward and backward

# (B, H, N, M, Dqk, Dv), kind, splits. Odd sizes; N < M and N == M for causal; N > M gives rows with
# no key under causal; Dv = 80 gives the backward several head-dim blocks (the mask drawn in each).
CASES = {
    "cross": ((2, 2, 17, 37, 16, 24), "cross", 1),
    "cross-splits": ((2, 2, 9, 150, 16, 16), "cross", 3),
    "cross-n>m": ((2, 1, 21, 13, 8, 8), "cross", 1),
    "latent-square": ((2, 2, 30, 30, 16, 16), "latent", 1),
    "latent-n<m": ((1, 3, 20, 45, 16, 16), "latent", 1),
    "dv80": ((1, 2, 9, 40, 32, 80), "cross", 1),
}
MASKINGS = [(False, False), (True, False), (False, True), (True, True)]


def check_dropout_attention(shape, kind, splits, dtype, key_mask, causal, p=0.3, device="cpu"):
    B, H, N, M, dqk, dv = shape
    q, k, v = (torch.randn(B, H, rows, dim, dtype=dtype, device=device)
               for rows, dim in ((N, dqk), (M, dqk), (M, dv)))
    mask = key_mask_with_empty_batch(B, M, device) if key_mask else None
    seed, scale = random_seed(device), dqk ** -0.5
    out, lse = kernels().attention_forward(q, k, v, mask, causal, scale, kind, splits, dropout_p=p, dropout_seed=seed)
    dout = torch.randn_like(out)
    dq, dk, dv_ = kernels().attention_backward(dout, q, k, v, out, lse, mask, causal, scale, kind,
                                               dropout_p=p, dropout_seed=seed)
    settings = dict(key_mask=mask, causal=causal, scale=scale, dropout_p=p, dropout_keep=keep_mask(seed, q, M, p))
    out64, lse64, grads64 = reference_with_grads(q, k, v, dout, torch.float64, **settings)
    half = dtype in (torch.float16, torch.bfloat16)
    same = reference_with_grads(q, k, v, dout, dtype, **settings) if half else (None, None, (None,) * 3)
    assert out.dtype == dtype and out.shape == (B, H, N, dv)
    assert_matches("out", out, out64, same[0])
    assert_lse_matches(lse, lse64)
    empty = torch.isneginf(lse64)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all(), "a query with no key: output 0, no gradient"
    if key_mask:
        assert (dk[0] == 0).all() and (dv_[0] == 0).all(), "a batch item with no key: no key gradient"
    for name, g, g64, g_same in zip(("dq", "dk", "dv"), (dq, dk, dv_), grads64, same[2]):
        assert g.dtype == dtype
        assert_matches(name, g, g64, g_same)


@interpreted
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_dropout_float32(case, key_mask, causal):
    check_dropout_attention(*case, torch.float32, key_mask, causal)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["cross-splits", "latent-square", "dv80"])
def test_attention_dropout_half(case, dtype):
    check_dropout_attention(*CASES[case], dtype, key_mask=True, causal=True)


@interpreted
@pytest.mark.parametrize("p", [1e-12, 0.5, 0.95])
def test_attention_dropout_extreme_rates(p):
    # 1e-12: threshold 0 (everything kept); 0.5 and up: a threshold past 2^31 (a 64-bit launch argument).
    check_dropout_attention(*CASES["cross-splits"], torch.float32, key_mask=True, causal=False, p=p)


def run_attention(q, k, v, mask, causal, kind, splits, dout, *dropout):
    out, lse = kernels().attention_forward(q, k, v, mask, causal, 0.25, kind, splits, *dropout)
    return (out, lse, *kernels().attention_backward(dout, q, k, v, out, lse, mask, causal, 0.25, kind, *dropout))


@interpreted
@pytest.mark.parametrize("case", ["cross", "cross-splits", "latent-square"])
def test_dropout_p_zero_is_no_dropout(case):
    (B, H, N, M, dqk, dv), kind, splits = CASES[case]
    q, k, v = torch.randn(B, H, N, dqk), torch.randn(B, H, M, dqk), torch.randn(B, H, M, dv)
    mask, dout = key_mask_with_empty_batch(B, M, "cpu"), torch.randn(B, H, N, dv)
    plain = run_attention(q, k, v, mask, True, kind, splits, dout)
    zero = run_attention(q, k, v, mask, True, kind, splits, dout, 0.0, random_seed())
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)


@interpreted
def test_dropout_needs_a_seed():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="dropout_seed"):
        kernels().attention_forward(q, q, q, None, False, 0.5, "cross", 1, dropout_p=0.1)
    with pytest.raises(ValueError, match="int64"):
        kernels().attention_forward(q, q, q, None, False, 0.5, "cross", 1, dropout_p=0.1,
                                    dropout_seed=torch.zeros(2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------
# Fused input attention (the shortcut: K = V = LayerNorm(x) without affine, shared by every head)

def check_dropout_input_attention(normalize, key_mask, causal, dtype=torch.float32, p=0.3, device="cpu"):
    B, H, N, M, C = 2, 3, 11, 45, 20
    q = torch.randn(B, H, N, C, dtype=dtype, device=device)
    x = (torch.randn(B, M, C, device=device) * 2 + 0.5).to(dtype)
    mask = key_mask_with_empty_batch(B, M, device) if key_mask else None
    seed, scale, eps = random_seed(device), C ** -0.5, 1e-5
    out, lse = kernels().input_attention_forward(q, x, normalize, eps, mask, causal, scale, dropout_p=p,
                                                 dropout_seed=seed)
    dout = torch.randn_like(out)
    dq, dx = kernels().input_attention_backward(dout, q, x, normalize, eps, out, lse, mask, causal, scale,
                                                dropout_p=p, dropout_seed=seed)

    keep = keep_mask(seed, q, M, p)  # head index: q's

    def run_reference(compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, x)]
        xn = torch.nn.functional.layer_norm(leaves[1], (C,), eps=eps) if normalize else leaves[1]
        kv = xn.unsqueeze(1).expand(B, H, M, C)
        ref_out, ref_lse = reference.attention_reference(leaves[0], kv, kv, key_mask=mask, causal=causal, scale=scale,
                                                         dropout_p=p, dropout_keep=keep)
        return ref_out, ref_lse, torch.autograd.grad(ref_out, leaves, dout.to(compute_dtype))

    out64, lse64, (dq64, dx64) = run_reference(torch.float64)
    same = run_reference(dtype) if dtype != torch.float32 else (None, None, (None, None))
    assert_matches("out", out, out64, same[0])
    if dtype == torch.float32:
        assert_lse_matches(lse, lse64)
    else:
        # K = LayerNorm(x) rounded to x's dtype moves the scores themselves: lse within twice the
        # same-dtype reference's error, -inf exactly where float64's is.
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
        rows = ~torch.isneginf(lse64)
        err, ref_err = ((t[rows].double() - lse64[rows]).abs().max().item() for t in (lse, same[1]))
        assert err <= 2 * ref_err + 1e-4, f"lse error {err:.3g} > 2 x same-dtype reference's {ref_err:.3g}"
    assert (out[torch.isneginf(lse64)] == 0).all()
    assert_matches("dq", dq, dq64, same[2][0])
    assert_matches("dx", dx, dx64, same[2][1])


@interpreted
@pytest.mark.parametrize("key_mask,causal", [(False, False), (True, True)])
@pytest.mark.parametrize("normalize", [True, False])
def test_input_attention_dropout(normalize, key_mask, causal):
    check_dropout_input_attention(normalize, key_mask, causal)


@interpreted
def test_input_attention_dropout_bfloat16():
    check_dropout_input_attention(True, True, True, dtype=torch.bfloat16)


@interpreted
def test_input_attention_dropout_p_zero_is_no_dropout():
    q, x = torch.randn(2, 2, 7, 12), torch.randn(2, 30, 12)
    mask = key_mask_with_empty_batch(2, 30, "cpu")
    plain = kernels().input_attention_forward(q, x, True, 1e-5, mask, True, 0.3)
    zero = kernels().input_attention_forward(q, x, True, 1e-5, mask, True, 0.3, 0.0, random_seed())
    dout = torch.randn_like(plain[0])
    plain_grads = kernels().input_attention_backward(dout, q, x, True, 1e-5, *plain, mask, True, 0.3)
    zero_grads = kernels().input_attention_backward(dout, q, x, True, 1e-5, *zero, mask, True, 0.3, 0.0, random_seed())
    for a, b in zip((*plain, *plain_grads), (*zero, *zero_grads)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# On the GPU: the compiled kernels (the Philox of the compiled code, bit for bit)

@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_mask_matches_reference_gpu(p):
    seed = random_seed("cuda")
    shape = (2, 3, 77, 301)
    assert torch.equal(kernels().dropout_keep_mask(seed, *shape, p), reference.dropout_keep_mask(seed, *shape, p))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("case", [((2, 4, 100, 700, 64, 64), "cross", 1), ((2, 4, 100, 700, 64, 64), "cross", 4),
                                  ((1, 2, 64, 500, 261, 261), "cross", 1), ((2, 4, 256, 256, 32, 160), "latent", 1)],
                         ids=["cross", "cross-splits", "d261", "latent"])
def test_attention_dropout_gpu(case, dtype, key_mask, causal):
    check_dropout_attention(*case, dtype, key_mask, causal, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
def test_input_attention_dropout_gpu(normalize):
    check_dropout_input_attention(normalize, True, True, dtype=torch.bfloat16, device="cuda")
