"""What a call sharded over a process group knows of every rank: where its shard of the key axis lies.

With `process_group=`, the key side of an op (k, v and key_mask, or x and key_mask) is this rank's
contiguous shard of the key axis, shards in rank order, of any length (0 included); everything else
is the same on every rank. Before any tensor moves, the ranks agree on the call (`agree`), in two
all-gathers whose sizes are the same on every rank whatever each rank called:

1. a header of fixed size: which op the rank called, whether it could make the call (its own
   checks passed) and how many values follow. Every rank raises ValueError when the ops differ,
   when a rank could not make the call, or when the counts differ;
2. then, only where the headers match, the values: the rank's shard length, the dims and flags of
   the call, and a checksum of the bits of every replicated tensor. Every rank raises ValueError
   naming what differs and what each rank had.

Ranks that disagree thus all raise the same error instead of exchanging tensors of different
sizes (which aborts the process under gloo, or hangs or corrupts).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

NAME_BYTES = 32  # an op's name, or a str or dtype value, travels as NAME_BYTES // 8 int64
NONE_BITS = -1  # a float value None (a NaN pattern, so never a finite float's bits)


@dataclass(frozen=True)
class ShardLayout:
    """This rank's place among the shards of a call of `op`: `lengths[r]` keys on rank r of `group`."""

    op: str
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


def bits_checksum(t: torch.Tensor | None) -> torch.Tensor:
    """A sum of the tensor's bit patterns (integers, so any two equal tensors give the same sum on
    any machine), on its device: cheap for the replicated tensors (queries, weights) that every rank
    must share. -1 for None."""
    if t is None:
        return torch.tensor(-1)
    t = t.detach().contiguous()
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(integer).sum(dtype=torch.int64)


def float_bits(value: float | None) -> int:
    return NONE_BITS if value is None else struct.unpack("<q", struct.pack("<d", value))[0]


def collective_device(process_group, device: torch.device | None = None) -> torch.device:
    """Where the tensors of a collective over process_group live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(process_group) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _name_words(name: str) -> list[int]:
    raw = name.encode()
    if len(raw) > NAME_BYTES:
        raise ValueError(f"{name!r} is longer than the {NAME_BYTES} bytes the ranks' agreement has for a name")
    return list(struct.unpack(f"<{NAME_BYTES // 8}q", raw.ljust(NAME_BYTES, b"\0")))


def _name(words: list[int]) -> str:
    return struct.pack(f"<{NAME_BYTES // 8}q", *words).rstrip(b"\0").decode(errors="replace")


def _words(value) -> list[int]:
    """A value every rank must share, as the int64 it travels as: as many for every value of a type, so
    that ranks making the same call send the same number."""
    if isinstance(value, torch.dtype):
        return _name_words(str(value).removeprefix("torch."))
    if isinstance(value, str):
        return _name_words(value)
    if value is None or isinstance(value, float):
        return [float_bits(value)]
    if isinstance(value, int):  # bool included
        return [int(value)]
    raise TypeError(f"the ranks' agreement sends ints, floats, None, str and dtypes, got {type(value).__name__}")


def _shown(mine, words: list[int]) -> str:
    """Another rank's value, from its words, of the argument whose value here is `mine` (ranks making
    the same call pass values of the same types)."""
    if isinstance(mine, (str, torch.dtype)):
        return _name(words)
    if mine is None or isinstance(mine, float):
        return "None" if words[0] == NONE_BITS else repr(struct.unpack("<d", struct.pack("<q", words[0]))[0])
    return str(bool(words[0])) if isinstance(mine, bool) else str(words[0])


def _by_rank(values) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _gathered(mine: torch.Tensor, process_group) -> list[list[int]]:
    """Every rank's `mine` (of one size on every rank), in rank order, as integers on the host."""
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(every, mine, group=process_group)
    return torch.stack(every).cpu().tolist()  # one device-to-host copy for every check


def agree(op: str, process_group, values: dict[str, object] | None, *, keys: int = 0,
          replicated: dict[str, torch.Tensor | None] | None = None,
          device: torch.device | None = None) -> tuple[int, ...] | None:
    """Checks that every rank of process_group makes the same call of `op` (the module's docstring:
    op first, then the values); returns every rank's `keys` (its shard length, free to differ), in
    rank order. values: what every rank must share, by name (ints, bools, floats, None, str,
    dtypes); replicated: tensors, by name, that must be the same on every rank. values None: this
    rank could not make the call (it raises its own error); the others raise saying which rank.
    Raises ValueError alike on every rank when they disagree."""
    where = collective_device(process_group, device)
    replicated = replicated or {}
    columns = [] if values is None else [(name, value, _words(value)) for name, value in values.items()]
    count = 1 + sum(len(words) for _, _, words in columns) + len(replicated)
    header = torch.tensor([*_name_words(op), int(values is None), count], dtype=torch.int64, device=where)
    headers = _gathered(header, process_group)
    ops = [_name(row[:-2]) for row in headers]
    if len(set(ops)) > 1:
        raise ValueError(f"sharded {op}: the ranks of process_group called different ops ({_by_rank(ops)}); every "
                         f"rank must make the same call, each on its own shard of the key axis")
    if values is None:
        return None
    rejected = [r for r, row in enumerate(headers) if row[-2]]
    if rejected:
        raise ValueError(f"sharded {op}: rank{'s' if len(rejected) > 1 else ''} {', '.join(map(str, rejected))} of "
                         f"process_group could not make the call (see the error raised there); no rank ran it")
    counts = [row[-1] for row in headers]
    if len(set(counts)) > 1:  # ranks out of step, or on different versions of this library
        raise ValueError(f"sharded {op}: the ranks of process_group sent different numbers of values to agree on "
                         f"({_by_rank(counts)}): they are at different steps of the call")
    words = [keys] + [word for _, _, column in columns for word in column]
    checksums = [bits_checksum(t).to(where) for t in replicated.values()]
    body = torch.tensor(words, dtype=torch.int64, device=where)
    table = _gathered(torch.cat([body, torch.stack(checksums)]) if checksums else body, process_group)
    start = 1
    for name, value, column in columns:
        seen = [row[start:start + len(column)] for row in table]
        if any(s != column for s in seen):
            raise ValueError(f"sharded {op}: the ranks of process_group disagree on {name} "
                             f"({_by_rank(_shown(value, s) for s in seen)}); every rank must make the same call "
                             f"on its own shard of the key axis")
        start += len(column)
    for index, name in enumerate(replicated, start=start):
        if len({row[index] for row in table}) > 1:
            raise ValueError(f"sharded {op}: {name} differs between the ranks of process_group; only the key side "
                             f"is sharded, {name} must be the same on every rank")
    return tuple(row[0] for row in table)


class ShardedCall:
    """The agreement step of one sharded call's validation, which every rank reaches exactly once:

        with ShardedCall(op, group) as call:
            ...local checks, which raise...
            layout = call.layout(keys, values, replicated, device)

    A rank whose local checks raise still takes part (as having rejected the call) before its error
    propagates, so that the others raise too instead of waiting for it."""

    def __init__(self, op: str, process_group):
        check_group(process_group)
        self.op, self.group = op, process_group
        self.done = False

    def __enter__(self) -> "ShardedCall":
        return self

    def layout(self, keys: int, values: dict[str, object], replicated: dict[str, torch.Tensor | None],
               device: torch.device) -> ShardLayout:
        """This rank's layout, once every rank agrees (see `agree`)."""
        self.done = True
        lengths = agree(self.op, self.group, values, keys=keys, replicated=replicated, device=device)
        return ShardLayout(op=self.op, group=self.group, rank=dist.get_rank(self.group), lengths=lengths)

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, Exception) and not self.done:
            self.done = True
            agree(self.op, self.group, None)
        return False
