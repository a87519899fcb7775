"""Triton backward kernels for attention over a long key axis, and their launcher.

The key axis is the long one, so the work is split over key blocks: each program
owns a block of keys (and one chunk of the head dimensions), loops over every
query that can see it, keeps its dk/dv rows in registers and writes them once,
and adds its share of dq into an fp32 buffer with atomics.

Probabilities are recomputed from q, k and the forward's lse; `_row_dot_kernel`
first computes delta = rowsum(dO * O), the softmax-gradient correction. With dropout the keep mask
is regenerated from the seed, never stored: with Z = keep / (1 - p), dV += (P Z)^T dO, dP = Z (dO V^T),
dS = P (dP - delta).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .attention_forward import (LOG2E, allowed_keys, cast, decode_program_id, dot, dot_options, key_row_stats,
                                normalize_tile)
from .devices import device_guard
from .dropout import dropout_arguments, keep_tile, load_seed


@triton.jit
def _row_dot_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, DV,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, n_block, _ = decode_program_id(tl.cdiv(N, BLOCK_N), 1)
    b = bh // H
    h = bh % H
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_n < N
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_n[:, None].to(tl.int64) * stride_on
    do_base = (DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
               + offs_n[:, None].to(tl.int64) * stride_don)
    delta = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, DV, BLOCK_DV):
        offs_d = d0 + tl.arange(0, BLOCK_DV)
        tile_in = row_in[:, None] & (offs_d[None, :] < DV)
        o = tl.load(o_base + offs_d[None, :] * stride_od, mask=tile_in, other=0.0).to(tl.float32)
        do = tl.load(do_base + offs_d[None, :] * stride_dod, mask=tile_in, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(Delta + bh.to(tl.int64) * N + offs_n, delta, mask=row_in)


@triton.jit
def key_block_gradients(q_base, stride_qn, stride_qd, K, stride_km, stride_kd, V, stride_vm, stride_vd, first_row,
                        do_base, stride_don, stride_dod, dq_base, stride_dqn, stride_dqd, Lse, Delta, DropoutSeed,
                        mean, rstd, first_key, key_allowed, d_block, bh, N, M, DQK, DV,
                        scale, qk_scale_log2, dropout_threshold, dropout_scale,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """Loops over every query that can see keys first_key .. first_key + BLOCK_M - 1: adds its share of dq (times scale)
    into dq_base with atomics and returns (dk / scale, dv) of the block's keys for head-dim chunk
    d_block, in fp32.

    Key j's row of K and V is row j - first_row of the K and V given (0 for whole tensors). Lse and
    Delta point at this batch x head's rows; key_allowed (BLOCK_M,) says which keys may be attended;
    mean and rstd (BLOCK_M, 1) normalise K and V when NORMALIZE.
    """
    offs_m = first_key + tl.arange(0, BLOCK_M)
    key_in = offs_m < M
    arange_n = tl.arange(0, BLOCK_N)
    arange_dqk = tl.arange(0, BLOCK_DQK)
    arange_dv = tl.arange(0, BLOCK_DV)
    own_dqk = d_block * BLOCK_DQK + arange_dqk
    own_dv = d_block * BLOCK_DV + arange_dv
    rows = (offs_m - first_row).to(tl.int64)
    k_rows = K + rows[:, None] * stride_km
    v_rows = V + rows[:, None] * stride_vm

    k_own = tl.load(k_rows + own_dqk[None, :] * stride_kd,
                    mask=key_in[:, None] & (own_dqk[None, :] < DQK), other=0.0)
    if NORMALIZE:
        k_own = normalize_tile(k_own, mean, rstd, INTERPRETED_BF16)
    dk = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if DROPOUT:
        seed, seed_offset = load_seed(DropoutSeed)

    n_start = 0
    if CAUSAL:
        # Query i sees key j iff j <= i + M - N: earlier query blocks see none of these keys.
        n_start = (tl.maximum(first_key - (M - N), 0) // BLOCK_N) * BLOCK_N
    for n0 in range(n_start, N, BLOCK_N):
        offs_n = n0 + arange_n
        row_in = offs_n < N

        # Scores transposed (keys x queries), so dk/dv rows stay in this program's layout.
        scores_t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, DQK, BLOCK_DQK):
            offs_d = d0 + arange_dqk
            k = tl.load(k_rows + offs_d[None, :] * stride_kd,
                        mask=key_in[:, None] & (offs_d[None, :] < DQK), other=0.0)
            if NORMALIZE:
                k = normalize_tile(k, mean, rstd, INTERPRETED_BF16)
            qt = tl.load(q_base + offs_n[None, :].to(tl.int64) * stride_qn + offs_d[:, None] * stride_qd,
                         mask=row_in[None, :] & (offs_d[:, None] < DQK), other=0.0)
            scores_t += dot(k, qt, INPUT_PRECISION, INTERPRETED_BF16)

        lse = tl.load(Lse + offs_n, mask=row_in, other=float("inf"))
        # Queries with no key have lse = -inf; +inf makes their probabilities exp2(-inf) = 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        allowed = key_allowed[:, None] & row_in[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[:, None] <= offs_n[None, :] + (M - N))
        # p <= 1: the recomputed scores may round above the forward's (at 1e9 by hundreds). A NaN stays.
        exponent = tl.minimum(scores_t * qk_scale_log2 - lse[None, :] * 1.4426950408889634, 0.0,
                              propagate_nan=tl.PropagateNan.ALL)
        p_t = tl.where(allowed, tl.exp2(exponent), 0.0)

        # dP^T = V dO^T over every chunk of the value head dimension.
        dp_t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, DV, BLOCK_DV):
            offs_d = d0 + arange_dv
            vv = tl.load(v_rows + offs_d[None, :] * stride_vd,
                         mask=key_in[:, None] & (offs_d[None, :] < DV), other=0.0)
            if NORMALIZE:
                vv = normalize_tile(vv, mean, rstd, INTERPRETED_BF16)
            do_t = tl.load(do_base + offs_n[None, :].to(tl.int64) * stride_don + offs_d[:, None] * stride_dod,
                           mask=row_in[None, :] & (offs_d[:, None] < DV), other=0.0)
            dp_t += dot(vv, do_t, INPUT_PRECISION, INTERPRETED_BF16)

        do_own = tl.load(do_base + offs_n[:, None].to(tl.int64) * stride_don + own_dv[None, :] * stride_dod,
                         mask=row_in[:, None] & (own_dv[None, :] < DV), other=0.0)
        if DROPOUT:
            # Z = keep / (1 - p), regenerated from the seed (drawn queries x keys, used transposed):
            # dV += (P Z)^T dO and dP = Z (dO V^T); dS below keeps the undropped P.
            z_t = tl.trans(tl.where(keep_tile(seed, seed_offset, bh, offs_n, first_key, BLOCK_M,
                                              dropout_threshold), dropout_scale, 0.0))
            dp_t = dp_t * z_t
            dv += dot(cast(p_t * z_t, do_own.dtype, INTERPRETED_BF16), do_own, INPUT_PRECISION, INTERPRETED_BF16)
        else:
            dv += dot(cast(p_t, do_own.dtype, INTERPRETED_BF16), do_own, INPUT_PRECISION, INTERPRETED_BF16)

        delta = tl.load(Delta + offs_n, mask=row_in, other=0.0)
        ds_t = cast(p_t * (dp_t - delta[None, :]), k_own.dtype, INTERPRETED_BF16)
        q_own = tl.load(q_base + offs_n[:, None].to(tl.int64) * stride_qn + own_dqk[None, :] * stride_qd,
                        mask=row_in[:, None] & (own_dqk[None, :] < DQK), other=0.0)
        dk += dot(ds_t, q_own, INPUT_PRECISION, INTERPRETED_BF16)
        dq_part = dot(tl.trans(ds_t), k_own, INPUT_PRECISION, INTERPRETED_BF16) * scale
        tl.atomic_add(dq_base + offs_n[:, None].to(tl.int64) * stride_dqn + own_dqk[None, :] * stride_dqd,
                      dq_part, mask=row_in[:, None] & (own_dqk[None, :] < DQK), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["dropout_threshold"])
def _attention_backward_kernel(
    Q, K, V, KeyMask, DOut, Lse, Delta, DQ, DK, DV_, Mean, Rstd, DropoutSeed,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_maskb, stride_maskm,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkm, stride_dkd,
    stride_dvb, stride_dvh, stride_dvm, stride_dvd,
    H, N, M, DQK, DV,
    scale, qk_scale_log2,
    num_d_blocks,
    dropout_threshold, dropout_scale,  # as in the forward kernel
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    # Program (key block, d_block) writes dk[:, d_block chunk] and dv[:, d_block chunk];
    # for head dims of one chunk (<= 64) there is a single d_block and no recomputation.
    bh, m_block, d_block = decode_program_id(tl.cdiv(M, BLOCK_M), num_d_blocks)
    b = bh // H
    h = bh % H
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    key_in = offs_m < M
    own_dqk = d_block * BLOCK_DQK + tl.arange(0, BLOCK_DQK)
    own_dv = d_block * BLOCK_DV + tl.arange(0, BLOCK_DV)

    key_allowed = allowed_keys(KeyMask + b.to(tl.int64) * stride_maskb, stride_maskm, offs_m, key_in, HAS_KEY_MASK)
    mean, rstd = key_row_stats(Mean + b.to(tl.int64) * M, Rstd + b.to(tl.int64) * M, offs_m, key_in, NORMALIZE)

    dk, dv = key_block_gradients(
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_qn, stride_qd,
        K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_km, stride_kd,
        V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, stride_vm, stride_vd, 0,
        DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, stride_don, stride_dod,
        DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, stride_dqn, stride_dqd,
        Lse + bh.to(tl.int64) * N, Delta + bh.to(tl.int64) * N, DropoutSeed,
        mean, rstd, m_block * BLOCK_M, key_allowed, d_block, bh, N, M, DQK, DV,
        scale, qk_scale_log2, dropout_threshold, dropout_scale,
        BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV, CAUSAL, NORMALIZE, DROPOUT, INPUT_PRECISION, INTERPRETED_BF16)

    dk_ptrs = (DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
               + offs_m[:, None].to(tl.int64) * stride_dkm + own_dqk[None, :] * stride_dkd)
    dv_ptrs = (DV_ + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
               + offs_m[:, None].to(tl.int64) * stride_dvm + own_dv[None, :] * stride_dvd)
    dk_in = key_in[:, None] & (own_dqk[None, :] < DQK)
    dv_in = key_in[:, None] & (own_dv[None, :] < DV)
    if NORMALIZE:
        # K and V are one input seen by every head: DK and DV_ are one fp32 buffer that every head's
        # program adds its dK and dV into (head stride 0).
        tl.atomic_add(dk_ptrs, dk * scale, mask=dk_in, sem="relaxed")
        tl.atomic_add(dv_ptrs, dv, mask=dv_in, sem="relaxed")
    else:
        tl.store(dk_ptrs, cast(dk * scale, DK.dtype.element_ty, INTERPRETED_BF16), mask=dk_in)
        tl.store(dv_ptrs, cast(dv, DV_.dtype.element_ty, INTERPRETED_BF16), mask=dv_in)


def _launch(dout, q, k, v, out, lse, key_mask, causal: bool, scale: float, kind: str, dk, dv,
            stats: tuple[torch.Tensor, torch.Tensor] | None, dropout_p: float, dropout_seed: torch.Tensor | None):
    """Runs the backward kernels, writing dk and dv (or, with stats, adding into them); returns dq."""
    B, H, N, DQK = q.shape
    M, DV = k.shape[2], v.shape[3]
    cfg = tiles.backward_config(kind, DQK, DV, fp32=q.dtype == torch.float32)

    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    dq = torch.zeros((B, H, N, DQK), device=q.device, dtype=torch.float32)
    num_d_blocks = max(triton.cdiv(DQK, cfg.block_dqk), triton.cdiv(DV, cfg.block_dv))
    mask_arg = key_mask if key_mask is not None else q  # never read when HAS_KEY_MASK is False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    row_block = tiles.ROW_BLOCK
    dropout, seed_arg, threshold, dropout_scale = dropout_arguments(dropout_p, dropout_seed, lse)
    with device_guard(q):
        _row_dot_kernel[(triton.cdiv(N, row_block) * B * H,)](
            out, dout, delta, *out.stride(), *dout.stride(), H, N, DV,
            BLOCK_N=row_block, BLOCK_DV=cfg.block_dv, num_warps=4,
        )
        _attention_backward_kernel[(triton.cdiv(M, cfg.block_m) * num_d_blocks * B * H,)](
            q, k, v, mask_arg, dout, lse, delta, dq, dk, dv, *(stats or (lse, lse)), seed_arg,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            H, N, M, DQK, DV,
            scale, scale * LOG2E, num_d_blocks, threshold, dropout_scale,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_DQK=cfg.block_dqk, BLOCK_DV=cfg.block_dv,
            HAS_KEY_MASK=key_mask is not None, CAUSAL=causal, NORMALIZE=stats is not None, DROPOUT=dropout,
            **dot_options(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq.to(q.dtype)


def attention_backward(dout, q, k, v, out, lse, key_mask, causal: bool, scale: float, kind: str,
                       dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None):
    """Returns dq, dk, dv in the dtypes of q, k, v (dk, dv contiguous). dropout_p and dropout_seed: those
    the forward ran with; the keep mask is regenerated from the seed."""
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dq = _launch(dout, q, k, v, out, lse, key_mask, causal, scale, kind, dk, dv, None, dropout_p, dropout_seed)
    return dq, dk, dv


def shared_input_backward(dout, q, kv, out, lse, key_mask, causal: bool, scale: float,
                          stats: tuple[torch.Tensor, torch.Tensor], dropout_p: float = 0.0,
                          dropout_seed: torch.Tensor | None = None):
    """The backward of attention whose K and V are one input kv (B, H, M, C), the same for every head
    (head stride 0), normalised by `stats` (mean, rstd as in `attention_forward`): (dq, dxn) with dxn
    (B, M, C) float32 the gradient of the normalised input, dK + dV summed over heads inside the
    kernel (no M x C tensor per head)."""
    B, H, M, C = kv.shape
    dxn = torch.zeros((B, M, C), device=kv.device, dtype=torch.float32)
    every_head = dxn.unsqueeze(1).expand(B, H, M, C)
    dq = _launch(dout, q, kv, kv, out, lse, key_mask, causal, scale, "cross", every_head, every_head, stats,
                 dropout_p, dropout_seed)
    return dq, dxn
