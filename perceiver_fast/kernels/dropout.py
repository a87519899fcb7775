"""Attention dropout's keep mask in Triton, drawn by the definition in perceiver_fast/dropout.py.

    words = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                          counter = (j >> 2, i, b * H + h, offset & 0xffffffff))
    keep(b, h, i, j) = words[j & 3] >= threshold(p)           (uint32 comparison)

`keep_tile` is the one helper the attention kernels (forward and backward) and the debug kernel
behind `dropout_keep_mask` draw it with: one Philox call per four neighbouring keys, on a
(rows, keys / 4) tile, whose four words are interleaved back into a (rows, keys) tile. The mask is
never stored: the backward regenerates it from the seed tensor, which the kernels read from memory
(no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import check_dropout_p, keep_threshold
from .devices import device_guard


@triton.jit
def load_seed(Seed):
    """(seed, offset) from the int64 (2,) seed tensor: the Philox key as int64 (tl.philox splits it
    into its low and high words) and the fourth counter word, offset & 0xffffffff, as uint32."""
    seed = tl.load(Seed)
    offset = (tl.load(Seed + 1) & 0xFFFFFFFF).to(tl.uint32)
    return seed, offset


@triton.jit
def keep_tile(seed, offset, bh, offs_rows, first_key, BLOCK_KEYS: tl.constexpr, threshold):
    """Bool (len(offs_rows), BLOCK_KEYS) tile: keep decision of query rows `offs_rows` (int32) and keys
    first_key .. first_key + BLOCK_KEYS - 1 of batch x head `bh` (b * H + h).

    first_key must be a multiple of 4 and BLOCK_KEYS a multiple of 4 (tiles start at multiples of the
    key block): each group of four keys is one Philox call, whose word r goes to key 4 g + r. Keys
    past the end get decisions too; the caller masks them. `threshold` is keep_threshold(p), an
    integer below 2^32 (of whichever integer type the launch gives it), compared as uint32.
    """
    GROUPS: tl.constexpr = BLOCK_KEYS // 4
    groups = first_key // 4 + tl.arange(0, GROUPS)
    zero = tl.zeros([offs_rows.shape[0], GROUPS], tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, groups[None, :] + zero, offs_rows[:, None] + zero, bh + zero, offset + zero)
    # join(join(w0, w2), join(w1, w3))[r, g, a, c] = w[2a + c]: row-major, key 4g + 2a + c gets word 2a + c.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [offs_rows.shape[0], BLOCK_KEYS])
    return words >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(Seed, Keep, H, N, M, stride_kb, stride_kh, stride_kn, stride_km, threshold,
                         BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr):
    # Axis 0 enumerates (batch x head, row block, key block), key block fastest (CUDA caps axes 1, 2).
    pid = tl.program_id(0)
    key_blocks = tl.cdiv(M, BLOCK_KEYS)
    per_head = tl.cdiv(N, BLOCK_ROWS) * key_blocks
    bh = pid // per_head
    row_block = (pid % per_head) // key_blocks
    key_block = pid % key_blocks
    b = bh // H
    h = bh % H
    offs_rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_keys = key_block * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    seed, offset = load_seed(Seed)
    keep = keep_tile(seed, offset, bh, offs_rows, key_block * BLOCK_KEYS, BLOCK_KEYS, threshold)
    ptrs = (Keep + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            + offs_rows[:, None].to(tl.int64) * stride_kn + offs_keys[None, :].to(tl.int64) * stride_km)
    tl.store(ptrs, keep, mask=(offs_rows[:, None] < N) & (offs_keys[None, :] < M))


def dropout_arguments(dropout_p: float, dropout_seed: torch.Tensor | None, like: torch.Tensor):
    """(DROPOUT flag, seed tensor, threshold, 1 / (1 - p)) for a kernel launch; with dropout_p == 0 the
    flag is False and `like` stands in for the seed (never read)."""
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p == 0.0:
        return False, like, 0, 1.0
    if dropout_seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed (int64 (2,): seed, offset)")
    if dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 2 or dropout_seed.device != like.device:
        raise ValueError(f"dropout_seed must be an int64 tensor of 2 elements on {like.device}, got "
                         f"{dropout_seed.dtype} {tuple(dropout_seed.shape)} on {dropout_seed.device}")
    return True, dropout_seed.contiguous(), keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, queries: int, keys: int,
                      dropout_p: float) -> torch.Tensor:
    """The bool (B, H, N, M) keep mask the attention kernels draw from `seed` (int64 (2,), on the device
    the mask is made on), by the same `keep_tile`: for debugging and tests against
    `perceiver_fast.reference.dropout_keep_mask`."""
    _, seed, threshold, _ = dropout_arguments(dropout_p, seed, seed)
    keep = torch.empty((batch, heads, queries, keys), device=seed.device, dtype=torch.bool)
    if dropout_p == 0.0:
        return keep.fill_(True)
    if keep.numel() == 0:
        return keep
    block_rows, block_keys = 16, 32
    grid = (batch * heads * triton.cdiv(queries, block_rows) * triton.cdiv(keys, block_keys),)
    with device_guard(seed):
        _dropout_mask_kernel[grid](seed, keep, heads, queries, keys, *keep.stride(), threshold,
                                   BLOCK_ROWS=block_rows, BLOCK_KEYS=block_keys, num_warps=4)
    return keep
