"""Autograd wrapper of the C++ fused input attention (torch.ops.perceiver_fast.cpu_input_attention_*)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .cpu_attention import _ops


class CpuInputAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, x, k_weight, k_bias, v_weight, v_bias, normalize, eps, key_mask, causal, scale, tiling):
        out, lse = _ops().cpu_input_attention_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias,
                                                      key_mask, causal, scale, *tiling)
        ctx.save_for_backward(q, x, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask)
        ctx.settings = (normalize, eps, causal, scale, tiling)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, x, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask = ctx.saved_tensors
        normalize, eps, causal, scale, tiling = ctx.settings
        dq, dx, dkw, dkb, dvw, dvb = _ops().cpu_input_attention_backward(
            dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, causal, scale,
            *tiling)
        weight_grads = (dkw, dkb, dvw, dvb) if k_weight is not None else (None,) * 4
        return (dq, dx, *weight_grads) + (None,) * 6


def cpu_input_attention(q, x, *, normalize, eps, k_weight=None, k_bias=None, v_weight=None, v_bias=None,
                        key_mask=None, causal=False, scale, key_tile=0, row_block=0, workers=0):
    """(out, lse) of attention over x normalised (no affine) and, with k_weight, projected tile by tile.

    Without k_weight (the shortcut) K = V = the normalised x for every head, and q's last
    dimension is x's C. Differentiable in q, x and the four projection tensors. key_tile,
    row_block and workers override the kernel's loop sizes when non-zero (tests reach tile
    edges and split batch items with them).
    """
    return CpuInputAttention.apply(q, x, k_weight, k_bias, v_weight, v_bias, normalize, float(eps), key_mask, causal,
                                   float(scale), (key_tile, row_block, workers))
