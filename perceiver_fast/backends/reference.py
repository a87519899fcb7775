"""The reference backend: plain PyTorch, every device and dtype, the whole contract. Its linear op is
torch's own F.linear (what auto dispatch keeps where no backend's linear kernels run). It fuses nothing:
the input attention runs composed on the reference attention. Its attention differentiates by
autograd; sharded over ranks it runs as the "reference" kernels of the attention op (forward, and
the explicit backward formula), which the sharded op drives like any other backend's. Its dropout
materialises the keep mask by the plain-torch Philox of perceiver_fast/reference.py."""

from __future__ import annotations

import torch

from ..ops import attention
from ..dropout import draw_seed
from ..reference import attention_reference, attention_reference_backward, dropout_keep_mask, linear_reference
from ..validation import FLOAT_DTYPES, MAX_HEAD_DIM, AttentionProblem, LinearProblem
from .base import ANY_DEVICE, Backend, Capabilities, LinearCapabilities


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({ANY_DEVICE}), dtypes=frozenset(FLOAT_DTYPES),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
        double_backward=True, dropout=True,
    )
    # torch's own F.linear and activations, differentiated by autograd.
    linear = LinearCapabilities(devices=frozenset({ANY_DEVICE}), dtypes=frozenset(FLOAT_DTYPES), grad=True,
                                empty_batch=True)

    def dropout_keep_mask(self, seed, batch, heads, queries, keys, dropout_p):
        return dropout_keep_mask(seed, batch, heads, queries, keys, dropout_p)

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        # Half-precision inputs are computed in float32, as the fused kernels accumulate.
        p = problem
        if p.shards is not None:
            return super().run_attention(problem)
        keep = _keep(draw_seed(p.device), p.q, p.k, p.dropout_p) if p.dropout_p else None
        return attention_reference(p.q, p.k, p.v, key_mask=p.key_mask, causal=p.causal, scale=p.scale,
                                   compute_dtype=_compute_dtype(p.q), dropout_p=p.dropout_p, dropout_keep=keep)


    def run_linear(self, problem: LinearProblem) -> torch.Tensor:
        p = problem
        return linear_reference(p.x, p.weight, p.bias, activation=p.activation, residual=p.residual)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _keep(seed, q, k, dropout_p):
    """The keep mask of a (q, k) attention, None without dropout."""
    return dropout_keep_mask(seed, *q.shape[:3], k.shape[2], dropout_p) if dropout_p else None


# The ops' arguments less the kernel name (`kind` and `tiling` have no meaning here).
def _forward(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    with torch.no_grad():
        return attention_reference(q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                                   compute_dtype=_compute_dtype(q), dropout_p=dropout_p,
                                   dropout_keep=_keep(dropout_seed, q, k, dropout_p))


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    return attention_reference_backward(dout, q, k, v, out, lse, key_mask=key_mask, causal=causal, scale=scale,
                                        compute_dtype=_compute_dtype(q), dropout_p=dropout_p,
                                        dropout_keep=_keep(dropout_seed, q, k, dropout_p))


attention.KERNELS.register(ReferenceBackend.name, _forward, _backward)
