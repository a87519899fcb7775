"""`perceiver_fast::linear` and `perceiver_fast::linear_backward`: a linear layer with its epilogue as
registered ops, with their fake implementations and the autograd formula that ties them together.

    linear(x, weight, bias, residual, activation, save_preactivation, kernel) -> (y, preactivation)

y = activation(x W^T + b) (+ residual), for x (rows, in), weight (out, in), bias (out,) and residual
(rows, out) (inputs already validated). The kernels compute in x's dtype; weight and bias may be of
another (an fp32 parameter under bfloat16 autocast), and their gradients come back in it.
activation: "none", "gelu" (exact) or "gelu_tanh". With save_preactivation the kernel also returns
x W^T + b, which the backward of an activation needs; otherwise an empty tensor, and the backward
computes it again. `kernel` names the kernel family, as its backend registered it in KERNELS.

    linear_backward(dy, x, weight, bias, preactivation, activation, grads, kernel) -> (dx, dweight, dbias)

preactivation: the forward's, or empty (computed again from x, weight and bias where the activation
needs it). grads: which of (x, weight, bias) need a gradient; the others come back empty (bias:
also where there is none).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernel_table import KernelTable, refuse_higher_order_gradients

# Filled by the backends (perceiver_fast/backends/): kernel name -> its forward and backward.
KERNELS = KernelTable("linear")


@torch.library.custom_op("perceiver_fast::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str,
           save_preactivation: bool, kernel: str) -> Tuple[Tensor, Tensor]:
    return KERNELS.forward(kernel)(x, weight, bias, residual, activation, save_preactivation)


@linear.register_fake
def _(x, weight, bias, residual, activation, save_preactivation, kernel):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, (x.new_empty(out.shape) if save_preactivation else x.new_empty(0))


@torch.library.custom_op("perceiver_fast::linear_backward", mutates_args=())
def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], preactivation: Tensor,
                    activation: str, grads: List[bool], kernel: str) -> Tuple[Tensor, Tensor, Tensor]:
    return KERNELS.backward(kernel)(dy, x, weight, bias, preactivation, activation, grads)


@linear_backward.register_fake
def _(dy, x, weight, bias, preactivation, activation, grads, kernel):
    return (x.new_empty(x.shape if grads[0] else 0), weight.new_empty(weight.shape if grads[1] else 0),
            weight.new_empty(weight.shape[0] if grads[2] else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_preactivation, kernel = inputs
    _, preactivation = output
    # Without a saved preactivation, an activation's backward computes it again, with the bias.
    with_bias = bias is not None and activation != "none" and not save_preactivation
    ctx.save_for_backward(x, weight, preactivation, *([bias] if with_bias else []))
    ctx.settings = (activation, kernel)
    ctx.mark_non_differentiable(preactivation)


def _backward(ctx, dy, _dpreactivation):
    x, weight, preactivation, *bias = ctx.saved_tensors
    bias = bias[0] if bias else None
    activation, kernel = ctx.settings
    refuse_higher_order_gradients("linear", kernel)
    grads = list(ctx.needs_input_grad[:3])
    dx, dweight, dbias = linear_backward(dy, x, weight, bias, preactivation, activation, grads, kernel)
    return (dx if grads[0] else None, dweight if grads[1] else None, dbias if grads[2] else None,
            dy if ctx.needs_input_grad[3] else None, None, None, None)


linear.register_autograd(_backward, setup_context=_setup_context)
