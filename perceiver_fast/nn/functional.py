"""The attention step of a Perceiver layer, shared by the modules and by every patched library.

`input_attention` takes projected queries and the raw key/value input with its LayerNorm and
projection weights, so that how K and V are produced stays behind one function: the modules of
this package and the adapters of `perceiver_fast.patching` all call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import cross_attention, latent_attention
from ..input_attention import fused_input_attention
from ..shards import check_group
from ..validation import attention_kind, compute_dtype


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * D) -> (B, H, L, D), a view."""
    batch, length, channels = t.shape
    return t.view(batch, length, heads, channels // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H * D)."""
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)


def layer_norm(x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
    """Applies an nn.LayerNorm (or nothing, for None) the way the module itself would."""
    return x if norm is None else norm(x)


def _one_dtype(q, k, v) -> tuple[torch.Tensor, ...]:
    """q, k and v in the dtype a matmul of them would take: autocast's where it is on, else the promoted one."""
    dtype = compute_dtype([q, k, v], q.device.type)
    return tuple(t.to(dtype) for t in (q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
              backend: str | None = None) -> torch.Tensor:
    """(B, H, N, D) attention: `latent_attention` or `cross_attention` as `validation.attention_kind` decides.

    q, k and v are first brought to one dtype as a matmul of them would be: autocast's dtype
    where autocast is on, else the promoted dtype (a rotary embedding in float32, say, promotes
    q and k but not v).
    """
    q, k, v = _one_dtype(q, k, v)
    if attention_kind(q.shape[2], k.shape[2], key_mask) == "latent":
        return latent_attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, backend=backend)
    return cross_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p,
                           backend=backend)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.mul_(ctx.factor), None


def scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t itself, whose gradient is multiplied by factor on the way back, in place: a second tensor of
    the input's size would double a sharded layer's gradient memory. Only for a t whose sole use is
    an op of this library, whose backward hands it a gradient tensor of its own."""
    return _ScaleGradient.apply(t, factor) if torch.is_grad_enabled() and t.requires_grad else t


def input_attention(q: torch.Tensor, x: torch.Tensor, *, norm: torch.nn.Module | None, k_weight: torch.Tensor,
                    k_bias: torch.Tensor | None, v_weight: torch.Tensor, v_bias: torch.Tensor | None,
                    key_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                    dropout_p: float = 0.0, backend: str | None = None, process_group=None) -> torch.Tensor:
    """Attention of projected queries over an input that is normalised and projected here.

    q (B, H, N, Dqk) projected queries; x (B, M, C) the raw input; norm the input's LayerNorm
    (None: x is used as it is); k_weight (H * Dqk, C), v_weight (H * Dv, C) with optional
    biases, as in nn.Linear. Returns (B, H, N, Dv). key_mask, causal, scale, dropout_p and backend
    as in `perceiver_fast.cross_attention`; a query with no key to attend gives 0.

    A plain nn.LayerNorm over the channels (or no norm) goes to `fused_input_attention`, which
    never stores LayerNorm(x), K or V; any other norm module is applied first, unfused.

    process_group: x and key_mask are this rank's shard of the input (see `cross_attention`), and
    the gradients come out ready for averaging over the group, as DistributedDataParallel does:
    those of q, the norm and the projections are the full ones on every rank, and the gradient
    flowing back into x is the shard's own times the group size, so that whatever made x on each
    rank's shard (an embedding, say) gets, once averaged, the sum of the shards' shares.
    """
    if process_group is not None:
        check_group(process_group)
    world = 1 if process_group is None else torch.distributed.get_world_size(process_group)
    if norm is None or _is_plain_layer_norm(norm, x.shape[-1]):
        return fused_input_attention(q, scale_gradient(x, world) if world > 1 else x, k_weight=k_weight, k_bias=k_bias,
                                     v_weight=v_weight, v_bias=v_bias,
                                     norm_weight=None if norm is None else norm.weight,
                                     norm_bias=None if norm is None else norm.bias,
                                     norm_eps=None if norm is None else norm.eps, key_mask=key_mask, causal=causal,
                                     scale=scale, dropout_p=dropout_p, backend=backend, process_group=process_group)
    heads = q.shape[1]
    normed = norm(x)
    k = split_heads(F.linear(normed, k_weight, k_bias), heads)
    v = split_heads(F.linear(normed, v_weight, v_bias), heads)
    if process_group is None:
        return attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p, backend=backend)
    # The norm and projections ran on this shard only: their gradients, like x's, are the shard's
    # share, scaled so that the average over the ranks sums the shares.
    q, k, v = _one_dtype(q, scale_gradient(k, world), scale_gradient(v, world))
    return cross_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p,
                           backend=backend, process_group=process_group)


def _is_plain_layer_norm(norm: torch.nn.Module, channels: int) -> bool:
    """An nn.LayerNorm over the last dimension only, whose forward is LayerNorm's own."""
    return (isinstance(norm, torch.nn.LayerNorm) and type(norm).forward is torch.nn.LayerNorm.forward
            and tuple(norm.normalized_shape) == (channels,))
