"""`patch(model)`: swap the attention of an existing Perceiver model for the fused one, in place.

Each supported library has an adapter module declaring `SWAPS`: which of its classes get which
fast subclass. Patching changes only the class of those instances (and sets `pf_backend`), so
every parameter, buffer, hook and state_dict key stays as it was; `unpatch` changes them back.
An adapter is imported only when the model holds a module of its library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..arguments import check_flag
from ..dispatch import BACKEND_NAMES
from ..shards import check_group
from .registry import (LINEAR_ADAPTER, FastModule, Swap, bypass_reason, has_instance_forward, import_adapter,
                       library_of, log, original_class, swaps_of)

SUPPORTED = ("HF transformers Perceiver* models (transformers.models.perceiver), lucidrains perceiver-pytorch "
             "(Perceiver, PerceiverIO, PerceiverLM), krasserm perceiver-io (perceiver.model.core)")


@dataclass
class PatchReport:
    """Counts of the modules swapped (or restored), and of those left as they are, by class name."""

    replaced: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.replaced.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{count} x {name}" for name, count in sorted(self.replaced.items()))
        text = f"{self.total} modules: {parts}" if self.total else "no modules"
        if self.skipped:
            text += "; left as they are: " + ", ".join(f"{n} x {name}" for name, n in sorted(self.skipped.items()))
        return text


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, backend: str | None = None, process_group=None, linear: bool = True) -> PatchReport:
    """Swaps the attention modules of `model` (a whole model or any submodule of one) for fused ones,
    and (linear=True) its linear layers for pf.linear ones.

    backend: as in `perceiver_fast.cross_attention` (None: the best one for each call). Returns
    the counts replaced, by class. Raises TypeError when `model` holds no module this knows.
    Patching a patched model again only sets the backend and the process group.

    A module is left as it is, with a warning naming its path and the reason, where its forward
    was replaced on the instance, or where a submodule whose computation the fused forward takes
    over is wrapped: an instance forward (accelerate, PEFT-style wrappers), hooks, parametrized
    weights, or another class than the one whose parameters it reads (`registry.bypass_reason`).

    process_group: a torch.distributed ProcessGroup over which the model's input is sharded along
    its length M: each rank then passes its own shard of the already-embedded input (and of its
    padding mask), and the encoder's input cross-attention (HF PerceiverEncoder, lucidrains
    Perceiver and PerceiverIO, krasserm PerceiverEncoder) attends to every rank's shard;
    everything after it runs replicated. Wrapped in DistributedDataParallel over the same group,
    the model ends each backward with the gradients of the whole input (docs/distributed.md).

    linear: every nn.Linear inside a module of a supported library runs `pf.linear` (oneDNN GEMMs on
    packed weights on the CPU where they are faster than torch's, torch's own GEMM elsewhere), with
    the activation after it (GELU) and the residual add fused into it where the library's layer
    allows (docs/patching.md). The parameter objects stay, so an optimizer made before the patch
    keeps working. linear=False leaves every linear layer as it is; patching again with it does not
    undo an earlier linear=True (unpatch does).
    """
    _check_model(model)
    linear = check_flag("linear", linear)
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got {backend!r}")
    if process_group is not None:
        check_group(process_group)
    report = PatchReport()
    taken_over = set()  # the inner modules of the swaps met, patched or left with them; parents come first
    in_libraries = _inside_library_modules(model)
    linear_left: dict[tuple[str, str], list[str]] = {}  # (label, reason) -> paths: one warning for them all
    for name, module in model.named_modules():
        original = original_class(type(module))
        adapter = library_of(original)
        if adapter is None or id(module) in taken_over or (adapter == LINEAR_ADAPTER and id(module) not in in_libraries):
            continue
        swap = next((s for s in swaps_of(adapter)
                     if original is s.original and (linear or not s.linear) and s.applies(module)), None)
        if swap is None:
            continue
        if swap.inner is not None:  # left with its parent when that is left as it is: one unit, one warning
            taken_over.add(id(getattr(module, swap.inner)))
        label = swap.label or original.__name__
        reason = None if isinstance(module, FastModule) else _refusal_reason(module, swap)
        if reason is not None:
            if swap.linear:
                linear_left.setdefault((label, reason), []).append(name)
            else:
                log.warning("patch leaves %s as it is: %s", f"{name} ({label})" if name else label, reason)
            report.skipped[label] += 1
            continue
        module.__class__ = swap.fast
        module.pf_backend = backend
        module.pf_process_group = None
        report.replaced[label] += 1
    for (label, reason), names in linear_left.items():  # accelerate's hooks, say, are on every layer
        log.warning("patch leaves %d x %s as %s (%s): %s", len(names), label, "it is" if len(names) == 1 else "they are",
                    ", ".join(names), reason)
    if not report.total and not report.skipped:
        raise TypeError(f"patch found no attention module it knows in {type(model).__name__}; "
                        f"it supports {SUPPORTED}")
    if process_group is not None:
        _shard_input_attentions(model, process_group)
    log.info("patched %s", report)
    return report


def _inside_library_modules(model: nn.Module) -> set[int]:
    """ids of the modules inside (or themselves) a module of a Perceiver library: where linear layers are swapped."""
    inside = set()
    for module in model.modules():
        adapter = library_of(original_class(type(module)))
        if adapter is not None and adapter != LINEAR_ADAPTER and id(module) not in inside:
            inside.update(id(m) for m in module.modules())
    return inside


def _refusal_reason(module: nn.Module, swap: Swap) -> str | None:
    """Why `module` must keep the library's computation for good; None: it can be swapped."""
    if has_instance_forward(module):  # it holds the library's forward: the swapped class would never run
        return "its forward is replaced on the instance"
    return bypass_reason(module, swap.fast.pf_bypassed)


def _shard_input_attentions(model: nn.Module, process_group) -> None:
    """Hands the process group to the patched modules that attend to the model's input."""
    readers = [m for adapter in {library_of(original_class(type(m))) for m in model.modules()} - {None}
               for m in import_adapter(adapter).input_attentions(model)]
    unpatched = sorted({type(m).__name__ for m in readers if not isinstance(m, FastModule)})
    if unpatched:  # they would attend to this rank's shard alone
        raise TypeError(f"patch(process_group=...) left {', '.join(unpatched)} reading the model's input unpatched "
                        f"(see the warnings above): it cannot shard them")
    if not readers:
        raise TypeError(f"patch(process_group=...) found no input cross-attention in {type(model).__name__} to "
                        f"shard (it shards the encoders of {SUPPORTED})")
    for module in readers:
        module.pf_process_group = process_group


def unpatch(model: nn.Module) -> PatchReport:
    """Gives every patched module of `model` its original class back; returns the counts restored."""
    _check_model(model)
    report = PatchReport()
    for module in model.modules():
        if isinstance(module, FastModule):
            fast, original = type(module), original_class(type(module))
            swap = next(s for s in swaps_of(library_of(original)) if s.fast is fast)
            module.__class__ = original
            module.__dict__.pop("pf_backend", None)
            module.__dict__.pop("pf_process_group", None)
            report.replaced[swap.label or original.__name__] += 1
    return report


__all__ = ["patch", "unpatch", "PatchReport"]
