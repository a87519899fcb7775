"""The cpu backend: C++ kernels (csrc/cpu/) on oneDNN brgemm micro-kernels and AVX-512 softmax."""

from __future__ import annotations

import torch

from ..validation import MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities


def extension_error() -> str | None:
    """Why perceiver_fast._C cannot be loaded (None when it can)."""
    try:
        from .. import _C  # noqa: F401  (importing registers torch.ops.perceiver_fast.*)
    except ImportError as error:
        return (f"the C++ extension perceiver_fast._C is not built or does not load ({error}); "
                "reinstall with `pip install --no-build-isolation .`")
    return None


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32, torch.float64}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )

    def unavailable_reason(self) -> str | None:
        return extension_error()

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        from ..autograd.cpu_attention import cpu_attention

        return cpu_attention(problem.q, problem.k, problem.v, key_mask=problem.key_mask, causal=problem.causal,
                             scale=problem.scale)
