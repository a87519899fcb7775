"""`perceiver_fast::input_attention` and `perceiver_fast::input_attention_backward`: attention over
an input x normalised (LayerNorm without affine) and, with k_weight, projected tile by tile inside
the kernel, as registered ops with their fake implementations and autograd formula.

    input_attention(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal,
                    scale, dropout_p, dropout_seed, kernel, tiling) -> (out, lse)

With k_weight (the projection method) K = xn Wk^T + bk and V = xn Wv^T + bv split over heads;
without it (the shortcut) K = V = xn for every head and q's last dimension is x's C. The
backward returns (dq, dx, dk_weight, dk_bias, dv_weight, dv_bias), the last four empty for the
shortcut. dropout_p and dropout_seed: as in `perceiver_fast.ops.attention`, the mask over the
scores of q's heads. `kernel`: as registered in KERNELS by the backends that fuse a method, "cpu" (C++,
both methods) and "triton" (the shortcut); `tiling` as in `perceiver_fast.ops.attention`, for
the C++ kernel only.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernel_table import KernelTable, refuse_higher_order_gradients

# Filled by the backends (perceiver_fast/backends/) that fuse a method: kernel name -> forward, backward.
KERNELS = KernelTable("fused input attention")


@torch.library.custom_op("perceiver_fast::input_attention", mutates_args=())
def input_attention(q: Tensor, x: Tensor, normalize: bool, eps: float, k_weight: Optional[Tensor],
                    k_bias: Optional[Tensor], v_weight: Optional[Tensor], v_bias: Optional[Tensor],
                    key_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
                    dropout_seed: Optional[Tensor], kernel: str, tiling: List[int]) -> Tuple[Tensor, Tensor]:
    return KERNELS.forward(kernel)(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale,
                                   dropout_p, dropout_seed, tiling)


def _dim_v(q, heads, v_weight):
    return q.shape[3] if v_weight is None else v_weight.shape[0] // heads


@input_attention.register_fake
def _(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale, dropout_p, dropout_seed,
      kernel, tiling):
    batch, heads, queries, _ = q.shape
    return (q.new_empty(batch, heads, queries, _dim_v(q, heads, v_weight)),
            q.new_empty(batch, heads, queries, dtype=torch.float32))


@torch.library.custom_op("perceiver_fast::input_attention_backward", mutates_args=())
def input_attention_backward(dout: Tensor, q: Tensor, x: Tensor, normalize: bool, eps: float,
                             k_weight: Optional[Tensor], k_bias: Optional[Tensor], v_weight: Optional[Tensor],
                             v_bias: Optional[Tensor], out: Tensor, lse: Tensor, key_mask: Optional[Tensor],
                             causal: bool, scale: float, dropout_p: float, dropout_seed: Optional[Tensor],
                             kernel: str, tiling: List[int]) -> List[Tensor]:
    return KERNELS.backward(kernel)(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse,
                                    key_mask, causal, scale, dropout_p, dropout_seed, tiling)


@input_attention_backward.register_fake
def _(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, causal, scale, dropout_p,
      dropout_seed, kernel, tiling):
    weights = (k_weight, k_bias, v_weight, v_bias)
    return [q.new_empty(q.shape), x.new_empty(x.shape)] + [
        q.new_empty(0) if t is None else t.new_empty(t.shape) for t in weights]


def _setup_context(ctx, inputs, output):
    (q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale, dropout_p, dropout_seed, kernel,
     tiling) = inputs
    out, lse = output
    ctx.save_for_backward(q, x, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, dropout_seed)
    ctx.settings = (normalize, eps, causal, scale, dropout_p, kernel, tiling)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, x, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, dropout_seed = ctx.saved_tensors
    normalize, eps, causal, scale, dropout_p, kernel, tiling = ctx.settings
    refuse_higher_order_gradients("input_attention", kernel)
    dq, dx, *weight_grads = input_attention_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias,
                                                     out, lse, key_mask, causal, scale, dropout_p, dropout_seed,
                                                     kernel, tiling)
    if k_weight is None:
        weight_grads = [None] * 4
    return (dq, dx, None, None, *weight_grads) + (None,) * 7


input_attention.register_autograd(_backward, setup_context=_setup_context)
