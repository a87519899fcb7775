"""Checks shared by the drop-in tests: a patched float32 model against the original in float64
(outputs and every parameter's gradient, in training with attention dropout too), and that a forward
forms no N x M tensor."""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import perceiver_fast as pf

FP32_TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """Frobenius relative error; `floor` stands in for a reference norm that is (mathematically) zero."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / max(float(want.norm()), floor, 1e-300))


def _outputs(result) -> list[torch.Tensor]:
    """The floating-point tensors of a model's result (a tensor, tuple, ModelOutput or dataclass)."""
    if hasattr(result, "to_tuple"):
        result = result.to_tuple()
    elif hasattr(result, "__dataclass_fields__"):
        result = [getattr(result, name) for name in result.__dataclass_fields__]
    leaves, _ = tree_flatten(result)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _as(dtype: torch.dtype, args: tuple) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class SameMaskDropout(torch.nn.Module):
    """An unpatched model's attention dropout drawing the library's mask (pf.attention_dropout_mask)
    instead of nn.Dropout's: from the same generator state it drops what a patched model's kernels
    drop, call after call. The scores' leading dims (B, H), or (B * H) for lucidrains, flatten to
    the mask's b * H + h."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, probs):
        if not self.training or self.p == 0:
            return probs
        *lead, queries, keys = probs.shape
        keep = pf.attention_dropout_mask(1, math.prod(lead), queries, keys, self.p, backend="reference")
        return probs * keep.view(probs.shape).to(probs.dtype) / (1 - self.p)


def with_same_mask_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """model with each module's `dropout` attribute (the attention dropout of HF, lucidrains and
    krasserm attention) made a SameMaskDropout of its p. Configs under test keep every other
    dropout at 0, so that the attention calls are the only draws from the generator."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout = SameMaskDropout(module.dropout.p).train(module.dropout.training)
    return model


def check_patched_model(model: torch.nn.Module, run: Callable, *inputs,
                        patch_target: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                        backend: str | None = None, falls_back: bool = False) -> pf.PatchReport:
    """Patches a float32 copy of `model` (or the submodule `patch_target` picks) and runs it against
    the unpatched model in float64, `run(model, *inputs)` on the same inputs (floating ones cast).
    Compares every output, and every parameter gradient of a random projection of the outputs.
    `falls_back`: whether some patched module is expected to keep the library's computation. A
    model in training runs its attention dropout: the reference's with the library's masks
    (SameMaskDropout), both runs from the same generator state."""
    reference = with_same_mask_dropout(copy.deepcopy(model).double())
    fast = copy.deepcopy(model).float()
    report = pf.patch(patch_target(fast), backend=backend)
    assert report.total > 0

    seed = torch.seed()
    want = _outputs(run(reference, *_as(torch.float64, inputs)))
    torch.manual_seed(seed)
    with FallbackLog() as fallbacks:
        got = _outputs(run(fast, *_as(torch.float32, inputs)))
    assert bool(fallbacks.reasons) == falls_back, fallbacks.reasons
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert relative_error(g, w) <= FP32_TOLERANCE, f"output error {relative_error(g, w):.2e}"

    weights = [torch.randn(w.shape, dtype=torch.float64) for w in want]
    sum((w * t).sum() for w, t in zip(weights, want)).backward()
    sum((w.float() * t).sum() for w, t in zip(weights, got)).backward()
    want_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    got_grads = {name: p.grad for name, p in fast.named_parameters() if p.grad is not None}
    assert got_grads.keys() == want_grads.keys() and got_grads
    # Some gradients are zero in exact arithmetic (a key bias only shifts a softmax row): those
    # are judged against 1e-3 of the norm of all gradients.
    floor = 1e-3 * float(torch.cat([g.flatten() for g in want_grads.values()]).norm())
    for name, want_grad in want_grads.items():
        err = relative_error(got_grads[name], want_grad, floor)
        assert err <= FP32_TOLERANCE, f"gradient of {name}: error {err:.2e}, norm {float(want_grad.norm()):.2e} of all {floor*1e3:.2e}"
    return report


def check_falls_back(model: torch.nn.Module, run: Callable, *inputs) -> list[str]:
    """A patched copy of `model` keeps the library's computation for `run(model, *inputs)`: the same
    result from the same random state, and a logged reason. Returns the reasons."""
    fast = copy.deepcopy(model)
    pf.patch(fast)
    seed = torch.seed()
    want = _outputs(run(model, *inputs))
    torch.manual_seed(seed)
    with FallbackLog() as fallbacks:
        got = _outputs(run(fast, *inputs))
    assert fallbacks.reasons
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= 1e-6
    return fallbacks.reasons


def replace_forward(module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Sets module.forward on the instance as accelerate's add_hook_to_module does (the class's forward
    kept as _old_forward, the hook as _hf_hook), to one returning change(the original output). A
    plain monkeypatch sets the same attribute. Survives deepcopy and .double()."""
    module._hf_hook = change
    module._old_forward = module.forward
    module.forward = functools.partial(_changed_forward, module)


def _changed_forward(module, *args, **kwargs):
    output = module._old_forward(*args, **kwargs)
    if isinstance(output, dict):  # a krasserm ModuleOutput
        return type(output)(output, last_hidden_state=module._hf_hook(output["last_hidden_state"]))
    return module._hf_hook(output)


class LoraLinear(torch.nn.Module):
    """PEFT's LoRA layer in miniature: it takes an nn.Linear's place, adds a low-rank update to its
    output, and shows the base layer's weight and bias as its own, as PEFT's layers do."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class Doubled(torch.nn.Module):
    """A parametrization: the weight used is twice the one stored."""

    def forward(self, weight):
        return 2 * weight


def check_wrapped_left_as_is(model: torch.nn.Module, run: Callable, *inputs, unit: str,
                             wrap: Callable[[torch.nn.Module], None], warning: str, caplog,
                             linear_left: str | None = None) -> None:
    """`wrap(model)` wraps a submodule whose computation the fused forward of the module at `unit`
    would take over, in a way that changes the output. pf.patch then leaves `unit` as it is with
    the one warning `warning` (and, where the wrapped submodule is a linear layer that cannot be
    swapped either, the warning `linear_left` for it), and the patched model computes what the
    wrapped, unpatched one does."""
    wrapped = copy.deepcopy(model)
    wrap(wrapped)
    fast = copy.deepcopy(wrapped)
    caplog.set_level(logging.WARNING, logger="perceiver_fast.patching")
    caplog.clear()
    report = pf.patch(fast)
    expected = [warning] + ([linear_left] if linear_left else [])
    assert sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == sorted(expected)
    assert sum(report.skipped.values()) == len(expected)
    assert type(fast.get_submodule(unit)) is type(model.get_submodule(unit))
    with FallbackLog() as fallbacks:
        got = _outputs(run(fast, *inputs))
    assert not fallbacks.reasons  # the other modules run fused
    want, unwrapped = _outputs(run(wrapped, *inputs)), _outputs(run(model, *inputs))
    for g, w, u in zip(got, want, unwrapped, strict=True):
        assert relative_error(g, w) <= 1e-5
        assert relative_error(u, w) >= 1e-3, "the wrapper must change the output for the check to tell"


def linear_left_warning(path: str, left: bool) -> str | None:
    """patch's warning for the linear layer at `path` whose forward is replaced on the instance (it
    is left unswapped: the swapped forward would never run); None where it is not left."""
    return f"patch leaves 1 x Linear as it is ({path}): its forward is replaced on the instance" if left else None


class FallbackLog(logging.Handler):
    """Collects the reasons patched modules give for keeping the library's computation."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons = []

    def emit(self, record):
        self.reasons.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("perceiver_fast.patching")
        self.level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("perceiver_fast.patching")
        logger.removeHandler(self)
        logger.setLevel(self.level)


class LargestNewTensor(TorchDispatchMode):
    """Records the largest storage (bytes) behind any tensor an operation produces while active.

    Views count by the storage they share, so a stride-0 expansion costs what it really costs;
    views of the tensors in `besides` (inputs the caller already holds) do not count.
    """

    def __init__(self, besides=()):
        super().__init__()
        self.largest = 0
        self.op = None
        self.held = {t.untyped_storage().data_ptr() for t in besides}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.held:
                size = t.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.op = size, str(func)
        return result


def largest_tensor_in(fn: Callable, *args, besides=(), **kwargs) -> tuple[int, str]:
    """(bytes, op) of the largest storage produced while running fn(*args, **kwargs), views of the
    tensors in `besides` not counted."""
    with LargestNewTensor(besides) as probe:
        fn(*args, **kwargs)
    return probe.largest, probe.op
