"""Translating each library's attention mask into the bool key mask (B, M) of the contract, and
telling when a call must keep the library's own computation."""

from __future__ import annotations

import torch


class NotPerKey(Exception):
    """The mask is not one bool per key (it varies by query or head, or holds other additive values)."""


def additive_to_key_mask(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """An HF-style additive mask (0 = attend, a very negative value = masked), (B or 1, 1 or H, N or 1, M),
    as bool (B, M) True = attend; None for no mask. Raises NotPerKey when it cannot be one.

    Rows are compared only when they are stored separately: a mask expanded from one row
    (stride 0 over queries and heads) costs nothing to read.
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] != keys or mask.shape[0] not in (1, batch):
        raise NotPerKey(f"mask of shape {tuple(mask.shape)}")
    row = mask[:, :1, :1, :]
    for dim in (1, 2):
        if mask.shape[dim] > 1 and mask.stride(dim) != 0 and not torch.equal(mask, row.expand_as(mask)):
            raise NotPerKey("mask differs between queries or heads")
    row = row[:, 0, 0, :]
    # exp(value - row max) must be exactly 1 or 0: only 0 and the dtype's most negative values qualify.
    floor = torch.finfo(row.dtype).min / 2 if row.is_floating_point() else None
    keep = row == 0
    if floor is None or not bool(((row <= floor) | keep).all()):
        raise NotPerKey("mask holds values other than 0 and a large negative number")
    return keep.expand(batch, keys)


def key_mask_from_bool(mask: torch.Tensor | None, batch: int, keys: int, *, true_means: str) -> torch.Tensor | None:
    """A bool mask (B, M) (or (B, ...) flattening to M) as True = attend. true_means: "attend" or "pad"."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape[0] != batch or mask[0].numel() != keys:
        raise NotPerKey(f"mask of dtype {mask.dtype} and shape {tuple(mask.shape)}")
    mask = mask.reshape(batch, keys)
    return mask if true_means == "attend" else ~mask


def has_rows_without_keys(key_mask: torch.Tensor | None, queries: int, keys: int, causal: bool) -> bool:
    """Whether some query may attend no key at all.

    The libraries give such a row the mean of all values (a softmax over equal scores); the
    contract gives 0, so such a call keeps the library's computation. Causal is bottom-right
    aligned, so query 0 sees the fewest keys: 0 .. M - N.
    """
    visible = keys - queries + 1 if causal else keys
    if visible <= 0:
        return True
    if key_mask is None:
        return False
    return not bool(key_mask[:, :visible].any(dim=1).all())
