"""The cuda backend: hand-written CUDA forward kernels (csrc/cuda/), float16/bfloat16, forward only.

Built only where torch has CUDA. The kernels compile for sm_90a in `make test` but have not yet
run on a GPU, so auto dispatch does not choose them: name backend="cuda" to use them.
"""

from __future__ import annotations

import torch

from ..validation import MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities
from .cpu import extension_error


def cuda_kernels_built() -> bool:
    return extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "perceiver_fast::cuda_attention_forward", "CUDA")


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=False,
    )

    def unavailable_reason(self) -> str | None:
        error = extension_error()
        if error:
            return error
        if not cuda_kernels_built():
            return "the CUDA kernels are not built (perceiver_fast._C was compiled against a torch without CUDA)"
        return None

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        if not explicit:
            return ["not yet run on a GPU: auto dispatch does not choose it (name backend='cuda')"]
        return []

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.perceiver_fast.cuda_attention_forward(problem.q, problem.k, problem.v, problem.key_mask,
                                                               problem.causal, problem.scale)
