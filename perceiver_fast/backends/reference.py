"""The reference backend: plain PyTorch, every device and dtype, the whole contract. It fuses nothing:
the input attention runs composed on the reference attention. Its attention differentiates by
autograd; sharded over ranks it runs as the "reference" kernels of the attention op (forward, and
the explicit backward formula), which the sharded op drives like any other backend's."""

from __future__ import annotations

import torch

from ..ops import attention
from ..reference import attention_reference, attention_reference_backward
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
        if p.shards is not None:
            return super().run_attention(problem)
        return attention_reference(p.q, p.k, p.v, key_mask=p.key_mask, causal=p.causal, scale=p.scale,
                                   compute_dtype=_compute_dtype(p.q))


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


# The ops' arguments less the kernel name (`kind` and `tiling` have no meaning here).
def _forward(q, k, v, key_mask, causal, scale, kind, tiling):
    with torch.no_grad():
        return attention_reference(q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                                   compute_dtype=_compute_dtype(q))


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, kind, tiling):
    return attention_reference_backward(dout, q, k, v, out, lse, key_mask=key_mask, causal=causal, scale=scale,
                                        compute_dtype=_compute_dtype(q))


attention.KERNELS.register(ReferenceBackend.name, _forward, _backward)
