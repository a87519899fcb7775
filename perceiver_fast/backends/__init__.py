"""Backend registry and dispatch.

Auto dispatch walks BACKENDS in priority order (fastest first) and takes the first
that accepts the problem; an explicitly named backend that cannot run it raises
BackendUnsupportedError listing every reason.
"""

from __future__ import annotations

from ..validation import Problem
from .base import Backend, Capabilities
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS: tuple[Backend, ...] = (TritonBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())
BACKEND_NAMES = tuple(b.name for b in BACKENDS)


class BackendUnsupportedError(ValueError):
    """No backend (or not the requested one) can run these inputs; the message says why."""


def get_backend(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"backend must be None, 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")


def select_backend(problem: Problem, requested: str | None) -> Backend:
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be a str or None, got {type(requested).__name__}")
    if requested not in (None, "auto"):
        backend = get_backend(requested)
        reasons = backend.refusals(problem, explicit=True)
        if reasons:
            raise BackendUnsupportedError(f"backend {backend.name!r} cannot run {problem.describe()}: "
                                          + "; ".join(reasons))
        return backend
    refused = []
    for backend in BACKENDS:
        reasons = backend.refusals(problem, explicit=False)
        if not reasons:
            return backend
        refused.append(f"{backend.name}: {'; '.join(reasons)}")
    raise BackendUnsupportedError(f"no backend can run {problem.describe()}:\n  " + "\n  ".join(refused))


def refusals_by_backend(problem: Problem) -> dict[str, list[str]]:
    """For each backend, the reasons it would refuse `problem` under auto dispatch (empty: it accepts)."""
    return {backend.name: backend.refusals(problem, explicit=False) for backend in BACKENDS}


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "BackendUnsupportedError", "Capabilities",
           "get_backend", "refusals_by_backend", "select_backend"]
