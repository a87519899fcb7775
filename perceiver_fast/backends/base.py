"""What a backend declares, the generic checks made from that declaration, and how it runs each op.

A backend declares the `Capabilities` of its attention kernels and the input-attention methods it
fuses. It runs an attention problem on its kernels; an input-attention problem fused where it
fuses the method, else composed: LayerNorm and the projections in torch, then its attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dropout import draw_seed
from ..ops.attention import attention
from ..ops.linear import linear
from ..ops.sharded import sharded_attention
from ..validation import INPUT_ATTENTION, LINEAR, AttentionProblem, InputAttentionProblem, LinearProblem, Problem
from .input_methods import composed, run_fused


# A backend written in plain torch ops runs on every device torch runs them on (mps, xpu, ...).
ANY_DEVICE = "any"


def serves_device(devices: frozenset[str], device_type: str) -> bool:
    return ANY_DEVICE in devices or device_type in devices


def _names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels run. `double_backward`: higher-order gradients (a backward with
    create_graph=True), which only a backend differentiated by autograd has (the registered ops'
    backward ops have no autograd formula), and none sharded over a process group. Asked for only at
    the backward, it refuses no forward: the ops' autograd formula raises, naming the backends that
    have it (ops/kernel_table.py: refuse_higher_order_gradients)."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_dim_qk: int
    max_dim_v: int
    key_mask: bool
    causal: bool
    grad: bool
    double_backward: bool
    dropout: bool

    def refusals(self, problem: Problem) -> list[str]:
        reasons = []
        if not serves_device(self.devices, problem.device.type):
            reasons.append(f"device {problem.device.type} not supported (supports {', '.join(sorted(self.devices))})")
        if problem.dtype not in self.dtypes:
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported "
                           f"(supports {_names(self.dtypes)})")
        if problem.dim_qk > self.max_dim_qk:
            reasons.append(f"Dqk={problem.dim_qk} above this backend's maximum {self.max_dim_qk}")
        if problem.dim_v > self.max_dim_v:
            reasons.append(f"Dv={problem.dim_v} above this backend's maximum {self.max_dim_v}")
        if problem.key_mask is not None and not self.key_mask:
            reasons.append("key_mask not supported")
        if problem.causal and not self.causal:
            reasons.append("causal not supported")
        if problem.needs_grad and not self.grad:
            reasons.append("gradients not supported (inputs require grad)")
        if problem.dropout_p and not self.dropout:
            reasons.append("dropout not supported (dropout_p > 0)")
        return reasons


@dataclass(frozen=True)
class LinearCapabilities:
    """What a backend's linear kernels run (perceiver_fast::linear)."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    grad: bool
    empty_batch: bool  # whether it runs an x with no rows

    def refusals(self, problem: LinearProblem) -> list[str]:
        reasons = []
        if not serves_device(self.devices, problem.device.type):
            reasons.append(f"device {problem.device.type} not supported by its linear op "
                           f"(supports {', '.join(sorted(self.devices))})")
        if problem.dtype not in self.dtypes:
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported by its linear op "
                           f"(supports {_names(self.dtypes)})")
        if problem.rows == 0 and not self.empty_batch:
            reasons.append("x has no rows (an empty batch)")
        if problem.needs_grad and not self.grad:
            reasons.append("gradients not supported by its linear op (inputs require grad)")
        return reasons


class Backend:
    """One implementation of the ops.

    Subclasses set `name`, `capabilities`, `fused_input_methods` and `linear` (the capabilities of
    its linear kernels, None for none), set `unavailable` (why it
    cannot run at all on this installation, settled at import) where it applies, and may add
    input-specific refusals in `extra_refusals`. Their module registers the kernels under `name`
    in the ops' kernel tables (perceiver_fast/ops/), and a backend with dropout gives the keep mask
    its kernels draw (`dropout_keep_mask`); a backend that runs no registered op (the reference)
    overrides `run_attention`.
    """

    name: str
    capabilities: Capabilities
    fused_input_methods: frozenset[str] = frozenset()
    linear: LinearCapabilities | None = None
    unavailable: str | None = None
    linear_unavailable: str | None = None  # why its linear kernels cannot run on this installation

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        return []

    def refusals(self, problem: Problem, explicit: bool) -> list[str]:
        """Every reason this backend cannot run `problem`; empty when it can.

        `explicit` is True when the caller named this backend rather than asking for auto.
        """
        if problem.op == LINEAR:
            return self.linear_refusals(problem, explicit)
        if self.unavailable:
            return [self.unavailable]
        return self.capabilities.refusals(problem) + self.extra_refusals(problem, explicit)

    def linear_refusals(self, problem: LinearProblem, explicit: bool) -> list[str]:
        """Why this backend cannot run a linear problem (its linear capabilities, or none); empty when it can."""
        if self.linear is None:
            return ["has no linear op"]
        return [self.linear_unavailable] if self.linear_unavailable else self.linear.refusals(problem)

    def notes(self, problem: Problem) -> list[str]:
        """How it would run `problem`, where that is worth saying ("runs ..."); none by default."""
        return []

    def unfused_reason(self, problem: Problem) -> str | None:
        """Why an input-attention problem would run composed rather than fused here (None: fused)."""
        if problem.op != INPUT_ATTENTION or problem.method in self.fused_input_methods:
            return None
        if not self.fused_input_methods:
            return "has no fused input attention"
        return f"fuses only the {', '.join(sorted(self.fused_input_methods))} method, not {problem.method}"

    def dropout_keep_mask(self, seed: torch.Tensor, batch: int, heads: int, queries: int, keys: int,
                          dropout_p: float) -> torch.Tensor:
        """The bool (B, H, N, M) keep mask this backend's kernels draw from `seed` (a debug view).
        Every backend whose capabilities declare dropout overrides it."""
        raise NotImplementedError(f"backend {self.name!r} has no attention dropout")

    def run(self, problem: Problem | LinearProblem) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, lse) of a problem this backend accepted; lse is None for the input attention and the linear op."""
        if isinstance(problem, LinearProblem):
            out = self.run_linear(problem).view(problem.shape)
            return (out if problem.residual_after is None else out + problem.residual_after), None
        if isinstance(problem, AttentionProblem):
            return self.run_attention(problem)
        if self.unfused_reason(problem) is None:
            return self.run_fused_input(problem), None
        return self.run_attention(composed(problem))[0], None

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of an attention problem this backend accepted: the registered op on its kernels
        (over every rank's keys for a sharded problem)."""
        p = problem
        if p.shards is not None:
            return sharded_attention(p.q, p.k, p.v, p.key_mask, p.causal, p.scale, self.name, p.kind, p.shards)
        seed = draw_seed(p.device) if p.dropout_p else None
        return attention(p.q, p.k, p.v, p.key_mask, p.causal, p.scale, p.dropout_p, seed, self.name, p.kind, [0])

    def run_linear(self, problem: LinearProblem) -> torch.Tensor:
        """The (rows, out) result of a linear problem: the registered op on this backend's kernels,
        keeping x W^T + b for the backward of an activation where gradients are needed."""
        p = problem
        save = p.activation != "none" and p.needs_grad
        return linear(p.x, p.weight, p.bias, p.residual, p.activation, save, self.name)[0]

    def run_fused_input(self, problem: InputAttentionProblem) -> torch.Tensor:
        """The fused input attention of a backend with fused methods: its kernel's registered op."""
        return run_fused(problem, self.name)
