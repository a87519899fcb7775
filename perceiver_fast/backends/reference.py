"""The reference backend: plain PyTorch, every device and dtype, the whole contract."""

from __future__ import annotations

import torch

from ..reference import attention_reference
from ..validation import FLOAT_DTYPES, MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}), dtypes=frozenset(FLOAT_DTYPES),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        # Half-precision inputs are computed in float32, as the fused kernels accumulate.
        compute = torch.promote_types(problem.dtype, torch.float32)
        return attention_reference(problem.q, problem.k, problem.v, key_mask=problem.key_mask,
                                   causal=problem.causal, scale=problem.scale, compute_dtype=compute)
