"""The ops over a key axis sharded across the ranks of a process group (layout: perceiver_fast/shards.py),
on the registered ops of each backend's kernels, with no kernel of their own.

Forward: each rank runs the op on its shard, giving (out_r, lse_r), and the shards merge in float32
(float64 for float64 inputs, with weights from the contract's float32 lse: about 1e-7 relative) by
the rule the kernels use to merge key splits across threads:

    m = max_r lse_r,  w_r = exp(lse_r - m),  out = sum_r w_r out_r / sum_r w_r,  lse = m + log sum_r w_r

one all-reduce (max) of B x H x N values and one (sum) of B x H x N x (Dv + 1), whatever M.

Backward: given the merged out and lse, a rank's backward kernel computes exactly its shard's share:
P = exp(s - lse) is the global softmax restricted to the shard's keys, and rowsum(dout * out) the
global one. So the key side's gradients (dk, dv; dx) are the shard's own, and those of the
replicated inputs (q; the projection weights of the fused op) are partial sums, summed by one
all-reduce in float32 (float64), so that every rank ends with the full gradient.

Causal is bottom-right aligned on global positions: row i sees global key j iff
j <= i + M_total - N. On a shard with K keys after it, rows i < N - K see the shard's keys by the
kernels' own causal rule applied to those N - K rows alone, and rows i >= N - K see every key of
the shard, so a shard runs at most two calls, one causal and one not (two only where the shard
ends within N keys of the end).

These run eagerly under torch.compile: collectives on values read at run time break the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..shards import ShardLayout
from .attention import attention, attention_backward
from .input_attention import input_attention, input_attention_backward
from .kernel_table import refuse_higher_order_gradients


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_across_ranks(out: torch.Tensor, lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over every rank's keys from each rank's (out, lse) over its own; rows with no
    key on any rank give 0 and -inf."""
    acc = _accumulation_dtype(out.dtype)
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - shift).to(acc).unsqueeze(-1)  # 0 where this shard has no key for the row
    packed = torch.cat([out.to(acc) * weight, weight], dim=-1)
    dist.all_reduce(packed, group=group)
    total = packed[..., -1:]
    merged = packed[..., :-1] / torch.where(total > 0, total, torch.ones_like(total))
    return merged.to(out.dtype), shift + torch.log(total.squeeze(-1).float())


def sum_across_ranks(tensors: list[torch.Tensor | None], group) -> list[torch.Tensor | None]:
    """Each tensor summed over the ranks of group, in one all-reduce in float32 (float64)."""
    present = [t for t in tensors if t is not None and t.numel()]
    if not present:
        return tensors
    acc = _accumulation_dtype(present[0].dtype)
    flat = torch.cat([t.reshape(-1).to(acc) for t in present])
    dist.all_reduce(flat, group=group)
    summed, start = [], 0
    for t in tensors:
        if t is None or not t.numel():
            summed.append(t)
            continue
        summed.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return summed


def row_parts(queries: int, shards: ShardLayout, causal: bool) -> list[tuple[slice, bool]]:
    """(rows, causal) of each call this shard makes (see the module's docstring)."""
    if not causal:
        return [(slice(0, queries), False)]
    split = max(0, queries - shards.keys_after)
    parts = [(slice(0, split), True)] if split else []
    return parts + ([(slice(split, queries), False)] if split < queries else [])


class _AttentionShard:
    """`perceiver_fast::attention` on one shard; inputs (q, k, v, key_mask)."""

    replicated = (0,)

    def __init__(self, scale: float, kernel: str, kind: str):
        self.scale, self.kernel, self.kind = scale, kernel, kind

    @staticmethod
    def keys(q, k, v, key_mask) -> int:
        return k.shape[2]

    @staticmethod
    def dim_v(q, k, v, key_mask) -> int:
        return v.shape[3]

    def forward(self, causal, q, k, v, key_mask):
        return attention(q, k, v, key_mask, causal, self.scale, 0.0, None, self.kernel, self.kind, [])

    def backward(self, causal, dout, out, lse, q, k, v, key_mask):
        return (*attention_backward(dout, q, k, v, out, lse, key_mask, causal, self.scale, 0.0, None, self.kernel,
                                    self.kind, []), None)


class _InputAttentionShard:
    """`perceiver_fast::input_attention` on one shard; inputs (q, x, k_weight, k_bias, v_weight, v_bias,
    key_mask), the four weights None for the shortcut."""

    replicated = (0, 2, 3, 4, 5)

    def __init__(self, normalize: bool, eps: float, scale: float, kernel: str):
        self.normalize, self.eps, self.scale, self.kernel = normalize, eps, scale, kernel

    @staticmethod
    def keys(q, x, *rest) -> int:
        return x.shape[1]

    @staticmethod
    def dim_v(q, x, k_weight, k_bias, v_weight, v_bias, key_mask) -> int:
        return x.shape[2] if v_weight is None else v_weight.shape[0] // q.shape[1]

    def forward(self, causal, q, x, k_weight, k_bias, v_weight, v_bias, key_mask):
        return input_attention(q, x, self.normalize, self.eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal,
                               self.scale, 0.0, None, self.kernel, [])

    def backward(self, causal, dout, out, lse, q, x, k_weight, k_bias, v_weight, v_bias, key_mask):
        dq, dx, *weights = input_attention_backward(dout, q, x, self.normalize, self.eps, k_weight, k_bias, v_weight,
                                                    v_bias, out, lse, key_mask, causal, self.scale, 0.0, None,
                                                    self.kernel, [])
        weights = [None if given is None else g for g, given in zip(weights, (k_weight, k_bias, v_weight, v_bias))]
        return (dq, dx, *weights, None)


def _rows(t: torch.Tensor, rows: slice, whole: bool) -> torch.Tensor:
    return t if whole else t[:, :, rows].contiguous()


class _ShardedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, shards: ShardLayout, causal: bool, *tensors):
        q = tensors[0]
        batch, heads, queries = q.shape[:3]
        parts = row_parts(queries, shards, causal) if op.keys(*tensors) else []
        if parts:
            pieces = [op.forward(c, _rows(q, rows, len(parts) == 1), *tensors[1:]) for rows, c in parts]
            out, lse = (torch.cat(t, dim=2) if len(t) > 1 else t[0] for t in zip(*pieces))
        else:
            out = q.new_zeros(batch, heads, queries, op.dim_v(*tensors))
            lse = torch.full((batch, heads, queries), float("-inf"), dtype=torch.float32, device=q.device)
        out, lse = merge_across_ranks(out, lse, shards.group)
        ctx.save_for_backward(*tensors, out, lse)
        ctx.op, ctx.shards, ctx.parts = op, shards, parts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # Asked before once_differentiable turns grad mode off, so that create_graph=True is refused
        # here, naming the backend, instead of silently giving first-order gradients with no graph.
        refuse_higher_order_gradients(ctx.shards.op, ctx.op.kernel, sharded=True)
        return _ShardedOp.first_order_backward(ctx, dout)

    @staticmethod
    @once_differentiable
    def first_order_backward(ctx, dout):
        *tensors, out, lse = ctx.saved_tensors
        op, parts = ctx.op, ctx.parts
        dout = dout.contiguous()
        whole = len(parts) == 1
        # The key side's gradients (of the size of the shard) are the kernel's own tensors, added
        # into only when a second part runs: no second shard-sized buffer.
        grads = [None] * len(tensors)
        for rows, causal in parts:
            part = op.backward(causal, _rows(dout, rows, whole), _rows(out, rows, whole), _rows(lse, rows, whole),
                               _rows(tensors[0], rows, whole), *tensors[1:])
            if whole:
                grads = list(part)
                break
            if grads[0] is None:
                grads[0] = torch.zeros_like(tensors[0])
            grads[0][:, :, rows] = part[0]
            for i, g in enumerate(part[1:], start=1):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        grads = [torch.zeros_like(t) if g is None and t is not None and t.is_floating_point() else g
                 for g, t in zip(grads, tensors)]
        summed = sum_across_ranks([grads[i] for i in op.replicated], ctx.shards.group)
        for i, g in zip(op.replicated, summed):
            grads[i] = g
        grads = [g if t is not None and t.requires_grad else None for g, t in zip(grads, tensors)]
        return (None, None, None, *grads)


@torch.compiler.disable
def sharded_attention(q, k, v, key_mask, causal: bool, scale: float, kernel: str, kind: str,
                      shards: ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """`perceiver_fast::attention` over the keys of every rank: (out, lse), the same on every rank."""
    return _ShardedOp.apply(_AttentionShard(scale, kernel, kind), shards, causal, q, k, v, key_mask)


@torch.compiler.disable
def sharded_input_attention(q, x, normalize: bool, eps: float, k_weight, k_bias, v_weight, v_bias, key_mask,
                            causal: bool, scale: float, kernel: str,
                            shards: ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """`perceiver_fast::input_attention` over the keys of every rank: (out, lse), the same on every rank."""
    return _ShardedOp.apply(_InputAttentionShard(normalize, eps, scale, kernel), shards, causal, q, x, k_weight,
                            k_bias, v_weight, v_bias, key_mask)


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward sums each gradient over the ranks (one all-reduce)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.layouts = [(t.shape, t.dtype, t.device) for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        # every rank must all-reduce the same sizes, whichever gradients its graph left unset
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g, (shape, dtype, device) in zip(grads, ctx.layouts)]
        return (None, *sum_across_ranks(grads, ctx.group))


def sum_gradients_across(shards: ShardLayout, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors, whose gradients (from work each rank does on its own shard) get summed over the
    ranks: replicated weights applied on the key side outside a sharded op (the composed input attention)."""
    present = [t for t in tensors if t is not None]
    if not present or not torch.is_grad_enabled():
        return list(tensors)
    summed = iter(_SumGradients.apply(shards.group, *present))
    return [None if t is None else next(summed) for t in tensors]
