"""Row statistics of LayerNorm for the fused input attention: mean and 1/sqrt(var + eps) of each
row of x (B, M, C), in fp32. With them the attention kernels normalise K and V tiles as they
load them (`attention_forward.normalize_tile`), so LayerNorm(x) is never stored: only these two length-M vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_forward import device_guard

BLOCK_ROWS = 16
BLOCK_C = 64


@triton.jit
def _layer_norm_stats_kernel(X, Mean, Rstd, stride_xb, stride_xm, stride_xc, M, C, eps,
                             BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < M
    base = X + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xm
    total = tl.zeros([BLOCK_ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(base + offs_c[None, :] * stride_xc, mask=row_in[:, None] & (offs_c[None, :] < C), other=0.0)
        total += tl.sum(x.to(tl.float32), 1)
    mean = total / C
    # Second pass over the centred values: no cancellation for rows far from zero.
    squares = tl.zeros([BLOCK_ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        inside = row_in[:, None] & (offs_c[None, :] < C)
        x = tl.load(base + offs_c[None, :] * stride_xc, mask=inside, other=0.0)
        centred = tl.where(inside, x.to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, 1)
    rstd = 1.0 / tl.sqrt(squares / C + eps)
    tl.store(Mean + b.to(tl.int64) * M + rows, mean, mask=row_in)
    tl.store(Rstd + b.to(tl.int64) * M + rows, rstd, mask=row_in)


def layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and rstd (B, M) float32 of the rows of x (B, M, C)."""
    B, M, C = x.shape
    mean = torch.empty((B, M), device=x.device, dtype=torch.float32)
    rstd = torch.empty((B, M), device=x.device, dtype=torch.float32)
    with device_guard(x):
        _layer_norm_stats_kernel[(triton.cdiv(M, BLOCK_ROWS), B)](
            x, mean, rstd, *x.stride(), M, C, eps, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C, num_warps=4)
    return mean, rstd
