"""Autograd wrapper of the Triton attention kernels."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import attention_backward, attention_forward


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal, scale, kind, num_splits):
        out, lse = attention_forward(q, k, v, key_mask, causal, scale, kind, num_splits)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.causal, ctx.scale, ctx.kind = causal, scale, kind
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, key_mask, ctx.causal, ctx.scale, ctx.kind)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(q, k, v, *, key_mask=None, causal=False, scale=None, kind="cross", num_splits=None):
    """(out, lse) from the Triton kernels, differentiable in q, k, v; inputs are not validated here.

    `num_splits` forces the number of key-axis splits of the forward (None: heuristic).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return TritonAttention.apply(q, k, v, key_mask, causal, float(scale), kind, num_splits)
