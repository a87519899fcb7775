"""The linear layers of a patched Perceiver (`pf.patch(model, linear=True)`, the default): every
`nn.Linear` inside a module of a supported library runs `pf.linear` (oneDNN GEMMs on packed
weights on the CPU where a probe finds them faster, torch's own GEMM elsewhere), and the library
adapters fuse the activation or residual add after a linear layer into it (`fused_linear`).

This is the adapter of torch's own `nn.Linear` (registry.LIBRARIES): patch() swaps it only inside
a Perceiver library's modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import cpu_linear
from ..linear import linear
from ..reference import activation_reference
from .registry import FastModule, Swap, wrapper_of

def linear_backend(backend: str | None) -> str | None:
    """The backend a patched linear layer runs on: "reference" (torch's own F.linear, with
    higher-order gradients) for patch(model, backend="reference"), else auto. A model pinned to
    another backend pins its attention: its linear layers still take torch's GEMM where the cpu
    kernels cannot run them (float64, an empty batch, a small call) rather than raise."""
    return "reference" if backend == "reference" else None


def small(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether a call is too small for pf.linear under auto dispatch (backends/cpu_linear.py,
    SMALL_PROBLEM_MACS): it then goes to F.linear straight, without pf.linear's dispatch either."""
    return x.numel() // max(layer.in_features, 1) * layer.in_features * layer.out_features < cpu_linear.SMALL_PROBLEM_MACS


class FastLinear(FastModule, nn.Linear):
    """nn.Linear on pf.linear; parameters, hooks and state_dict as they were. A call too small to
    gain from the op (a decoding step's one row) runs F.linear, as auto dispatch would."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        backend = linear_backend(self.pf_backend)
        if backend is None and small(self, input):
            return F.linear(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias, backend=backend)


def fused_linear(layer: nn.Module, x: torch.Tensor, activation: str = "none",
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """activation(layer(x)) (+ residual), in one pf.linear where `layer` is a patched nn.Linear that
    nothing wraps; otherwise the layer's own call (its hooks and wrappers run), then the rest in torch."""
    if isinstance(layer, FastLinear) and wrapper_of(layer) is None and not (
            linear_backend(layer.pf_backend) is None and small(layer, x)):
        return linear(x, layer.weight, layer.bias, activation=activation, residual=residual,
                      backend=linear_backend(layer.pf_backend))
    y = activation_reference(layer(x), activation)
    return y if residual is None else y + residual


def activation_name(module) -> str | None:
    """The pf.linear activation an activation module (or function) computes: torch's GELU, F.gelu and
    HF's GELU classes; None for any other, or for a module with hooks."""
    if isinstance(module, nn.Module) and wrapper_of(module) is not None:
        return None
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if module is torch.nn.functional.gelu:
        return "gelu"
    if type(module).__module__ != "transformers.activations":  # HF's, by name: not imported here
        return None
    return {"GELUActivation": "gelu", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh",
            "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}.get(type(module).__name__)


def input_attentions(model) -> list:
    return []  # a linear layer attends to nothing


SWAPS = (Swap(nn.Linear, FastLinear, label="Linear", linear=True),)
