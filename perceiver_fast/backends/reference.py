"""The reference backend: plain PyTorch, every device and dtype, the whole contract. It fuses nothing:
the input attention runs composed on the reference attention."""

from __future__ import annotations

import torch

from ..reference import attention_reference
from ..validation import FLOAT_DTYPES, MAX_HEAD_DIM, AttentionProblem
from .base import Backend, Capabilities


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}), dtypes=frozenset(FLOAT_DTYPES),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        # Half-precision inputs are computed in float32, as the fused kernels accumulate.
        p = problem
        return attention_reference(p.q, p.k, p.v, key_mask=p.key_mask, causal=p.causal, scale=p.scale,
                                   compute_dtype=torch.promote_types(p.dtype, torch.float32))
