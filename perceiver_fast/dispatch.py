"""Backend dispatch, the same for every op.

Auto dispatch walks BACKENDS in priority order (fastest first) and takes the first that accepts
the problem, preferring one that runs it fused; an explicitly named backend that cannot run it
raises BackendUnsupportedError listing every reason. While `torch.onnx.export` traces a model, every
call runs on the "onnx" backend, whatever was asked: an ONNX file holds standard operators only. Everything here reads shapes, dtypes,
devices and settings fixed at import, so torch.compile traces it without a graph break.
"""

from __future__ import annotations

import torch
from torch.onnx._internal.exporter import _flags as _onnx_flags

from .arguments import type_name
from .backends import Backend, CpuBackend, CudaBackend, OnnxExportBackend, ReferenceBackend, TritonBackend
from .ops import kernel_table
from .shards import agree
from .validation import Problem

# Auto dispatch's priority order. The onnx backend is not in it: it runs when named, and under ONNX export.
BACKENDS: tuple[Backend, ...] = (TritonBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())
ONNX_EXPORT_BACKEND = OnnxExportBackend()
BACKEND_NAMES = tuple(b.name for b in BACKENDS) + (ONNX_EXPORT_BACKEND.name,)


class BackendUnsupportedError(ValueError):
    """No backend (or not the requested one) can run these inputs; the message says why."""


def get_backend(name) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type_name(name)}")
    for backend in BACKENDS + (ONNX_EXPORT_BACKEND,):
        if backend.name == name:
            return backend
    raise ValueError(f"backend must be None, 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")


def fused_device(device_type: str) -> bool:
    """Whether a backend with kernels of its own (not the reference, which is plain torch) is installed
    for this kind of device."""
    return any(not b.unavailable and b.name != "reference" and device_type in b.capabilities.devices
               for b in BACKENDS)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing the caller. torch.onnx.is_in_onnx_export() says so, except
    under dynamo, which folds it to False: the dynamo exporter's strict capture reads the flag it sets."""
    return torch.onnx.is_in_onnx_export() or getattr(_onnx_flags, "_is_onnx_exporting", False)


def select_backend(problem: Problem, requested: str | None) -> Backend:
    """The backend that runs `problem`: the one named, or under auto (None or "auto") the first in
    priority order that runs it fused, else the first that runs it at all; "onnx" under ONNX export."""
    exporting = onnx_exporting()
    if exporting or (requested is not None and requested != "auto"):
        backend = ONNX_EXPORT_BACKEND if exporting else get_backend(requested)
        reasons = backend.refusals(problem, explicit=True)
        if reasons:
            during = (" under torch.onnx.export, which runs every op as standard ONNX operators (export the model "
                      "in eval mode, unsharded)") if exporting else ""
            raise BackendUnsupportedError(f"backend {backend.name!r} cannot run {problem.describe()}{during}: "
                                          + "; ".join(reasons))
        return backend
    accepting, refused = [], []
    for backend in BACKENDS:
        reasons = backend.refusals(problem, explicit=False)
        if reasons:
            refused.append(f"{backend.name}: {'; '.join(reasons)}")
        elif backend.unfused_reason(problem) is None:
            return backend
        else:
            accepting.append(backend)
    if accepting:
        return accepting[0]
    raise BackendUnsupportedError(f"no backend can run {problem.describe()}:\n  " + "\n  ".join(refused))


def higher_order_gradients_error(op: str, kernel: str, sharded: bool = False) -> BackendUnsupportedError:
    """The error of a backward through the registered op `op` on `kernel`'s backend that would be
    recorded for higher-order gradients (ops/kernel_table.py: refuse_higher_order_gradients), naming
    the backends whose capabilities declare them. sharded: a call of the public op `op` with a
    process_group, which has them on no backend."""
    if sharded:
        return BackendUnsupportedError(
            f"higher-order gradients (a backward with create_graph=True) are not supported for {op} with a "
            f"process_group, on any backend ({kernel!r} here): the sharded backward merges the ranks' gradients "
            f"outside autograd. Differentiate gradients of unsharded calls (backend='reference')")
    able = [b.name for b in BACKENDS if b.capabilities.double_backward]
    return BackendUnsupportedError(
        f"higher-order gradients (a backward with create_graph=True) are not supported on backend {kernel!r}: "
        f"the backward op it runs, perceiver_fast::{op}_backward, is not differentiable. Backends that support "
        f"them: {', '.join(map(repr, able))}; pass {' or '.join(f'backend={name!r}' for name in able)} to the call "
        f"whose gradient you differentiate (and no process_group: a sharded call has them on no backend)")


kernel_table.higher_order_gradients_error = higher_order_gradients_error


@torch.compiler.disable
def run_sharded(validate, backend: str | None, *args, **kwargs):
    """(out, lse) of validate(*args, **kwargs), a call with a process_group, on its backend. It runs
    eagerly under torch.compile: the ranks' agreement check and the merge are collectives on values
    known only at run time."""
    problem = validate(*args, **kwargs)
    chosen = refusal = None
    try:
        chosen = select_backend(problem, backend)
    except (TypeError, ValueError) as error:  # BackendUnsupportedError or a bad name: raised after the others hear
        refusal = error
    # Ranks on different backends, or one fused and one composed, would make different collectives.
    choice = None if refusal else {"backend": chosen.name,
                                   "whether the backend runs it fused": chosen.unfused_reason(problem) is None}
    agree(problem.shards.op, problem.shards.group, choice, device=problem.device)
    if refusal is not None:
        raise refusal
    with torch.autocast(problem.device.type, enabled=False):  # validation fixed the compute dtype
        return chosen.run(problem)


def refusals_by_backend(problem: Problem) -> dict[str, list[str]]:
    """For each backend in priority order, why auto dispatch would not run `problem` on it; where it
    would, nothing, or lines starting "runs " that say how: "runs unfused: ..." where it would run
    an input attention composed, not fused, and the backend's own notes (the cpu backend's float32
    precision)."""
    verdicts = {}
    for backend in BACKENDS:
        reasons = backend.refusals(problem, explicit=False)
        unfused = backend.unfused_reason(problem)
        verdicts[backend.name] = reasons or ([f"runs unfused: {unfused}"] if unfused else []) + backend.notes(problem)
    return verdicts
