"""Autograd wrapper of the Triton fused input attention (the shortcut: K = V = LayerNorm(x), no affine).

Forward stores nothing of size M x C: the kernels normalise x's tiles as they load them, from two
(B, M) vectors of row statistics. Backward runs the attention backward kernel the same way, which
writes dK and dV per head; their sum over heads and the LayerNorm backward then run in torch, so
the backward does hold tensors of M x C per head (the C++ kernel fuses those steps as well).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import attention_backward, attention_forward
from ..kernels.layer_norm_stats import layer_norm_stats


def _shared_input(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, M, C) as K and V (B, H, M, C) of every head: a stride-0 view, not a copy."""
    return x.unsqueeze(1).expand(x.shape[0], heads, x.shape[1], x.shape[2])


def _unit_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], x.shape[1])
    return (torch.zeros(shape, device=x.device, dtype=torch.float32),
            torch.ones(shape, device=x.device, dtype=torch.float32))


class TritonInputAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, x, normalize, eps, key_mask, causal, scale):
        stats = layer_norm_stats(x, eps) if normalize else _unit_stats(x)
        kv = _shared_input(x, q.shape[1])
        out, lse = attention_forward(q, kv, kv, key_mask, causal, scale, "cross", stats=stats)
        ctx.save_for_backward(q, x, out, lse, key_mask, *stats)
        ctx.settings = (normalize, causal, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, x, out, lse, key_mask, mean, rstd = ctx.saved_tensors
        normalize, causal, scale = ctx.settings
        kv = _shared_input(x, q.shape[1])
        dq, dk, dv = attention_backward(dout, q, kv, kv, out, lse, key_mask, causal, scale, "cross",
                                        stats=(mean, rstd))
        dxn = (dk.float() + dv.float()).sum(1)
        if normalize:
            # LayerNorm backward: dx = rstd (dxn - mean(dxn) - xn mean(dxn xn)).
            xn = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
            dxn = rstd.unsqueeze(-1) * (dxn - dxn.mean(-1, keepdim=True) - xn * (dxn * xn).mean(-1, keepdim=True))
        return dq, dxn.to(x.dtype), None, None, None, None, None


def triton_input_attention(q, x, *, normalize, eps, key_mask=None, causal=False, scale):
    """(out, lse) of attention over the LayerNorm (no affine) of x, shared by every head: q (B, H, N, C)."""
    return TritonInputAttention.apply(q, x, normalize, float(eps), key_mask, causal, float(scale))
