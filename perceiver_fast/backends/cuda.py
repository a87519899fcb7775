"""The cuda backend: hand-written CUDA forward kernels (csrc/cuda/), float16/bfloat16, forward only.

Built only where torch has CUDA. The kernels compile for sm_90a in `make test` but have not yet
run on a GPU, so auto dispatch does not choose them: name backend="cuda" to use them. It has no
fused input attention: that op runs composed on its attention kernel.
"""

from __future__ import annotations

import torch

from .. import extension
from ..ops import attention
from ..validation import MAX_HEAD_DIM, AttentionProblem, Problem
from .base import Backend, Capabilities


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=False,
    )
    unavailable = extension.LOAD_ERROR or (
        None if extension.HAS_CUDA_KERNELS
        else "the CUDA kernels are not built (perceiver_fast._C was compiled against a torch without CUDA)")

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        if not explicit:
            return ["not yet run on a GPU: auto dispatch does not choose it (name backend='cuda')"]
        return []

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        return attention(p.q, p.k, p.v, p.key_mask, p.causal, p.scale, self.name, p.kind, [])
