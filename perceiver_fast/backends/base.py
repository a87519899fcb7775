"""What a backend declares, and the generic checks made from that declaration."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..validation import Problem


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_dim_qk: int
    max_dim_v: int
    key_mask: bool
    causal: bool
    grad: bool

    def refusals(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device.type not in self.devices:
            reasons.append(f"device {problem.device.type} not supported (supports {', '.join(sorted(self.devices))})")
        if problem.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported (supports {names})")
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
        return reasons


class Backend(abc.ABC):
    """One implementation of cross/latent attention.

    Subclasses set `name` and `capabilities`, may add input-specific refusals in
    `extra_refusals`, and implement `run`, which returns (out, lse).
    """

    name: str
    capabilities: Capabilities

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this installation (None if it can)."""
        return None

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        return []

    def refusals(self, problem: Problem, explicit: bool) -> list[str]:
        """Every reason this backend cannot run `problem`; empty when it can.

        `explicit` is True when the caller named this backend rather than asking for auto.
        """
        unavailable = self.unavailable_reason()
        if unavailable:
            return [unavailable]
        return self.capabilities.refusals(problem) + self.extra_refusals(problem, explicit)

    @abc.abstractmethod
    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """Computes (out, lse) for a problem this backend accepted."""
