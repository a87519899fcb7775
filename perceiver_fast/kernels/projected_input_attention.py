"""Triton kernels and launchers of the fused input attention's projection method: q (B, H, N, Dqk)
attends over K = LN(x) Wk^T + bk and V = LN(x) Wv^T + bv, split over heads, made tile by tile
inside the kernels from x (B, M, C) (LayerNorm without affine; its affine part is folded into the
weights by the caller).

Each key's K and V are projected once per head, never stored whole:
- Forward: a program owns (batch x head, key range). It projects a chunk of its keys into its own
  slot of a small workspace, then carries every query block's online softmax over that chunk. The
  running (max, sum, unnormalised P V) of every query row stays in a float32 workspace of
  splits x N x Dv per head, then splits merge as in `attention_forward`.
- Backward: a program owns (batch x head, key range) and walks its key blocks. It projects a
  block's K and V into its slot, runs the attention backward of that block (`key_block_gradients`),
  and takes dK, dV back through the projection with atomics: into d(normalised x) (B, M, C), the
  weight gradients (dK^T xn) and the bias gradients. A row kernel then takes d(normalised x)
  through the LayerNorm.
Workspace: B H splits (chunk x (Dqk + Dv) + N x (Dv + 2)) forward, B H splits x block x (Dqk + Dv)
backward, whatever M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .attention_backward import _row_dot_kernel, key_block_gradients
from .attention_forward import (LOG2E, _merge_splits_kernel, allowed_keys, attend_keys, cast, dot, dot_options,
                                finish_rows, key_row_stats, normalize_tile, num_sms)
from .devices import device_guard
from .dropout import dropout_arguments
from .input_attention import row_stats
from .layer_norm import layer_norm_backward


@triton.jit
def load_normalized(x_rows, stride_xc, offs_c, key_in, mean, rstd, C,
                    NORMALIZE: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """Channels offs_c of a tile of x's rows, normalised with the rows' (BLOCK_M, 1) mean and rstd."""
    xt = tl.load(x_rows + offs_c[None, :].to(tl.int64) * stride_xc, mask=key_in[:, None] & (offs_c[None, :] < C),
                 other=0.0)
    if NORMALIZE:
        xt = normalize_tile(xt, mean, rstd, INTERPRETED_BF16)
    return xt


@triton.jit
def project_tile(x_rows, stride_xc, mean, rstd, key_in, W, stride_wo, stride_wc, Bias, Dest, C, D,
                 BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                 NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """Dest[r, :D] = LN(x_r) W^T + bias for the tile's rows (W: this head's D x C rows), rounded to
    Dest's dtype as a projection in that dtype would be. Dest's rows are (BLOCK_M, 1) pointers."""
    arange_c = tl.arange(0, BLOCK_C)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([key_in.shape[0], BLOCK_D], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + arange_c
            xt = load_normalized(x_rows, stride_xc, offs_c, key_in, mean, rstd, C, NORMALIZE, INTERPRETED_BF16)
            wt = tl.load(W + offs_d[None, :].to(tl.int64) * stride_wo + offs_c[:, None] * stride_wc,
                         mask=(offs_d[None, :] < D) & (offs_c[:, None] < C), other=0.0)
            acc += dot(xt, wt, INPUT_PRECISION, INTERPRETED_BF16)
        acc += tl.load(Bias + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        tl.store(Dest + offs_d[None, :], cast(acc, Dest.dtype.element_ty, INTERPRETED_BF16),
                 mask=key_in[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=["dropout_threshold"])
def _projected_forward_kernel(
    Q, X, Mean, Rstd, WK, BK, WV, BV, KeyMask, Scratch, Acc, RowMax, RowSum, DropoutSeed,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_xb, stride_xm, stride_xc,
    stride_wko, stride_wkc, stride_wvo, stride_wvc,
    stride_maskb, stride_maskm,
    H, N, M, C, DQK, DV,
    qk_scale_log2, keys_per_split, chunk_keys, dropout_threshold, dropout_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    """Program (batch x head, split). Leaves in Acc (B, H, splits, N, DV) float32 the split's output
    rows and in RowMax (B, H, splits, N) their lse, as `_merge_splits_kernel` reads them; RowSum
    holds the running sums. Acc, RowMax and RowSum come zeroed, -inf and zeroed."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    slot = bh.to(tl.int64) * tl.num_programs(1) + split
    b = bh // H
    h = bh % H
    scratch_k = Scratch + slot * chunk_keys * (DQK + DV)
    scratch_v = scratch_k + chunk_keys * DQK
    acc_base = Acc + slot * N * DV
    max_base = RowMax + slot * N
    sum_base = RowSum + slot * N
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    x_base = X + b.to(tl.int64) * stride_xb
    mask_base = KeyMask + b.to(tl.int64) * stride_maskb
    arange_n = tl.arange(0, BLOCK_N)
    arange_m = tl.arange(0, BLOCK_M)
    arange_dv = tl.arange(0, BLOCK_DV)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, M)
    for c0 in range(lo, hi, chunk_keys):
        c_hi = tl.minimum(c0 + chunk_keys, hi)
        for t0 in range(c0, c_hi, BLOCK_M):
            offs_m = t0 + arange_m
            key_in = offs_m < c_hi
            mean, rstd = key_row_stats(Mean + b.to(tl.int64) * M, Rstd + b.to(tl.int64) * M, offs_m, key_in,
                                       NORMALIZE)
            x_rows = x_base + offs_m[:, None].to(tl.int64) * stride_xm
            slot_rows = (offs_m - c0)[:, None]
            project_tile(x_rows, stride_xc, mean, rstd, key_in, WK + h.to(tl.int64) * DQK * stride_wko, stride_wko,
                         stride_wkc, BK + h * DQK, scratch_k + slot_rows * DQK, C, DQK, BLOCK_DQK, BLOCK_C,
                         NORMALIZE, INPUT_PRECISION, INTERPRETED_BF16)
            project_tile(x_rows, stride_xc, mean, rstd, key_in, WV + h.to(tl.int64) * DV * stride_wvo, stride_wvo,
                         stride_wvc, BV + h * DV, scratch_v + slot_rows * DV, C, DV, BLOCK_DV, BLOCK_C,
                         NORMALIZE, INPUT_PRECISION, INTERPRETED_BF16)
        tl.debug_barrier()  # the chunk's K and V, written by every thread, are read by every thread

        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            row_in = offs_n < N
            keys_hi = c_hi
            if CAUSAL:
                keys_hi = tl.minimum(keys_hi, n0 + BLOCK_N + M - N)
            m_run = tl.load(max_base + offs_n, mask=row_in, other=float("-inf"))
            l_run = tl.load(sum_base + offs_n, mask=row_in, other=0.0)
            m_next, l_next = m_run, l_run
            # Each chunk of the value dims carries the same scores from the same running state.
            for dv0 in range(0, DV, BLOCK_DV):
                offs_dv = dv0 + arange_dv
                acc_ptrs = acc_base + offs_n[:, None].to(tl.int64) * DV + offs_dv[None, :]
                acc_in = row_in[:, None] & (offs_dv[None, :] < DV)
                acc = tl.load(acc_ptrs, mask=acc_in, other=0.0)
                # Threads holding copies of a value have all loaded it (and the running max and
                # sum above) before any of them stores over it.
                tl.debug_barrier()
                acc, m_next, l_next = attend_keys(
                    acc, m_run, l_run,
                    q_base, stride_qn, stride_qd, scratch_k, DQK, 1, scratch_v, DV, 1,
                    c0, mask_base, stride_maskm, Mean, Rstd, DropoutSeed,
                    offs_n, row_in, offs_dv, bh, c0, keys_hi, N, M, DQK, DV, qk_scale_log2, dropout_threshold,
                    BLOCK_M, BLOCK_DQK, HAS_KEY_MASK, CAUSAL, False, DROPOUT, INPUT_PRECISION, INTERPRETED_BF16)
                tl.store(acc_ptrs, acc, mask=acc_in)
            tl.store(max_base + offs_n, m_next, mask=row_in)
            tl.store(sum_base + offs_n, l_next, mask=row_in)
        tl.debug_barrier()  # the next chunk overwrites the workspace; the running state changes hands

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + arange_n
        row_in = offs_n < N
        m_run = tl.load(max_base + offs_n, mask=row_in, other=float("-inf"))
        l_run = tl.load(sum_base + offs_n, mask=row_in, other=0.0)
        lse = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for dv0 in range(0, DV, BLOCK_DV):
            offs_dv = dv0 + arange_dv
            acc_ptrs = acc_base + offs_n[:, None].to(tl.int64) * DV + offs_dv[None, :]
            acc_in = row_in[:, None] & (offs_dv[None, :] < DV)
            acc = tl.load(acc_ptrs, mask=acc_in, other=0.0)
            tl.debug_barrier()  # as above: every copy loaded before the rows are written over in place
            out, lse = finish_rows(acc, m_run, l_run, dropout_scale, DROPOUT)
            tl.store(acc_ptrs, out, mask=acc_in)
        tl.store(max_base + offs_n, lse, mask=row_in)


@triton.jit(do_not_specialize=["dropout_threshold"])
def _projected_backward_kernel(
    Q, X, Mean, Rstd, WK, WV, BK, BV, KeyMask, DOut, Lse, Delta, DQ, DXN, DWK, DBK, DWV, DBV, Scratch, DropoutSeed,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_xb, stride_xm, stride_xc,
    stride_wko, stride_wkc, stride_wvo, stride_wvc,
    stride_maskb, stride_maskm,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_gb, stride_gm, stride_gc,
    H, N, M, C, DQK, DV,
    scale, qk_scale_log2, keys_per_split, num_d_blocks, dropout_threshold, dropout_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    """Program (batch x head, split): for each key block of its range, adds the block's share into
    dq (B, H, N, DQK), DXN (B, M, C), DWK (H DQK, C), DBK (H DQK), DWV and DBV, all float32 and zeroed."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    slot = bh.to(tl.int64) * tl.num_programs(1) + split
    b = bh // H
    h = bh % H
    scratch_k = Scratch + slot * BLOCK_M * (DQK + DV)
    scratch_v = scratch_k + BLOCK_M * DQK
    x_base = X + b.to(tl.int64) * stride_xb
    wk_head = WK + h.to(tl.int64) * DQK * stride_wko
    wv_head = WV + h.to(tl.int64) * DV * stride_wvo
    arange_m = tl.arange(0, BLOCK_M)
    arange_c = tl.arange(0, BLOCK_C)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, M)
    for first_key in range(lo, hi, BLOCK_M):
        offs_m = first_key + arange_m
        key_in = offs_m < M
        mean, rstd = key_row_stats(Mean + b.to(tl.int64) * M, Rstd + b.to(tl.int64) * M, offs_m, key_in, NORMALIZE)
        key_allowed = allowed_keys(KeyMask + b.to(tl.int64) * stride_maskb, stride_maskm, offs_m, key_in,
                                   HAS_KEY_MASK)
        x_rows = x_base + offs_m[:, None].to(tl.int64) * stride_xm
        project_tile(x_rows, stride_xc, mean, rstd, key_in, wk_head, stride_wko, stride_wkc, BK + h * DQK,
                     scratch_k + arange_m[:, None] * DQK, C, DQK, BLOCK_DQK, BLOCK_C,
                     NORMALIZE, INPUT_PRECISION, INTERPRETED_BF16)
        project_tile(x_rows, stride_xc, mean, rstd, key_in, wv_head, stride_wvo, stride_wvc, BV + h * DV,
                     scratch_v + arange_m[:, None] * DV, C, DV, BLOCK_DV, BLOCK_C,
                     NORMALIZE, INPUT_PRECISION, INTERPRETED_BF16)
        tl.debug_barrier()  # the block's K and V, written by every thread, are read by every thread

        for d_block in range(0, num_d_blocks):
            dk, dv = key_block_gradients(
                Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_qn, stride_qd,
                scratch_k, DQK, 1, scratch_v, DV, 1, first_key,
                DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, stride_don, stride_dod,
                DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, stride_dqn, stride_dqd,
                Lse + bh.to(tl.int64) * N, Delta + bh.to(tl.int64) * N, DropoutSeed,
                mean, rstd, first_key, key_allowed, d_block, bh, N, M, DQK, DV,
                scale, qk_scale_log2, dropout_threshold, dropout_scale,
                BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV, CAUSAL, False, DROPOUT, INPUT_PRECISION, INTERPRETED_BF16)
            dk = dk * scale
            own_dqk = d_block * BLOCK_DQK + tl.arange(0, BLOCK_DQK)
            own_dv = d_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
            tl.atomic_add(DBK + h * DQK + own_dqk, tl.sum(dk, 0), mask=own_dqk < DQK, sem="relaxed")
            tl.atomic_add(DBV + h * DV + own_dv, tl.sum(dv, 0), mask=own_dv < DV, sem="relaxed")
            # Rounded to the input dtype as a projection's backward in that dtype would take them.
            dk_in = cast(dk, X.dtype.element_ty, INTERPRETED_BF16)
            dv_in = cast(dv, X.dtype.element_ty, INTERPRETED_BF16)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                c_in = offs_c < C
                xn = load_normalized(x_rows, stride_xc, offs_c, key_in, mean, rstd, C, NORMALIZE, INTERPRETED_BF16)
                wk = tl.load(wk_head + own_dqk[:, None].to(tl.int64) * stride_wko + offs_c[None, :] * stride_wkc,
                             mask=(own_dqk[:, None] < DQK) & c_in[None, :], other=0.0)
                wv = tl.load(wv_head + own_dv[:, None].to(tl.int64) * stride_wvo + offs_c[None, :] * stride_wvc,
                             mask=(own_dv[:, None] < DV) & c_in[None, :], other=0.0)
                # Keys outside the input have dK = dV = 0: they add nothing.
                dxn = (dot(dk_in, wk, INPUT_PRECISION, INTERPRETED_BF16)
                       + dot(dv_in, wv, INPUT_PRECISION, INTERPRETED_BF16))
                tl.atomic_add(DXN + b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gm
                              + offs_c[None, :] * stride_gc, dxn, mask=key_in[:, None] & c_in[None, :], sem="relaxed")
                tl.atomic_add(DWK + (h * DQK + own_dqk[:, None]).to(tl.int64) * C + offs_c[None, :],
                              dot(tl.trans(dk_in), xn, INPUT_PRECISION, INTERPRETED_BF16),
                              mask=(own_dqk[:, None] < DQK) & c_in[None, :], sem="relaxed")
                tl.atomic_add(DWV + (h * DV + own_dv[:, None]).to(tl.int64) * C + offs_c[None, :],
                              dot(tl.trans(dv_in), xn, INPUT_PRECISION, INTERPRETED_BF16),
                              mask=(own_dv[:, None] < DV) & c_in[None, :], sem="relaxed")
        tl.debug_barrier()  # the next block overwrites the workspace


def _splits(programs: int, keys: int, block_m: int, device: torch.device, forced: int | None) -> tuple[int, int]:
    """(splits, keys per split) of the key axis: `forced` (clamped to the number of key blocks) or
    enough to fill the GPU; keys per split a multiple of block_m."""
    key_blocks = triton.cdiv(keys, block_m)
    wanted = forced if forced is not None else tiles.choose_num_splits(programs, keys, block_m, num_sms(device))
    keys_per_split = triton.cdiv(key_blocks, max(1, min(wanted, key_blocks, 65535))) * block_m
    return triton.cdiv(keys, keys_per_split), keys_per_split


def _bias_or_zeros(bias, weight):
    """A projection's bias, or zeros of its length where it has none (the kernels always add one)."""
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


def projected_attention_forward(q, x, normalize: bool, eps: float, k_weight, k_bias, v_weight, v_bias, key_mask,
                                causal: bool, scale: float, dropout_p: float = 0.0,
                                dropout_seed: torch.Tensor | None = None, num_splits: int | None = None):
    """(out (B, H, N, Dv) in q's dtype, lse (B, H, N) float32) of q over K = LN(x) Wk^T + bk and
    V = LN(x) Wv^T + bv (weights (H Dqk, C) and (H Dv, C), biases optional) split over heads. Dropout
    as in `attention_forward`; `num_splits` forces the key-axis splits (tests)."""
    B, H, N, _ = q.shape
    M, C = x.shape[1], x.shape[2]
    DQK, DV = k_weight.shape[0] // H, v_weight.shape[0] // H
    k_bias, v_bias = _bias_or_zeros(k_bias, k_weight), _bias_or_zeros(v_bias, v_weight)
    fp32 = q.dtype == torch.float32
    cfg, proj = tiles.forward_config("cross", DQK, DV, fp32), tiles.projection_config(DQK, DV, C, fp32)
    splits, keys_per_split = _splits(B * H, M, cfg.block_m, q.device, num_splits)
    chunk_keys = min(proj.chunk_keys, keys_per_split)
    mean, rstd = row_stats(x, normalize, eps)
    scratch = torch.empty((B * H * splits * chunk_keys * (DQK + DV),), device=q.device, dtype=q.dtype)
    acc = torch.zeros((B, H, splits, N, DV), device=q.device, dtype=torch.float32)
    row_max = torch.full((B, H, splits, N), float("-inf"), device=q.device, dtype=torch.float32)
    row_sum = torch.zeros((B, H, splits, N), device=q.device, dtype=torch.float32)
    out = torch.empty((B, H, N, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    mask_arg = key_mask if key_mask is not None else q  # never read when HAS_KEY_MASK is False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    dropout, seed_arg, threshold, dropout_scale = dropout_arguments(dropout_p, dropout_seed, lse)
    options = dot_options(q.dtype)
    with device_guard(q):
        _projected_forward_kernel[(B * H, splits)](
            q, x, mean, rstd, k_weight, k_bias, v_weight, v_bias, mask_arg, scratch, acc, row_max, row_sum, seed_arg,
            *q.stride(), *x.stride(), *k_weight.stride(), *v_weight.stride(), *mask_strides,
            H, N, M, C, DQK, DV,
            scale * LOG2E, keys_per_split, chunk_keys, threshold, dropout_scale,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_C=proj.block_c, BLOCK_DQK=cfg.block_dqk,
            BLOCK_DV=cfg.block_dv, HAS_KEY_MASK=key_mask is not None, CAUSAL=causal, NORMALIZE=normalize,
            DROPOUT=dropout, **options, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        num_dv_blocks = triton.cdiv(DV, cfg.block_dv)
        part_out, part_lse = acc.permute(2, 0, 1, 3, 4), row_max.permute(2, 0, 1, 3)  # (splits, B, H, ...) views
        _merge_splits_kernel[(triton.cdiv(N, tiles.ROW_BLOCK) * num_dv_blocks * B * H,)](
            part_out, part_lse, out, lse,
            *part_out.stride(), *part_lse.stride()[:3], *out.stride(), *lse.stride()[:2],
            H, N, DV, splits, num_dv_blocks,
            BLOCK_N=tiles.ROW_BLOCK, BLOCK_DV=cfg.block_dv, INTERPRETED_BF16=options["INTERPRETED_BF16"], num_warps=4,
        )
    return out, lse


def projected_attention_backward(dout, q, x, normalize: bool, eps: float, k_weight, k_bias, v_weight, v_bias, out,
                                 lse, key_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                                 dropout_seed: torch.Tensor | None = None, num_splits: int | None = None):
    """(dq, dx, dk_weight, dk_bias, dv_weight, dv_bias) of `projected_attention_forward`, in the
    dtypes of their inputs (an absent bias gets an empty gradient). The row statistics are remade
    and the dropout mask regenerated from the seed."""
    B, H, N, _ = q.shape
    M, C = x.shape[1], x.shape[2]
    DQK, DV = k_weight.shape[0] // H, v_weight.shape[0] // H
    fp32 = q.dtype == torch.float32
    bwd, proj = tiles.backward_config("cross", DQK, DV, fp32), tiles.projection_config(DQK, DV, C, fp32)
    splits, keys_per_split = _splits(B * H, M, bwd.block_m, q.device, num_splits)
    mean, rstd = row_stats(x, normalize, eps)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty((B, H, N), **f32)
    dq = torch.zeros((B, H, N, DQK), **f32)
    dxn = torch.zeros((B, M, C), **f32)
    dk_weight, dv_weight = torch.zeros(k_weight.shape, **f32), torch.zeros(v_weight.shape, **f32)
    dk_bias, dv_bias = torch.zeros(H * DQK, **f32), torch.zeros(H * DV, **f32)
    scratch = torch.empty((B * H * splits * bwd.block_m * (DQK + DV),), device=q.device, dtype=q.dtype)
    num_d_blocks = max(triton.cdiv(DQK, bwd.block_dqk), triton.cdiv(DV, bwd.block_dv))
    mask_arg = key_mask if key_mask is not None else q  # never read when HAS_KEY_MASK is False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    dropout, seed_arg, threshold, dropout_scale = dropout_arguments(dropout_p, dropout_seed, lse)
    with device_guard(q):
        _row_dot_kernel[(triton.cdiv(N, tiles.ROW_BLOCK) * B * H,)](
            out, dout, delta, *out.stride(), *dout.stride(), H, N, DV,
            BLOCK_N=tiles.ROW_BLOCK, BLOCK_DV=bwd.block_dv, num_warps=4,
        )
        _projected_backward_kernel[(B * H, splits)](
            q, x, mean, rstd, k_weight, v_weight, _bias_or_zeros(k_bias, k_weight), _bias_or_zeros(v_bias, v_weight),
            mask_arg, dout, lse, delta, dq, dxn,
            dk_weight, dk_bias, dv_weight, dv_bias, scratch, seed_arg,
            *q.stride(), *x.stride(), *k_weight.stride(), *v_weight.stride(), *mask_strides, *dout.stride(),
            *dq.stride(), *dxn.stride(),
            H, N, M, C, DQK, DV,
            scale, scale * LOG2E, keys_per_split, num_d_blocks, threshold, dropout_scale,
            BLOCK_N=bwd.block_n, BLOCK_M=bwd.block_m, BLOCK_C=proj.block_c, BLOCK_DQK=bwd.block_dqk,
            BLOCK_DV=bwd.block_dv, HAS_KEY_MASK=key_mask is not None, CAUSAL=causal, NORMALIZE=normalize,
            DROPOUT=dropout, **dot_options(q.dtype), num_warps=bwd.num_warps, num_stages=bwd.num_stages,
        )
    dx = layer_norm_backward(x, dxn, mean, rstd) if normalize else dxn.to(x.dtype)
    # An absent bias gets an empty gradient, distinct from the other (a registered op's outputs may not alias).
    return [dq.to(q.dtype), dx,
            dk_weight.to(k_weight.dtype), q.new_empty(0) if k_bias is None else dk_bias.to(k_bias.dtype),
            dv_weight.to(v_weight.dtype), q.new_empty(0) if v_bias is None else dv_bias.to(v_bias.dtype)]
