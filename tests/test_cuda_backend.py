"""The cuda backend (csrc/cuda/): forward and backward against the float64 reference on a GPU; its
refusals everywhere.

Its sources are compiled for sm_90a by `make cuda-check` (part of `make test`) on any machine with nvcc.
"""

from __future__ import annotations

import pytest
import torch

import perceiver_fast as pf
from perceiver_fast.extension import HAS_CUDA_KERNELS
from perceiver_fast.ops.attention import attention

from checks import assert_matches, random_inputs, random_key_mask, reference_with_grads

# (B, H, N, M, Dqk, Dv): one head of 261 / 322, Dqk != Dv, odd sizes, a latent-sized case.
SHAPES = [(1, 1, 512, 4096, 261, 261), (2, 2, 100, 1000, 32, 160), (1, 8, 64, 3000, 64, 64), (1, 1, 1, 1, 5, 3),
          (2, 1, 257, 129, 322, 322), (1, 2, 200, 200, 1024, 96)]


def test_auto_dispatch_never_picks_the_untested_cuda_backend():
    q, k, v = random_inputs(1, 1, 4, 8, 16, 16, requires_grad=False)
    reasons = pf.explain(q, k, v)["cuda"]
    assert any("device cpu not supported" in r or "not built" in r for r in reasons)
    with pytest.raises(pf.BackendUnsupportedError, match="backend 'cuda' cannot run"):
        pf.cross_attention(q, k, v, backend="cuda")


@pytest.mark.gpu
def test_cuda_backend_is_built_where_torch_has_cuda():
    assert HAS_CUDA_KERNELS
    q, k, v = random_inputs(1, 1, 4, 8, 16, 16, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    assert any("not yet run on a GPU" in r for r in pf.explain(q, k, v)["cuda"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "key_mask", "causal", "both"])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_cuda_forward_matches_float64_reference(dtype, shape, masking, splits):
    B, H, N, M, dqk, dv = shape
    q, k, v = random_inputs(B, H, N, M, dqk, dv, dtype=dtype, device="cuda", requires_grad=False)
    key_mask = random_key_mask(B, M, device="cuda") if masking in ("key_mask", "both") else None
    causal = masking in ("causal", "both")
    scale = dqk ** -0.5
    out, lse = attention(q, k, v, key_mask, causal, scale, 0.0, None, "cuda", "cross", [splits])
    dout = torch.zeros_like(out)
    expected, expected_lse, _ = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=causal)
    same_dtype, _, _ = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=causal, compute_dtype=dtype)
    assert_matches("out", out, expected, same_dtype.to(dtype))
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - expected_lse[finite].double()).abs().max() <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "key_mask", "causal", "both"])
def test_cuda_backward_matches_float64_reference(dtype, shape, masking):
    """dq, dk, dv of the public function on backend "cuda": masks with a batch entry that has no key,
    causal with rows that see none, Dqk != Dv and head dims up to 1024 (several 64-wide chunks)."""
    B, H, N, M, dqk, dv = shape
    q, k, v = random_inputs(B, H, N, M, dqk, dv, dtype=dtype, device="cuda")
    key_mask = random_key_mask(B, M, device="cuda") if masking in ("key_mask", "both") else None
    causal = masking in ("causal", "both")
    out = pf.cross_attention(q, k, v, key_mask=key_mask, causal=causal, backend="cuda")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, _, expected = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=causal)
    _, _, same_dtype = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=causal, compute_dtype=dtype)
    for name, g, g64, g_same in zip(("dq", "dk", "dv"), grads, expected, same_dtype):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_matches(name, g, g64, g_same.to(dtype))


@pytest.mark.gpu
def test_cuda_backward_takes_strided_operands():
    """HF and lucidrains hold heads as (B, N, H, D): q, k, v and dout with row strides of H * D."""
    B, H, N, M, dqk, dv = 2, 3, 70, 150, 48, 80
    q, k, v = (torch.randn(B, rows, H, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for rows, dim in ((N, dqk), (M, dqk), (M, dv)))
    key_mask = random_key_mask(B, M, device="cuda")
    out = pf.cross_attention(q, k, v, key_mask=key_mask, causal=True, backend="cuda")
    dout = torch.randn(B, N, H, dv, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, _, expected = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=True)
    _, _, same_dtype = reference_with_grads(q, k, v, dout, key_mask=key_mask, causal=True,
                                            compute_dtype=torch.bfloat16)
    for name, g, g64, g_same in zip(("dq", "dk", "dv"), grads, expected, same_dtype):
        assert_matches(name, g, g64, g_same.to(torch.bfloat16))
