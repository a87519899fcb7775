"""The Triton backend: fused kernels (perceiver_fast/kernels/) on CUDA, or on the CPU under the Triton
interpreter; it fuses the shortcut input-attention method."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..ops import attention
from ..validation import MAX_HEAD_DIM, AttentionProblem, Problem
from .base import Backend, Capabilities

# Triton reads this when its kernels are decorated, at import: a later change would not take effect.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )
    fused_input_methods = frozenset({"shortcut"})
    unavailable = None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    interpreting = INTERPRETING

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        if problem.device.type != "cpu":
            return []
        if not self.interpreting:
            return ["CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1)"]
        if not explicit:
            return ["the Triton interpreter is a testing aid: it runs CPU tensors only when asked for by name"]
        return []

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        return attention(p.q, p.k, p.v, p.key_mask, p.causal, p.scale, self.name, p.kind, [])
