"""The kernel families an op can run: each backend registers its kernels' functions under its name,
and the op's implementation looks up the one its `kernel` argument names. Also what every op's
autograd formula does first: refuse higher-order gradients, which no kernel family has."""

from __future__ import annotations

from typing import Callable

import torch


class KernelTable:
    def __init__(self, op: str):
        self.op = op
        self._forward: dict[str, Callable] = {}
        self._backward: dict[str, Callable] = {}

    def register(self, kernel: str, forward: Callable, backward: Callable | None = None) -> None:
        """`forward` and `backward` take the op's (and its backward op's) arguments less `kernel`."""
        self._forward[kernel] = forward
        if backward is not None:
            self._backward[kernel] = backward

    def forward(self, kernel: str) -> Callable:
        if kernel not in self._forward:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, self._forward))} for the {self.op}, "
                             f"got {kernel!r}")
        return self._forward[kernel]

    def backward(self, kernel: str) -> Callable:
        if kernel not in self._backward:
            raise ValueError(f"kernel {kernel!r} has no backward of the {self.op} (kernels with one: "
                             f"{', '.join(map(repr, self._backward))})")
        return self._backward[kernel]


# (op, kernel, sharded) -> the error of a backward on that kernel recorded for higher-order gradients.
# It names the backends that have them, which only dispatch (a layer above) knows: dispatch sets it
# at import.
higher_order_gradients_error: Callable[[str, str, bool], Exception]


def refuse_higher_order_gradients(op: str, kernel: str, sharded: bool = False) -> None:
    """Called first in the ops' autograd formulas (and the sharded op's, with sharded=True). With
    create_graph=True autograd records the backward for differentiation, but the backward ops have
    no autograd formula: torch would fail only at the next backward, naming neither the backend nor
    one that has higher-order gradients. Raise now instead."""
    if torch.is_grad_enabled():
        raise higher_order_gradients_error(op, kernel, sharded)
