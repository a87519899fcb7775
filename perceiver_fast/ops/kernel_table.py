"""The kernel families an op can run: each backend registers its kernels' functions under its name,
and the op's implementation looks up the one its `kernel` argument names."""

from __future__ import annotations

from typing import Callable


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
