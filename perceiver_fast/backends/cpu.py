"""The cpu backend: C++ kernels (csrc/cpu/) on oneDNN brgemm micro-kernels and AVX-512 softmax; it fuses
both input-attention methods. The kernels are the functions of perceiver_fast._C, registered here
as the "cpu" kernels of the ops."""

from __future__ import annotations

import torch

from .. import extension
from ..ops import attention, input_attention  # the op modules, whose KERNELS this fills
from ..validation import MAX_HEAD_DIM
from .base import Backend, Capabilities


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32, torch.float64}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
    )
    fused_input_methods = frozenset({"shortcut", "projection"})
    unavailable = extension.LOAD_ERROR


# The ops' arguments less the kernel name (and `kind`, which picks Triton tiles); `tiling` is
# (key_tile, row_block, workers).
def _forward(q, k, v, key_mask, causal, scale, kind, tiling):
    return extension.require().cpu_attention_forward(q, k, v, key_mask, causal, scale, *tiling)


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, kind, tiling):
    return extension.require().cpu_attention_backward(dout, q, k, v, out, lse, key_mask, causal, scale, *tiling)


def _input_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale, tiling):
    return extension.require().cpu_input_attention_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias,
                                                           key_mask, causal, scale, *tiling)


def _input_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, causal, scale,
                    tiling):
    return extension.require().cpu_input_attention_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight,
                                                            v_bias, out, lse, key_mask, causal, scale, *tiling)


attention.KERNELS.register(CpuBackend.name, _forward, _backward)
input_attention.KERNELS.register(CpuBackend.name, _input_forward, _input_backward)
