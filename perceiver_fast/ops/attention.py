"""`perceiver_fast::attention` and `perceiver_fast::attention_backward`: the attention kernels as
registered ops, with their fake implementations and the autograd formula that ties them together.

    attention(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kernel, kind, tiling) -> (out, lse)

Layout and contract as `perceiver_fast.cross_attention` (inputs already validated). dropout_p > 0
drops attention probabilities by the mask drawn from dropout_seed (int64 (2,) on q's device,
perceiver_fast/dropout.py); the backward regenerates it from the saved seed. `kernel`
names the kernel family that runs it, as its backend registered it in KERNELS: "cpu" (C++,
csrc/cpu), "triton" (perceiver_fast/kernels, CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) or "cuda" (CUDA C++). `kind` ("cross" or "latent") picks the
Triton tile set. `tiling` overrides a kernel's loop sizes, for tests that reach tile edges with
small inputs: (key_tile, row_block, workers[, query_chunk]) for "cpu" (query_chunk: rows per chunk of
a long query axis, perceiver_fast/backends/cpu.py), (splits,) for "triton" and "cuda"; non-positive entries (or
none) for the kernel's own choice: dispatch passes [0], since an AOTInductor package passes an empty
list to the op as None.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernel_table import KernelTable, refuse_higher_order_gradients

# Filled by the backends (perceiver_fast/backends/): kernel name -> its forward and backward.
KERNELS = KernelTable("attention")


def forced_splits(tiling: List[int]) -> Optional[int]:
    """The key-axis splits a (splits,) tiling forces on the GPU kernels; None: their own choice."""
    return tiling[0] if tiling and tiling[0] > 0 else None


@torch.library.custom_op("perceiver_fast::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
              dropout_p: float, dropout_seed: Optional[Tensor], kernel: str, kind: str,
              tiling: List[int]) -> Tuple[Tensor, Tensor]:
    return KERNELS.forward(kernel)(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling)


@attention.register_fake
def _(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kernel, kind, tiling):
    batch, heads, queries, _ = q.shape
    return q.new_empty(batch, heads, queries, v.shape[3]), q.new_empty(batch, heads, queries, dtype=torch.float32)


@torch.library.custom_op("perceiver_fast::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       key_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
                       dropout_seed: Optional[Tensor], kernel: str, kind: str,
                       tiling: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return KERNELS.backward(kernel)(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kind,
                                    tiling)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kernel, kind, tiling):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kernel, kind, tiling = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, dropout_seed)
    ctx.settings = (causal, scale, dropout_p, kernel, kind, tiling)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, dropout_seed = ctx.saved_tensors
    causal, scale, dropout_p, kernel, kind, tiling = ctx.settings
    refuse_higher_order_gradients("attention", kernel)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kernel,
                                    kind, tiling)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
