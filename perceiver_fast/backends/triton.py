"""The Triton backend: fused kernels on CUDA, or on the CPU under the Triton interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..validation import MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        if problem.device.type != "cpu":
            return []
        if not interpreting():
            return ["CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1)"]
        if not explicit:
            return ["the Triton interpreter is a testing aid: it runs CPU tensors only when asked for by name"]
        return []

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        from ..autograd.triton_attention import triton_attention

        return triton_attention(problem.q, problem.k, problem.v, key_mask=problem.key_mask, causal=problem.causal,
                                scale=problem.scale, kind=problem.kind)
