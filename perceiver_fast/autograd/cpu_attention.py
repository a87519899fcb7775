"""Autograd wrapper of the C++ CPU attention kernels (torch.ops.perceiver_fast.cpu_attention_*)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..backends.cpu import extension_error


def _ops():
    error = extension_error()
    if error:
        raise RuntimeError(error)
    return torch.ops.perceiver_fast


class CpuAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal, scale, tiling):
        out, lse = _ops().cpu_attention_forward(q, k, v, key_mask, causal, scale, *tiling)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.causal, ctx.scale, ctx.tiling = causal, scale, tiling
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _ops().cpu_attention_backward(dout, q, k, v, out, lse, key_mask, ctx.causal, ctx.scale,
                                                   *ctx.tiling)
        return dq, dk, dv, None, None, None, None


def cpu_attention(q, k, v, *, key_mask=None, causal=False, scale=None, key_tile=0, row_block=0, workers=0):
    """(out, lse) from the C++ CPU kernels, differentiable in q, k, v; inputs are checked by the binding.

    key_tile (keys per streamed tile), row_block (query rows per GEMM) and workers (parallel
    pieces the key axis is cut into) override the kernel's defaults when non-zero; tests use them
    to reach tile edges and split heads with small inputs.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return CpuAttention.apply(q, k, v, key_mask, causal, float(scale), (key_tile, row_block, workers))
