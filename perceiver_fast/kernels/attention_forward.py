"""Triton forward kernels for attention over a long key axis, and their launcher.

`_attention_forward_kernel` runs an online softmax over a range of keys for one
block of queries and one chunk of the value head dimension. With split-M, several
programs share one query block, each over its own key range, writing a partial
(out, lse) in fp32 that `_merge_splits_kernel` combines.

Layout is SDPA's: q (B, H, N, Dqk), k (B, H, M, Dqk), v (B, H, M, Dv).
Query i may attend key j when key_mask[b, j] and, if causal, j <= i + M - N.
A query with no key to attend gets output 0 and lse -inf.

With dropout (DROPOUT, FlashAttention's way) the online softmax statistics and the lse stay those of
the undropped scores; only the P V accumulation sees the dropped probabilities, whose keep mask
`dropout.keep_tile` draws from the seed per (query, key) tile, and the output is scaled by 1 / (1 - p).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tiles
from .devices import device_guard
from .dropout import dropout_arguments, keep_tile, load_seed

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """tl.dot with fp32 accumulation.

    The Triton interpreter multiplies bfloat16 operands wrongly, so there they are
    widened to fp32 first: bf16 x bf16 products are exact in fp32, as on the GPU.
    """
    if INTERPRETED_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def decode_program_id(blocks, chunks):
    """Grid axis 0 enumerates (batch x head, block, head-dim chunk), chunk fastest.

    Everything sits on axis 0 because CUDA caps axes 1 and 2 at 65535 programs.
    Returns (batch x head index, block, chunk).
    """
    pid = tl.program_id(0)
    per_head = blocks * chunks
    return pid // per_head, (pid % per_head) // chunks, pid % chunks


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """x.to(dtype) rounding to nearest even, as the GPU does.

    The interpreter truncates fp32 to bfloat16; there the value is rounded first, after
    which truncation is exact.
    """
    if INTERPRETED_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def normalize_tile(t, mean, rstd, INTERPRETED_BF16: tl.constexpr):
    """LayerNorm without affine of a K or V tile loaded from the raw input: (t - mean) * rstd in
    fp32, back in t's dtype. mean and rstd (per key) come broadcast along the tile's channel axis."""
    return cast((t.to(tl.float32) - mean) * rstd, t.dtype, INTERPRETED_BF16)


@triton.jit
def key_row_stats(Mean, Rstd, offs_m, key_in, NORMALIZE: tl.constexpr):
    """(mean, rstd) (BLOCK_M, 1) of keys offs_m from the batch item's row statistics; zeros (unused)
    without NORMALIZE."""
    if NORMALIZE:
        mean = tl.load(Mean + offs_m, mask=key_in, other=0.0)[:, None]
        rstd = tl.load(Rstd + offs_m, mask=key_in, other=0.0)[:, None]
    else:
        mean = tl.zeros([offs_m.shape[0], 1], tl.float32)
        rstd = mean
    return mean, rstd


@triton.jit
def allowed_keys(mask_base, stride_maskm, offs_m, key_in, HAS_KEY_MASK: tl.constexpr):
    """Which keys offs_m may be attended: inside the input and, with a key mask, kept by it."""
    allowed = key_in
    if HAS_KEY_MASK:
        keep = tl.load(mask_base + offs_m.to(tl.int64) * stride_maskm, mask=key_in, other=0)
        allowed = allowed & (keep != 0)
    return allowed


@triton.jit
def attend_keys(acc, m_i, l_i, q_base, stride_qn, stride_qd, K, stride_km, stride_kd, V, stride_vm, stride_vd,
                first_row, mask_base, stride_maskm, row_mean, row_rstd, DropoutSeed,
                offs_n, row_in, offs_dv, bh, lo, hi, N, M, DQK, DV, qk_scale_log2, dropout_threshold,
                BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr,
                HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """The online softmax of one block of query rows carried over keys lo .. hi - 1: returns (acc, m_i, l_i)
    updated from the state given (base-2 running max and sum, unnormalised P V of one value chunk).

    Key j's row of K and V is row j - first_row of the K and V given (0 for whole tensors; a key
    range's first key for a workspace that holds only that range). Masks, causal limits and
    dropout counters use the key index j itself. With NORMALIZE, row_mean and row_rstd point at the
    batch item's row statistics, indexed by key.
    """
    arange_m = tl.arange(0, BLOCK_M)
    arange_d = tl.arange(0, BLOCK_DQK)
    if DROPOUT:
        seed, seed_offset = load_seed(DropoutSeed)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + arange_m
        key_in = offs_m < M
        rows = (offs_m - first_row).to(tl.int64)
        if NORMALIZE:
            mean = tl.load(row_mean + offs_m, mask=key_in, other=0.0)
            rstd = tl.load(row_rstd + offs_m, mask=key_in, other=0.0)
        scores = tl.zeros([offs_n.shape[0], BLOCK_M], tl.float32)
        for d0 in range(0, DQK, BLOCK_DQK):
            offs_d = d0 + arange_d
            q = tl.load(q_base + offs_n[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_in[:, None] & (offs_d[None, :] < DQK), other=0.0)
            kt = tl.load(K + rows[None, :] * stride_km + offs_d[:, None] * stride_kd,
                         mask=key_in[None, :] & (offs_d[:, None] < DQK), other=0.0)
            if NORMALIZE:
                kt = normalize_tile(kt, mean[None, :], rstd[None, :], INTERPRETED_BF16)
            scores += dot(q, kt, INPUT_PRECISION, INTERPRETED_BF16)
        scores = scores * qk_scale_log2

        allowed = allowed_keys(mask_base, stride_maskm, offs_m, key_in, HAS_KEY_MASK)[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[None, :] <= offs_n[:, None] + (M - N))
        scores = tl.where(allowed, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(scores - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # The statistics above are the undropped scores'; only P V sees the dropped probabilities
            # (their 1 / (1 - p) is applied once, to the output).
            p = tl.where(keep_tile(seed, seed_offset, bh, offs_n, start, BLOCK_M, dropout_threshold), p, 0.0)

        v = tl.load(V + rows[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                    mask=key_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if NORMALIZE:
            v = normalize_tile(v, mean[:, None], rstd[:, None], INTERPRETED_BF16)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, INTERPRETED_BF16), v, INPUT_PRECISION, INTERPRETED_BF16)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def finish_rows(acc, m_i, l_i, dropout_scale, DROPOUT: tl.constexpr):
    """(out, lse) of rows from their online-softmax state; a row that saw no key gets 0 and -inf."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    # m_i and l_i live in base 2; ln(2) brings the lse back to natural log.
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit(do_not_specialize=["dropout_threshold"])
def _attention_forward_kernel(
    Q, K, V, KeyMask, Out, Lse, Mean, Rstd, DropoutSeed,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_maskb, stride_maskm,
    stride_os, stride_ob, stride_oh, stride_on, stride_od,
    stride_ls, stride_lb, stride_lh, stride_ln,
    H, N, M, DQK, DV,
    qk_scale_log2,  # softmax scale times log2(e): the kernel works with exp2
    keys_per_split,
    num_dv_blocks,
    dropout_threshold,  # keep_threshold(p): a Philox word at or above it keeps its probability
    dropout_scale,  # 1 / (1 - p)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    bh, n_block, dv_block = decode_program_id(tl.cdiv(N, BLOCK_N), num_dv_blocks)
    b = bh // H
    h = bh % H
    split = tl.program_id(1)

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_in = offs_n < N

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, M)
    if CAUSAL:
        # Key tiles past the last key the block's last query may see are skipped.
        hi = tl.minimum(hi, (n_block + 1) * BLOCK_N + M - N)

    acc, m_i, l_i = attend_keys(
        tl.zeros([BLOCK_N, BLOCK_DV], tl.float32), tl.full([BLOCK_N], float("-inf"), tl.float32),
        tl.zeros([BLOCK_N], tl.float32),
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_qn, stride_qd,
        K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_km, stride_kd,
        V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, stride_vm, stride_vd,
        0, KeyMask + b.to(tl.int64) * stride_maskb, stride_maskm,
        Mean + b.to(tl.int64) * M, Rstd + b.to(tl.int64) * M, DropoutSeed,
        offs_n, row_in, offs_dv, bh, lo, hi, N, M, DQK, DV, qk_scale_log2, dropout_threshold,
        BLOCK_M, BLOCK_DQK, HAS_KEY_MASK, CAUSAL, NORMALIZE, DROPOUT, INPUT_PRECISION, INTERPRETED_BF16)

    out, lse = finish_rows(acc, m_i, l_i, dropout_scale, DROPOUT)
    out_ptrs = (Out + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_n[:, None].to(tl.int64) * stride_on + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, cast(out, Out.dtype.element_ty, INTERPRETED_BF16), mask=row_in[:, None] & (offs_dv[None, :] < DV))
    if dv_block == 0:
        lse_ptrs = (Lse + split.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
                    + offs_n * stride_ln)
        tl.store(lse_ptrs, lse, mask=row_in)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out, Lse,
    stride_ps, stride_pb, stride_ph, stride_pn, stride_pd,
    stride_pls, stride_plb, stride_plh,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh,
    H, N, DV, num_splits, num_dv_blocks,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    """out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse); splits with no key have lse -inf."""
    bh, n_block, dv_block = decode_program_id(tl.cdiv(N, BLOCK_N), num_dv_blocks)
    b = bh // H
    h = bh % H
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_in = offs_n < N
    tile_in = row_in[:, None] & (offs_dv[None, :] < DV)

    lse_base = PartLse + b.to(tl.int64) * stride_plb + h.to(tl.int64) * stride_plh + offs_n
    part_base = (PartOut + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
                 + offs_n[:, None].to(tl.int64) * stride_pn + offs_dv[None, :] * stride_pd)

    # Pointers advance split by split, which keeps 64-bit offsets into large workspaces.
    lse_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    lse_ptrs = lse_base
    for _ in range(0, num_splits):
        lse_max = tl.maximum(lse_max, tl.load(lse_ptrs, mask=row_in, other=float("-inf")))
        lse_ptrs += stride_pls
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    weight_sum = tl.zeros([BLOCK_N], tl.float32)
    for _ in range(0, num_splits):
        w = tl.exp(tl.load(lse_base, mask=row_in, other=float("-inf")) - shift)
        acc += w[:, None] * tl.load(part_base, mask=tile_in, other=0.0)
        weight_sum += w
        lse_base += stride_pls
        part_base += stride_ps

    has_keys = weight_sum > 0.0
    w_safe = tl.where(has_keys, weight_sum, 1.0)
    out = acc / w_safe[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_n[:, None].to(tl.int64) * stride_on + offs_dv[None, :] * stride_od,
             cast(out, Out.dtype.element_ty, INTERPRETED_BF16), mask=tile_in)
    if dv_block == 0:
        lse = tl.where(has_keys, shift + tl.log(w_safe), float("-inf"))
        tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_n, lse, mask=row_in)


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs of `dot` for inputs of `dtype`."""
    # fp32 inputs must stay within 1e-4 of float64: no TF32 rounding of the operands.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    interpreted_bf16 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return {"INPUT_PRECISION": precision, "INTERPRETED_BF16": interpreted_bf16}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one at a time


def attention_forward(q, k, v, key_mask, causal: bool, scale: float, kind: str, num_splits: int | None = None,
                      dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None, *,
                      stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Runs the forward kernels. Returns out (B, H, N, Dv) in q's dtype and lse (B, H, N) float32.

    dropout_p > 0 drops probabilities by the keep mask drawn from dropout_seed (int64 (2,) on q's
    device: seed, offset; perceiver_fast/dropout.py), kept ones scaled by 1 / (1 - dropout_p); lse is
    that of the undropped scores. dropout_p == 0 runs the kernels without dropout code.

    `stats`: (mean, rstd) (B, M) float32 of raw input rows that k and v are views of; the
    kernel then attends over (k - mean) * rstd and (v - mean) * rstd (fused input attention).

    `num_splits=None` lets `tiles.choose_num_splits` decide; an int forces that many
    key-axis splits (clamped to the number of key tiles), for tests and tuning.
    """
    B, H, N, DQK = q.shape
    M, DV = k.shape[2], v.shape[3]
    cfg = tiles.forward_config(kind, DQK, DV, fp32=q.dtype == torch.float32)
    num_dv_blocks = triton.cdiv(DV, cfg.block_dv)
    programs = triton.cdiv(N, cfg.block_n) * num_dv_blocks * B * H
    key_tiles = triton.cdiv(M, cfg.block_m)
    if num_splits is None:
        num_splits = tiles.choose_num_splits(programs, M, cfg.block_m, num_sms(q.device))
    # Splits live on grid axis 1, which CUDA caps at 65535.
    keys_per_split = triton.cdiv(key_tiles, max(1, min(num_splits, key_tiles, 65535))) * cfg.block_m
    num_splits = triton.cdiv(M, keys_per_split)

    out = torch.empty((B, H, N, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty((num_splits, B, H, N, DV), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((num_splits, B, H, N), device=q.device, dtype=torch.float32)

    mask_arg = key_mask if key_mask is not None else q  # never read when HAS_KEY_MASK is False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    dropout, seed_arg, threshold, dropout_scale = dropout_arguments(dropout_p, dropout_seed, lse)
    options = dot_options(q.dtype)
    with device_guard(q):
        _attention_forward_kernel[(triton.cdiv(N, cfg.block_n) * num_dv_blocks * B * H, num_splits)](
            q, k, v, mask_arg, part_out, part_lse, *(stats or (lse, lse)), seed_arg,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides,
            *part_out.stride(), *part_lse.stride(),
            H, N, M, DQK, DV,
            scale * LOG2E, keys_per_split, num_dv_blocks, threshold, dropout_scale,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_DQK=cfg.block_dqk, BLOCK_DV=cfg.block_dv,
            HAS_KEY_MASK=key_mask is not None, CAUSAL=causal, NORMALIZE=stats is not None, DROPOUT=dropout, **options,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if num_splits > 1:
            block_n = tiles.ROW_BLOCK
            _merge_splits_kernel[(triton.cdiv(N, block_n) * num_dv_blocks * B * H,)](
                part_out, part_lse, out, lse,
                *part_out.stride(), *part_lse.stride()[:3],
                *out.stride(), *lse.stride()[:2],
                H, N, DV, num_splits, num_dv_blocks,
                BLOCK_N=block_n, BLOCK_DV=cfg.block_dv, INTERPRETED_BF16=options["INTERPRETED_BF16"], num_warps=4,
            )
    return out, lse
