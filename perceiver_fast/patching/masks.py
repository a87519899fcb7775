"""Translating each library's attention mask into the bool key mask (B, M) of the contract, and
telling when a call must keep the library's own computation.

Some of those checks read tensor values. Eagerly they are read and the call falls back when they
fail. Under torch.compile a read would break the graph, so they are asserted instead (`holds`):
the graph stays whole, and a call for which a check fails raises rather than giving another result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..shards import collective_device


class NotPerKey(Exception):
    """The mask is not one bool per key (it varies by query or head, or holds other additive values)."""


class MaskShapeError(ValueError):
    """A mask that does not fit the batch or the keys it masks (where the library's attention would fail
    to broadcast it)."""

    def __init__(self, name: str, shape: tuple[int, ...], batch: int, keys: int):
        super().__init__(f"{name} of shape {shape} does not fit {batch} items of {keys} keys: its first "
                         f"dimension must be {batch} (or 1) and its last {keys} (or 1)")
        self.batch, self.keys = batch, keys


def mask_shape_error(name: str, mask: torch.Tensor | None, batch: int, keys: int) -> MaskShapeError | None:
    """The error for an HF-style 4-D additive mask (B, 1 or H, N or 1, M) that does not broadcast over
    `batch` items of `keys` keys; None where it does (or there is no mask)."""
    if mask is None or mask.dim() != 4 or (mask.shape[0] in (1, batch) and mask.shape[-1] in (1, keys)):
        return None
    return MaskShapeError(name, tuple(mask.shape), batch, keys)


def holds(condition: torch.Tensor, reason: str) -> bool:
    """Whether the bool tensor `condition` holds; `reason` says what it means when it does not.

    Eagerly the value is read (the caller keeps the library's computation when False). Under
    torch.compile it is asserted on the device, so a failing call raises RuntimeError naming the
    reason: falling back there would need a graph break.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, f"pf.patch under torch.compile cannot fall back to the library's "
                                       f"computation for this call ({reason}): run it eagerly")
        return True
    return bool(condition)


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
        if mask.shape[dim] > 1 and mask.stride(dim) != 0 and not holds(
                (mask == row.expand_as(mask)).all(), "the mask differs between queries or heads"):
            raise NotPerKey("mask differs between queries or heads")
    row = row[:, 0, 0, :]
    # exp(value - row max) must be exactly 1 or 0: only 0 and the dtype's most negative values qualify.
    floor = torch.finfo(row.dtype).min / 2 if row.is_floating_point() else None
    keep = row == 0
    if floor is None or not holds(((row <= floor) | keep).all(),
                                  "the mask holds values other than 0 and a large negative number"):
        raise NotPerKey("mask holds values other than 0 and a large negative number")
    return keep.expand(batch, keys)


def settled_reason(reason: str | None, key_mask: torch.Tensor | None, batch: int, queries: int, keys: int,
                   causal: bool, process_group=None) -> str | None:
    """Why this call keeps the library's computation: `reason`, or, where there is none, a query with
    no key to attend; None: it runs fused.

    With a process_group the keys are this rank's shard and every rank takes part, whatever its own
    reason, in one all-reduce of each item's key count and of whether any rank has a reason, so that
    the ranks settle alike (and sharded modules raise rather than fall back).
    """
    if process_group is None:
        if reason is None and has_rows_without_keys(key_mask, queries, keys, causal):
            return "a query has no key to attend"
        return reason
    if causal:
        raise ValueError("pf.patch(process_group=...) shards non-causal input cross-attention only")
    where = collective_device(process_group)
    # The batch size first, in an all-gather of one size on every rank: an all-reduce of tensors of
    # different sizes aborts the process under gloo.
    batches = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(batches, torch.tensor([batch], device=where), group=process_group)
    batches = [int(b) for b in batches]
    if len(set(batches)) > 1:
        shown = ", ".join(f"rank {r}: {b}" for r, b in enumerate(batches))
        raise ValueError(f"pf.patch(process_group=...): the ranks of process_group disagree on the batch size "
                         f"({shown}); each rank passes its shard of the same batch's inputs")
    counts = (torch.full((batch,), keys, dtype=torch.int64) if key_mask is None
              else key_mask.sum(dim=1, dtype=torch.int64))
    status = torch.cat([counts.cpu(), torch.tensor([int(reason is not None)])]).to(where)
    dist.all_reduce(status, group=process_group)
    if reason is not None:
        return reason
    if status[-1]:
        return "another rank of the process group cannot run this call fused"
    return "a query has no key to attend" if bool((status[:-1] == 0).any()) else None


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
    return not holds(key_mask[:, :visible].any(dim=1).all(), "a query has no key to attend")
