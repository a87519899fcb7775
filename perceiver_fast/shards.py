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


def bits_checksum(t: torch.Tensor | None) -> torch.Tensor | int:
    """A sum of the tensor's bit patterns (integers, so any two equal tensors give the same sum on
    any machine), on its device: cheap for the replicated tensors (queries, weights) that every rank
    must share. -1 for None."""
    if t is None:
        return -1
    t = t.detach().contiguous()
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(integer).sum(dtype=torch.int64)


def float_bits(value: float | None) -> int:
    return -1 if value is None else struct.unpack("<q", struct.pack("<d", value))[0]


def collective_device(process_group, device: torch.device | None = None) -> torch.device:
    """Where the tensors of a collective over process_group live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(process_group) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def agree(op: str, process_group, names: list[str], values: list | None, device: torch.device | None = None,
          replicated: tuple[str, ...] = ()) -> list[list[int]]:
    """Every rank's values (integers, or 0-d integer tensors), in rank order, after checking that the
    ranks agree on every column but the first. values None: this rank rejected the call already (it
    raises its own error); the others raise ValueError saying which rank. names[i] names values[i]
    (the first column, free to differ, is not checked); those in `replicated` name a checksum of a
    tensor that must be the same on every rank. Raises alike on every rank when they disagree."""
    where = collective_device(process_group, device)
    if values is None:
        mine = torch.zeros(len(names) + 1, dtype=torch.int64, device=where)
        mine[0] = 1
    else:
        mine = torch.stack([torch.zeros((), dtype=torch.int64, device=where)] + [
            torch.as_tensor(v, dtype=torch.int64).to(where) for v in values])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(every, mine, group=process_group)
    table = torch.stack(every).cpu().tolist()  # one device-to-host copy for every check
    rejected = [r for r, row in enumerate(table) if row[0]]
    if values is None:
        return table
    if rejected:
        raise ValueError(f"sharded {op}: rank{'s' if len(rejected) > 1 else ''} {', '.join(map(str, rejected))} of "
                         f"process_group could not make the call (see the error raised there); no rank ran it")
    for column, name in enumerate(names[1:], start=2):
        seen = [row[column] for row in table]
        if len(set(seen)) == 1:
            continue
        if name in replicated:
            raise ValueError(f"sharded {op}: {name} differs between the ranks of process_group; only the key side "
                             f"is sharded, {name} must be the same on every rank")
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
        raise ValueError(f"sharded {op}: the ranks of process_group disagree on {name} ({shown}); every rank "
                         f"must make the same call on its own shard of the key axis")
    return [row[1:] for row in table]


class ShardedCall:
    """The agreement step of one sharded call's validation, which every rank reaches exactly once:

        with ShardedCall(op, group, names, replicated) as call:
            ...local checks, which raise TypeError or ValueError...
            layout = call.layout(keys, values, device, tensors)

    A rank whose local checks raise still takes part (as having rejected the call) before its error
    propagates, so that the others raise too instead of waiting for it. names: those of `values`
    (dims and flags that every rank must share); replicated: the names of `tensors`."""

    def __init__(self, op: str, process_group, names: tuple[str, ...], replicated: tuple[str, ...]):
        check_group(process_group)
        self.op, self.group, self.names, self.replicated = op, process_group, names, replicated
        self.done = False

    def __enter__(self) -> "ShardedCall":
        return self

    def layout(self, keys: int, values: list[int], device: torch.device,
               tensors: list[torch.Tensor | None]) -> ShardLayout:
        self.done = True
        table = agree(self.op, self.group, ["keys", *self.names, *self.replicated],
                      [keys, *values, *(bits_checksum(t) for t in tensors)], device, self.replicated)
        return ShardLayout(group=self.group, rank=dist.get_rank(self.group), lengths=tuple(row[0] for row in table))

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not self.done and isinstance(error, (TypeError, ValueError)):
            self.done = True
            agree(self.op, self.group, ["keys", *self.names, *self.replicated], None)
        return False
