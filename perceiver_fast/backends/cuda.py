"""The cuda backend: hand-written CUDA kernels (csrc/cuda/), float16/bfloat16, forward and backward.

Built only where torch has CUDA, for every arch torch's CUDA wheels target (sm_75 and up); below
sm_80 the bfloat16 kernels are compiled out and it refuses bfloat16. The kernels compile in `make
test` (`make cuda-check`, each arch) but have not yet
run on a GPU, so auto dispatch does not choose them: name backend="cuda" to use them. It has no
fused input attention: that op runs composed on its attention kernel, and no attention dropout.
Its kernels are perceiver_fast._C.cuda_attention_forward and _backward, registered here as the
"cuda" kernels of the attention op.
"""

from __future__ import annotations

import functools

import torch

from .. import extension
from ..ops import attention  # the op module, whose KERNELS this fills
from ..validation import MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
        double_backward=False, dropout=False,
    )
    unavailable = extension.LOAD_ERROR or (
        None if extension.HAS_CUDA_KERNELS
        else "the CUDA kernels are not built (perceiver_fast._C was compiled against a torch without CUDA)")

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        reasons = [] if explicit else ["not yet run on a GPU: auto dispatch does not choose it (name backend='cuda')"]
        if problem.dtype == torch.bfloat16 and problem.device.type == "cuda":
            major, minor = _capability(problem.device.index)
            if major < 8:
                reasons.append(f"bfloat16 needs an sm_80 (Ampere) or newer GPU, this one is sm_{major}{minor}: its "
                               f"bfloat16 tensor-core kernels are compiled out below sm_80 (float16 runs)")
        return reasons


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _forward(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    if dropout_p:
        raise ValueError(f"the 'cuda' kernel has no attention dropout, got dropout_p={dropout_p}")
    return extension.require().cuda_attention_forward(q, k, v, key_mask, causal, scale,
                                                      attention.forced_splits(tiling) or 0)


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    if dropout_p:
        raise ValueError(f"the 'cuda' kernel has no attention dropout, got dropout_p={dropout_p}")
    return extension.require().cuda_attention_backward(dout, q, k, v, out, lse, key_mask, causal, scale)


attention.KERNELS.register(CudaBackend.name, _forward, _backward)
