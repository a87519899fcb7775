"""Launchers of the Triton fused input attention (the shortcut: K = V = LayerNorm(x) without affine,
shared by every head): q (B, H, N, C) attends over x (B, M, C).

The forward stores nothing of size M x C: the attention kernels normalise x's tiles as they load
them, from two (B, M) vectors of row statistics. The backward runs the attention backward kernel
the same way; it adds dK + dV of every head into one float32 (B, M, C) gradient of the normalised
input, and a row kernel takes it back through the LayerNorm. Nothing of size M x C per head is made:
one float32 buffer the size of x, and dx.
"""

from __future__ import annotations

import torch

from .attention_backward import shared_input_backward
from .attention_forward import attention_forward
from .layer_norm import layer_norm_backward, layer_norm_stats


def _shared_input(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, M, C) as K and V (B, H, M, C) of every head: a stride-0 view, not a copy."""
    return x.unsqueeze(1).expand(x.shape[0], heads, x.shape[1], x.shape[2])


def row_stats(x: torch.Tensor, normalize: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) (B, M) float32 of x's rows; zeros and ones when x is used as it is."""
    if normalize:
        return layer_norm_stats(x, eps)
    shape = (x.shape[0], x.shape[1])
    return (torch.zeros(shape, device=x.device, dtype=torch.float32),
            torch.ones(shape, device=x.device, dtype=torch.float32))


def input_attention_forward(q, x, normalize: bool, eps: float, key_mask, causal: bool, scale: float,
                            dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None):
    """(out (B, H, N, C), lse (B, H, N) float32). Dropout as in `attention_forward`, over the scores of
    q's heads (the mask's head index is q's, though every head attends the same K = V)."""
    kv = _shared_input(x, q.shape[1])
    return attention_forward(q, kv, kv, key_mask, causal, scale, "cross", None, dropout_p, dropout_seed,
                             stats=row_stats(x, normalize, eps))


def input_attention_backward(dout, q, x, normalize: bool, eps: float, out, lse, key_mask, causal: bool, scale: float,
                             dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None):
    """(dq, dx). The row statistics are recomputed: two length-M vectors, cheaper to remake than to keep;
    the dropout mask is regenerated from the seed the forward ran with."""
    mean, rstd = row_stats(x, normalize, eps)
    dq, dxn = shared_input_backward(dout, q, _shared_input(x, q.shape[1]), out, lse, key_mask, causal, scale,
                                    (mean, rstd), dropout_p, dropout_seed)
    return dq, layer_norm_backward(x, dxn, mean, rstd) if normalize else dxn.to(x.dtype)
