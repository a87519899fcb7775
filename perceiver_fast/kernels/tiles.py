"""Block-size choices for the Triton attention kernels.

Every configuration a launcher can pick comes from the functions here, so the
ahead-of-time compile check (`compile_check.py`) can enumerate exactly that set.
Choices are per problem kind: "cross" (few queries, long keys) and "latent"
(small square self-attention).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

KINDS = ("cross", "latent")

# tl.dot needs every operand dimension >= 16 on the GPU; head tiles stay powers of two.
MIN_TILE = 16
HEAD_TILES = (16, 32, 64, 128)
# A head tile is halved while it wastes more than this fraction of its work on padding.
MAX_HEAD_PADDING = 0.25


@dataclass(frozen=True)
class BlockConfig:
    block_n: int  # query rows per program
    block_m: int  # key rows per program (backward) or per loop step (forward)
    block_dqk: int  # chunk of the q/k head dimension
    block_dv: int  # chunk of the v head dimension
    num_warps: int
    num_stages: int


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def head_tile(dim: int, max_tile: int = 128) -> int:
    """Power-of-two chunk for a head dimension of any size (261, 322, ...).

    Starts from the smallest power of two covering `dim` (capped at `max_tile`) and
    halves it while the padding of the last chunk wastes more than MAX_HEAD_PADDING.
    """
    if dim < 1:
        raise ValueError(f"head dimension must be >= 1, got {dim}")
    tile = min(max(_next_power_of_2(dim), MIN_TILE), max_tile)
    while tile > MIN_TILE:
        padded = -(-dim // tile) * tile
        if (padded - dim) / padded <= MAX_HEAD_PADDING:
            break
        tile //= 2
    return tile


def _warps(block_n: int, block_m: int, block_dqk: int, block_dv: int) -> int:
    # Eight warps once the largest register tile passes 64 x 64 fp32 values.
    return 8 if max(block_n, block_m) * max(block_dqk, block_dv) > 64 * 64 else 4


def forward_config(kind: str, dqk: int, dv: int, fp32: bool) -> BlockConfig:
    """Tiles of the forward kernel. fp32 tiles are smaller: the operands take twice the shared memory."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    max_tile = 64 if fp32 else 128
    block_dqk, block_dv = head_tile(dqk, max_tile), head_tile(dv, max_tile)
    if kind == "cross":
        # Few query rows, long key axis: wide key steps amortise the per-step softmax bookkeeping.
        block_n, block_m = 64, 64
    else:
        # Small square problems: more query blocks per head keeps the GPU busy without splitting.
        block_n, block_m = (64, 64) if max(block_dqk, block_dv) > 64 else (64, 32)
    return BlockConfig(block_n, block_m, block_dqk, block_dv,
                       num_warps=_warps(block_n, block_m, block_dqk, block_dv),
                       num_stages=2)


def backward_config(kind: str, dqk: int, dv: int, fp32: bool) -> BlockConfig:
    """Tiles of the key-parallel backward kernel (dk, dv in registers, dq by atomics)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    block_dqk, block_dv = head_tile(dqk, 64), head_tile(dv, 64)
    block_m = 64 if kind == "cross" else 32
    block_n = 32 if fp32 else 64
    return BlockConfig(block_n, block_m, block_dqk, block_dv,
                       num_warps=_warps(block_n, block_m, block_dqk, block_dv),
                       num_stages=1 if fp32 else 2)


@dataclass(frozen=True)
class ProjectionConfig:
    """Extra tiles of the projection method's kernels (their attention tiles are forward_config's and
    backward_config's for "cross")."""
    block_c: int  # chunk of the input channels in the projection GEMMs
    chunk_keys: int  # keys projected into the forward's workspace at a time: a multiple of its block_m


# Elements of K and V one forward program keeps projected at a time (64 KiB in bf16).
PROJECTED_CHUNK_ELEMENTS = 32768


def projection_config(dqk: int, dv: int, channels: int, fp32: bool) -> ProjectionConfig:
    block_m = forward_config("cross", dqk, dv, fp32).block_m
    chunk = min(512, PROJECTED_CHUNK_ELEMENTS // (dqk + dv)) // block_m * block_m
    return ProjectionConfig(block_c=head_tile(channels, 32 if fp32 else 64), chunk_keys=max(block_m, chunk))


# Query rows per program of the small per-row kernels (split merge, rowsum(dO * O)).
ROW_BLOCK = 16


def choose_num_splits(programs: int, keys: int, block_m: int, num_sms: int) -> int:
    """How many programs share one (query block, head) along the key axis.

    Split only when the natural grid fills less than two waves of the GPU, and keep
    at least four key steps per split so the merge stays cheap next to the main loop.
    """
    if programs >= 2 * num_sms:
        return 1
    wanted = -(-2 * num_sms // programs)
    max_by_keys = max(1, keys // (4 * block_m))
    return max(1, min(wanted, max_by_keys, 256))


def all_configs():
    """Every (kind, fp32, BlockConfig) pair the launchers can produce, forward and backward."""
    seen_fwd, seen_bwd = set(), set()
    for kind, fp32, dqk, dv in itertools.product(KINDS, (False, True), _dims_hitting_every_tile(),
                                                 _dims_hitting_every_tile()):
        seen_fwd.add((kind, fp32, forward_config(kind, dqk, dv, fp32)))
        seen_bwd.add((kind, fp32, backward_config(kind, dqk, dv, fp32)))
    return sorted(seen_fwd, key=repr), sorted(seen_bwd, key=repr)


def _dims_hitting_every_tile():
    # The configs depend on head dims only through head_tile, whose values are HEAD_TILES:
    # one dim per tile value covers them all (tests check every dim from 1 to 1024).
    return sorted({min(d for d in range(1, 1025) if head_tile(d) == t) for t in HEAD_TILES})
