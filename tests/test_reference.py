"""The reference itself, against a per-row float64 loop written from the definition."""

import math

import pytest
import torch
from checks import random_key_mask

from perceiver_fast import attention_reference


def loop_attention(q, k, v, key_mask, causal, scale):
    B, H, N, _ = q.shape
    M = k.shape[2]
    out = torch.zeros(B, H, N, v.shape[3], dtype=torch.float64)
    lse = torch.full((B, H, N), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = [j for j in range(M) if (key_mask is None or key_mask[b, j]) and (not causal or j <= i + M - N)]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i].double() @ k[b, h, j].double() * scale for j in keys])
                lse[b, h, i] = torch.logsumexp(s, 0)
                p = torch.exp(s - lse[b, h, i])
                out[b, h, i] = sum(p[n] * v[b, h, j].double() for n, j in enumerate(keys))
    return out, lse


@pytest.mark.parametrize("N,M", [(5, 9), (9, 5), (1, 1), (4, 4)])
@pytest.mark.parametrize("key_mask,causal", [(False, False), (True, False), (False, True), (True, True)])
def test_reference_matches_definition(N, M, key_mask, causal):
    B, H, dqk, dv = 3, 2, 7, 5
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.float64) for n, d in ((N, dqk), (M, dqk), (M, dv)))
    mask = random_key_mask(B, M) if key_mask else None
    out, lse = attention_reference(q, k, v, key_mask=mask, causal=causal, scale=0.37)
    want_out, want_lse = loop_attention(q, k, v, mask, causal, 0.37)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    assert lse.dtype == torch.float32


def test_causal_is_bottom_right_aligned():
    # N=2 queries, M=4 keys: query 0 sees keys 0..2, query 1 sees keys 0..3.
    q = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    k = torch.zeros(1, 1, 4, 1, dtype=torch.float64)
    v = torch.arange(4, dtype=torch.float64).view(1, 1, 4, 1)
    out, lse = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(lse.flatten(), torch.tensor([math.log(3), math.log(4)]))


def test_rows_without_keys_give_zero_and_finite_gradients():
    q, k, v = (torch.randn(2, 1, n, 4, dtype=torch.float64, requires_grad=True) for n in (6, 3, 3))
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out, lse = attention_reference(q, k, v, key_mask=mask, causal=True)  # N > M: early rows see nothing
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isneginf(lse[1, 0, :3]).all() and (out[1, 0, :3] == 0).all()
    assert torch.isfinite(lse[1, 0, 3:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all()


def test_reference_gradients_against_finite_differences():
    q, k, v = (torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    mask = torch.tensor([[True, False, True, True, False, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_reference(q, k, v, key_mask=mask, causal=True)[0], (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_backward_equals_autograd_of_the_reference(causal):
    from perceiver_fast.reference import attention_reference_backward

    q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True) for n, d in ((6, 5), (9, 5), (9, 4)))
    mask = random_key_mask(2, 9)  # batch item 0 has no key: its gradients are 0
    out, lse = attention_reference(q, k, v, key_mask=mask, causal=causal)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = attention_reference_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, key_mask=mask,
                                       causal=causal)
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        # lse is float32 (the contract), so the probabilities rebuilt from it carry its rounding
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
