"""LayerNorm without affine for the fused input attention, in two kernels over the rows of x (B, M, C).

Forward: each row's mean and 1/sqrt(var + eps), in fp32. With them the attention kernels normalise
K and V tiles as they load them (`attention_forward.normalize_tile`), so LayerNorm(x) is never
stored: only these two length-M vectors. Backward: dx from the gradient of the normalised rows,
recomputing the normalised values from x and the two vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_forward import cast, dot_options
from .devices import device_guard

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


@triton.jit
def _layer_norm_backward_kernel(X, DXN, Mean, Rstd, DX, stride_xb, stride_xm, stride_xc, stride_gb, stride_gm,
                                stride_gc, stride_db, stride_dm, stride_dc, M, C,
                                BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                                INTERPRETED_BF16: tl.constexpr):
    """dx = rstd (g - mean(g) - xn mean(g xn)) per row, g the gradient of xn = (x - mean) rstd."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < M
    mean = tl.load(Mean + b.to(tl.int64) * M + rows, mask=row_in, other=0.0)[:, None]
    rstd = tl.load(Rstd + b.to(tl.int64) * M + rows, mask=row_in, other=0.0)[:, None]
    x_base = X + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xm
    g_base = DXN + b.to(tl.int64) * stride_gb + rows[:, None].to(tl.int64) * stride_gm
    g_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    gx_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        inside = row_in[:, None] & (offs_c[None, :] < C)
        xn = (tl.load(x_base + offs_c[None, :] * stride_xc, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(g_base + offs_c[None, :] * stride_gc, mask=inside, other=0.0)
        g_sum += tl.sum(g, 1)
        gx_sum += tl.sum(g * xn, 1)  # g is 0 outside the row
    g_mean = (g_sum / C)[:, None]
    gx_mean = (gx_sum / C)[:, None]
    dx_base = DX + b.to(tl.int64) * stride_db + rows[:, None].to(tl.int64) * stride_dm
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        inside = row_in[:, None] & (offs_c[None, :] < C)
        xn = (tl.load(x_base + offs_c[None, :] * stride_xc, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(g_base + offs_c[None, :] * stride_gc, mask=inside, other=0.0)
        dx = rstd * (g - g_mean - xn * gx_mean)
        tl.store(dx_base + offs_c[None, :] * stride_dc, cast(dx, DX.dtype.element_ty, INTERPRETED_BF16), mask=inside)


def layer_norm_backward(x: torch.Tensor, dxn: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx (B, M, C) in x's dtype from dxn (B, M, C) float32, the gradient of LayerNorm(x) without affine."""
    B, M, C = x.shape
    dx = torch.empty_like(x)
    with device_guard(x):
        _layer_norm_backward_kernel[(triton.cdiv(M, BLOCK_ROWS), B)](
            x, dxn, mean, rstd, dx, *x.stride(), *dxn.stride(), *dx.stride(), M, C, BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_C=BLOCK_C, INTERPRETED_BF16=dot_options(x.dtype)["INTERPRETED_BF16"], num_warps=4)
    return dx
