"""The Triton backend: fused kernels (perceiver_fast/kernels/) on CUDA, or on the CPU under the Triton
interpreter; it fuses both input-attention methods. Its launchers are registered here as
the "triton" kernels of the ops."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..ops import attention, input_attention  # the op modules, whose KERNELS this fills
from ..validation import MAX_HEAD_DIM, Problem
from .base import Backend, Capabilities

# Triton reads this when its kernels are decorated, at import: a later change would not take effect.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
        double_backward=False, dropout=True,
    )
    fused_input_methods = frozenset({"shortcut", "projection"})
    unavailable = None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    interpreting = INTERPRETING

    def extra_refusals(self, problem: Problem, explicit: bool) -> list[str]:
        if problem.device.type != "cpu":
            return []
        if not self.interpreting:
            return ["CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1)"]
        if not explicit:
            return ["the Triton interpreter is a testing aid: it runs CPU tensors only when asked for by name"]
        return []

    def dropout_keep_mask(self, seed, batch, heads, queries, keys, dropout_p):
        from ..kernels import dropout_keep_mask

        return dropout_keep_mask(seed, batch, heads, queries, keys, dropout_p)


# The ops' arguments less the kernel name; `tiling` is (splits,) for the forward. The kernels are
# imported when first run: importing them needs triton.
def _forward(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    from ..kernels import attention_forward

    return attention_forward(q, k, v, key_mask, causal, scale, kind, attention.forced_splits(tiling),
                             dropout_p=dropout_p, dropout_seed=dropout_seed)


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    from ..kernels import attention_backward

    return attention_backward(dout, q, k, v, out, lse, key_mask, causal, scale, kind, dropout_p=dropout_p,
                              dropout_seed=dropout_seed)


def _input_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale, dropout_p,
                   dropout_seed, tiling):
    if k_weight is not None:
        from ..kernels import projected_attention_forward

        return projected_attention_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal,
                                           scale, dropout_p, dropout_seed, attention.forced_splits(tiling))
    from ..kernels import input_attention_forward

    return input_attention_forward(q, x, normalize, eps, key_mask, causal, scale, dropout_p=dropout_p,
                                   dropout_seed=dropout_seed)


def _input_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, causal, scale,
                    dropout_p, dropout_seed, tiling):
    if k_weight is not None:
        from ..kernels import projected_attention_backward

        return projected_attention_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse,
                                            key_mask, causal, scale, dropout_p, dropout_seed,
                                            attention.forced_splits(tiling))
    from ..kernels import input_attention_backward

    dq, dx = input_attention_backward(dout, q, x, normalize, eps, out, lse, key_mask, causal, scale,
                                      dropout_p=dropout_p, dropout_seed=dropout_seed)
    # Four distinct empty weight gradients: the outputs of a registered op may not alias each other.
    return [dq, dx, *(q.new_empty(0) for _ in range(4))]


attention.KERNELS.register(TritonBackend.name, _forward, _backward)
input_attention.KERNELS.register(TritonBackend.name, _input_forward, _input_backward)
