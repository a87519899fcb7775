"""Attention dropout: the one random stream every backend draws its mask from.

Each call with dropout_p > 0 draws a seed from torch's default generator for the inputs' device
(so `torch.manual_seed` fixes it) and every kernel derives the keep decision of score (b, h, i, j)
from that seed alone, never from its tiling or thread count:

    words = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                          counter = (j >> 2, i, b * H + h, offset & 0xffffffff))
    keep(b, h, i, j) = words[j & 3] >= threshold(p)           (uint32 comparison)

i and j are the query row and key position within the whole problem; `seed` and `offset` are the
two int64 words of the seed tensor. Four neighbouring keys share one Philox call. Kept
probabilities are scaled by 1 / (1 - p); the softmax statistics (lse) are those of the undropped
scores, as in FlashAttention, so the backward regenerates the mask from the seed instead of storing
it. `perceiver_fast.reference.dropout_keep_mask` is the plain-torch definition the kernels are
tested against, bit for bit.
"""

from __future__ import annotations

import numbers

import torch

from .arguments import type_name

# Philox4x32's multipliers and Weyl increments (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC 2011), as Random123, cuRAND and Triton use them.
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def check_dropout_p(dropout_p) -> float:
    """dropout_p as a float in [0, 1); a clear error otherwise."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type_name(dropout_p)}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1) (1 would drop every probability), got {dropout_p}")
    return dropout_p


def keep_threshold(dropout_p: float) -> int:
    """The uint32 a Philox word must reach for its score to be kept: P(kept) = 1 - threshold / 2^32."""
    return min(int(dropout_p * 2**32), 2**32 - 1)


def draw_seed(device: torch.device) -> torch.Tensor:
    """(seed, offset) for one call, int64 in [0, 2^63) on `device`, from torch's default generator
    there. Drawn on the device so that a CUDA call never waits for the host."""
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=device)
