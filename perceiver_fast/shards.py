"""What a call sharded over a process group knows of every rank: where its shard of the key axis lies.

With `process_group=`, the key side of an op (k, v and key_mask, or x and key_mask) is this rank's
contiguous shard of the key axis, shards in rank order, of any length (0 included); everything else
is the same on every rank. Every call first gathers, in one all-gather of a few integers, each
rank's shard length and a description of the call (dims, flags, dtype, and a checksum of the bits
of every replicated tensor), so that ranks that disagree all raise the same error instead of
exchanging tensors of different sizes (which would hang or corrupt).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardLayout:
    """This rank's place among the shards: `lengths[r]` keys on rank r of `group`."""

    group: dist.ProcessGroup
    rank: int
    lengths: tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def offset(self) -> int:
        return sum(self.lengths[:self.rank])

    @property
    def keys_after(self) -> int:
        """Keys of the ranks after this one: bottom-right causal alignment is on global positions."""
        return sum(self.lengths[self.rank + 1:])

    def describe(self) -> str:
        return f"sharded over {self.world} ranks ({self.offset}:{self.offset + self.lengths[self.rank]} of {self.total})"


def check_group(process_group) -> None:
    """A ProcessGroup of an initialized torch.distributed that this process belongs to."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (dist.group.WORLD or one from "
                        f"dist.new_group) or None, got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group does not include this process")


def bits_checksum(t: torch.Tensor | None) -> int:
    """A sum of the tensor's bit patterns (integers, so any two equal tensors give the same sum on
    any machine): cheap for the replicated tensors (queries, weights) that every rank must share."""
    if t is None:
        return -1
    t = t.detach().contiguous()
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return int(t.view(integer).sum(dtype=torch.int64))


def float_bits(value: float | None) -> int:
    return -1 if value is None else struct.unpack("<q", struct.pack("<d", value))[0]


def gather_layout(op: str, process_group, keys: int, description: dict[str, int], device: torch.device,
                  replicated: dict[str, torch.Tensor | None]) -> ShardLayout:
    """The layout of this call's shards, after checking that every rank describes the same call.

    description: name -> integer that must agree across ranks (dims, flags); replicated: name ->
    tensor that must be the same on every rank (compared by `bits_checksum`). Raises ValueError on
    every rank alike when they disagree.
    """
    check_group(process_group)
    names = list(description) + list(replicated)
    values = [keys, *description.values(), *(bits_checksum(t) for t in replicated.values())]
    # NCCL exchanges CUDA tensors only; gloo takes CPU tensors.
    where = device if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=where)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(every, mine, group=process_group)
    table = torch.stack(every).cpu().tolist()
    for column, name in enumerate(names, start=1):
        seen = [row[column] for row in table]
        if len(set(seen)) == 1:
            continue
        if name in replicated:
            raise ValueError(f"sharded {op}: {name} differs between the ranks of process_group; only the key side "
                             f"is sharded, {name} must be the same on every rank")
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
        raise ValueError(f"sharded {op}: the ranks of process_group disagree on {name} ({shown}); every rank "
                         f"must make the same call on its own shard of the key axis")
    return ShardLayout(group=process_group, rank=dist.get_rank(process_group), lengths=tuple(r[0] for r in table))
