"""The cpu backend: C++ kernels (csrc/cpu/) on oneDNN brgemm micro-kernels and AVX-512 softmax; it fuses
both input-attention methods."""

from __future__ import annotations

import torch

from .. import extension
from ..ops import attention
from ..validation import MAX_HEAD_DIM, AttentionProblem
from .base import Backend, Capabilities


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32, torch.float64}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )
    fused_input_methods = frozenset({"shortcut", "projection"})
    unavailable = extension.LOAD_ERROR

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        return attention(p.q, p.k, p.v, p.key_mask, p.causal, p.scale, self.name, p.kind, [])
