"""What a library adapter declares (which of its classes are swapped for which fast subclass), and the
table of the adapters by library."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger("perceiver_fast.patching")


@dataclass(frozen=True)
class Swap:
    """Instances of `original` (for which `applies` holds) get `fast`, a subclass overriding forward.

    `inner` names the submodule whose computation the fast forward takes over (a PreNorm's
    attention): it is left as it is. `label` names the swap in reports. `linear`: a swap of the
    linear layers (pf.linear, fused epilogues), made only with patch(linear=True).
    """

    original: type
    fast: type
    applies: Callable[[nn.Module], bool] = lambda module: True
    inner: str | None = None
    label: str | None = None
    linear: bool = False


# module-name prefix of a library's classes -> our adapter for it (a module of this package)
LIBRARIES = {
    "transformers.models.perceiver": "hf",
    "perceiver_pytorch": "lucidrains",
    "perceiver.model.core": "krasserm",
    "torch.nn.modules.linear": "linear_layers",  # nn.Linear, swapped only inside the libraries' modules
}
LINEAR_ADAPTER = "linear_layers"


def library_of(cls: type) -> str | None:
    for prefix, adapter in LIBRARIES.items():
        if cls.__module__.startswith(prefix):
            return adapter
    return None


def import_adapter(adapter: str):
    """An adapter module, imported only when a model holds a module of its library. It declares SWAPS
    and `input_attentions(model)`: the modules of model that attend to its input (the ones
    patch(process_group=) shards)."""
    return importlib.import_module(f"{__package__}.{adapter}")


def swaps_of(adapter: str):
    return import_adapter(adapter).SWAPS


class FastModule:
    """Mixin of every fast subclass. Patching changes only an instance's class and sets `pf_backend`,
    so parameters, buffers, hooks and state_dict keys stay as they were.

    A fast subclass carries its original's name (`type(m).__name__`, repr, HF's
    config.architectures see the model they stand for); pickle and deepcopy, which would look the
    class up by that name, find it from the original class instead.
    """

    pf_backend: str | None = None
    pf_process_group = None  # set by patch(process_group=) on the modules that read the model's input
    # The submodules whose forward the fused one bypasses, with the classes it reads (see bypass_reason).
    pf_bypassed: ClassVar[Mapping[str, type | tuple[type, ...] | None]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = original_class(cls)
        if original is not object:  # not a mixin of several fast classes
            cls.__name__, cls.__qualname__ = original.__name__, original.__qualname__

    def __reduce_ex__(self, protocol):
        _, _, *state = super().__reduce_ex__(protocol)
        return (fast_instance_of, (original_class(type(self)),), *state)

    def pf_keep_original(self, reason: str) -> None:
        # Called right before a forward falls back to the library's own computation, which would
        # attend to this rank's shard alone when the input is sharded: that must not run.
        if self.pf_process_group is not None:
            raise RuntimeError(f"patched {type(self).__name__} reads an input sharded over a process group and "
                               f"cannot fall back to the library's attention for this call ({reason})")
        log.debug("patched %s keeps the original computation: %s", type(self).__name__, reason)


def original_class(cls: type) -> type:
    """The library class a (possibly fast) class stands for: the first in its MRO that is not ours."""
    return next(c for c in cls.__mro__ if not issubclass(c, FastModule))


def fast_class_of(original: type) -> type:
    return next(swap.fast for swap in swaps_of(library_of(original)) if swap.original is original)


def fast_instance_of(original: type):
    """An empty instance of the fast class standing for `original`, for pickle to fill in."""
    fast = fast_class_of(original)
    return fast.__new__(fast)


def attention_dropout(module: nn.Module, dropout: nn.Module | float | None) -> float:
    """The attention dropout probability of the module's call, fused into the kernels: its
    configured p in training, 0 in eval."""
    p = dropout.p if isinstance(dropout, nn.Dropout) else (dropout or 0.0)
    return float(p) if module.training else 0.0


_devices_logged: set[str] = set()


def device_reason(tensor) -> str | None:
    """A device for which no backend with kernels of its own is installed (mps, xpu, or the CPU
    without the extension): the library's own computation runs there, as before patching, and the
    first such call on each kind of device says so in one log line."""
    from ..dispatch import fused_device

    device_type = tensor.device.type
    if fused_device(device_type):
        return None
    reason = f"no fused backend runs on {device_type}"
    if device_type not in _devices_logged:
        _devices_logged.add(device_type)
        log.info("pf.patch: %s; the patched modules run the library's own computation there", reason)
    return reason


def dropout_reason(module: "FastModule", dropout_p: float) -> str | None:
    """Attention dropout runs fused, but not over an input sharded across processes."""
    if dropout_p and module.pf_process_group is not None:
        return f"attention dropout p={dropout_p} in training over an input sharded across processes"
    return None


# The hooks torch runs around a module's call (by attribute), which a fused op reading the module's parameters skips.
HOOK_DICTS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
              "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


def has_instance_forward(module: nn.Module) -> bool:
    """Whether `module.forward` was set on the instance (accelerate's add_hook_to_module, PEFT-style
    wrappers, monkeypatches): calling the module runs that, whatever its class's forward is."""
    return "forward" in module.__dict__


def wrapper_of(module: nn.Module) -> str | None:
    """What runs around or instead of the module's own computation when it is called, in words; None: nothing.

    Global hooks (register_module_forward_hook) do not count: process-wide observers register them
    for the span of a measurement (ModuleTracker, FlopCounterMode's), and counting them would unfuse
    the model being measured."""
    if has_instance_forward(module):
        return "has its forward replaced on the instance"
    hooks = [words for name, words in HOOK_DICTS.items() if getattr(module, name, None)]
    if hooks:  # weight_norm, spectral_norm and pruning compute the weight in a forward pre-hook
        return "has " + " and ".join(hooks)
    if parametrize.is_parametrized(module):
        return "has parametrized weights"
    return None


def bypass_reason(module: nn.Module, bypassed: Mapping[str, type | tuple[type, ...] | None]) -> str | None:
    """Why the fused forward cannot stand in for the library's on `module`; None: it can.

    `bypassed` names (as dotted attribute paths) the submodules whose forward the fused one
    replaces, by reading their parameters or doing their computation itself, each with the classes
    it reads (None: any). Such a submodule that is wrapped (`wrapper_of`), or of another class (a
    LoRA or quantised layer in place of an nn.Linear), would be skipped. patch() leaves a module
    for which this gives a reason as it is; a patched forward checks it on each call too, for
    wrappers added since."""
    for path, classes in bypassed.items():
        submodule = _submodule(module, path)
        if submodule is None:
            continue
        wrapper = wrapper_of(submodule)
        if wrapper is not None:
            return f"{path} {wrapper}"
        if classes is not None and original_class(type(submodule)) not in _as_tuple(classes):
            cls = type(submodule)
            wanted = " or ".join(f"{c.__module__}.{c.__qualname__}" for c in _as_tuple(classes))
            return f"{path} is a {cls.__module__}.{cls.__qualname__}, not a {wanted}"
    return None


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _as_tuple(classes: type | tuple[type, ...]) -> tuple[type, ...]:
    return classes if isinstance(classes, tuple) else (classes,)
