"""The public linear op: a Perceiver's linear layers with their epilogue (activation, residual) as one
op (contract: docs/design.md)."""

from __future__ import annotations

import torch

from .dispatch import select_backend
from .validation import validate_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "none",
           residual: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """activation(x W^T + b) (+ residual), as `F.linear` followed by the activation and the add.

    x (..., in), weight (out, in), bias (out,) or None, residual of the output's shape (..., out)
    or None (never broadcast). activation: "none", "gelu" (exact, erf) or "gelu_tanh" (GELU's tanh
    approximation). Same dtype rules as F.linear: one dtype for every argument, or autocast's.
    Differentiable in every tensor.

    backend: None/"auto", "cpu" or "reference". On the CPU, auto runs the cpu backend's oneDNN
    GEMMs (weights packed once, the activation or residual fused into the GEMM's epilogue) where a
    one-time probe finds them faster than torch's own GEMM, and torch's otherwise; elsewhere, and
    for float16 and float64, torch's own (the reference backend). `pf.explain(pf.linear, ...)` says
    which runs.
    """
    problem = validate_linear(x, weight, bias, activation=activation, residual=residual)
    out, _ = select_backend(problem, backend).run(problem)
    return out
