"""Pre-LayerNorm attention modules of a Perceiver: cross-attention to a long input, latent self-attention."""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import check_flag, check_int, type_name
from ..dropout import check_dropout_p
from ..shards import check_group
from .functional import attention, input_attention, merge_heads, split_heads


def head_channels(name: str, channels, default_name: str, default: int, heads_name: str, heads: int) -> int:
    """Channels split over `heads` (already checked): an int >= 1 that heads divides, or for None
    the default, `default_name`'s value; an error names the argument the value came from."""
    if channels is None:
        check_heads_divide(default_name, default, heads_name, heads, default_of=name)
        return default
    channels = check_int(name, channels)
    check_heads_divide(name, channels, heads_name, heads)
    return channels


def check_heads_divide(name: str, channels: int, heads_name: str, heads: int, default_of: str | None = None) -> None:
    """`default_of`: the argument that took `name`'s value by default, named in the error."""
    if channels % heads:
        role = f", the default {default_of}" if default_of else ""
        raise ValueError(f"{name} ({channels}{role}) must be divisible by {heads_name} ({heads})")


def _check_sequence(name: str, t, channels: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, L, {channels}), got {type_name(t)}")
    if t.dim() != 3 or t.shape[-1] != channels:
        raise ValueError(f"{name} must have shape (B, L, {channels}), got {tuple(t.shape)}")


class CrossAttention(nn.Module):
    """Latents (B, N, q_dim) attend to an input (B, M, kv_dim).

    LayerNorm on both sides, projections to `qk_channels` (queries, keys) and `v_channels`
    (values) split over `heads`, an output projection to `out_dim`, and, with `query_residual`,
    the latents added back. The input's LayerNorm and K/V projections go through
    `input_attention`, so nothing of size N x M is formed. `backend` as in
    `perceiver_fast.cross_attention` (None: the best one for the inputs). `dropout`: attention
    dropout on the probabilities, inside the kernel, in training mode only.

    process_group: each rank passes its own shard of the input (and of key_mask) along M, the
    latents the same on every rank; the output is the whole input's, on every rank. Made for
    training under DistributedDataParallel over the same group: see
    `perceiver_fast.nn.functional.input_attention` for how the gradients come out.
    """

    def __init__(self, q_dim: int, kv_dim: int, *, heads: int = 1, qk_channels: int | None = None,
                 v_channels: int | None = None, out_dim: int | None = None, query_residual: bool = True,
                 bias: bool = True, dropout: float = 0.0, backend: str | None = None, process_group=None):
        super().__init__()
        q_dim, kv_dim, heads = check_int("q_dim", q_dim), check_int("kv_dim", kv_dim), check_int("heads", heads)
        qk_channels = head_channels("qk_channels", qk_channels, "q_dim", q_dim, "heads", heads)
        v_channels = head_channels("v_channels", v_channels, "qk_channels", qk_channels, "heads", heads)
        out_dim = q_dim if out_dim is None else check_int("out_dim", out_dim)
        query_residual, bias = check_flag("query_residual", query_residual), check_flag("bias", bias)
        if query_residual and out_dim != q_dim:
            raise ValueError(f"query_residual needs out_dim == q_dim, got out_dim={out_dim}, q_dim={q_dim}")
        if process_group is not None:
            check_group(process_group)
        self.dropout = check_dropout_p(dropout)
        self.heads, self.query_residual, self.backend = heads, query_residual, backend
        self.process_group = process_group
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.q_norm = nn.LayerNorm(q_dim)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.q_proj = nn.Linear(q_dim, qk_channels, bias=bias)
        self.k_proj = nn.Linear(kv_dim, qk_channels, bias=bias)
        self.v_proj = nn.Linear(kv_dim, v_channels, bias=bias)
        self.out_proj = nn.Linear(v_channels, out_dim, bias=bias)

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor, key_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """latents (B, N, q_dim), inputs (B, M, kv_dim), key_mask bool (B, M) True = attend -> (B, N, out_dim)."""
        _check_sequence("latents", latents, self.q_dim)
        _check_sequence("inputs", inputs, self.kv_dim)
        if inputs.shape[0] != latents.shape[0]:
            raise ValueError(f"inputs batch {inputs.shape[0]} must equal latents batch {latents.shape[0]}")
        q = split_heads(self.q_proj(self.q_norm(latents)), self.heads)
        context = input_attention(q, inputs, norm=self.kv_norm, k_weight=self.k_proj.weight,
                                  k_bias=self.k_proj.bias, v_weight=self.v_proj.weight, v_bias=self.v_proj.bias,
                                  key_mask=key_mask, causal=causal, dropout_p=self.dropout if self.training else 0.0,
                                  backend=self.backend, process_group=self.process_group)
        out = self.out_proj(merge_heads(context))
        return out + latents if self.query_residual else out


class SelfAttention(nn.Module):
    """Latent self-attention: LayerNorm, q/k/v projections over `heads`, output projection, residual;
    `dropout` on the attention probabilities in training mode."""

    def __init__(self, dim: int, *, heads: int = 8, qk_channels: int | None = None, v_channels: int | None = None,
                 residual: bool = True, bias: bool = True, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        self.dropout = check_dropout_p(dropout)
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        qk_channels = head_channels("qk_channels", qk_channels, "dim", dim, "heads", heads)
        v_channels = head_channels("v_channels", v_channels, "qk_channels", qk_channels, "heads", heads)
        residual, bias = check_flag("residual", residual), check_flag("bias", bias)
        self.dim, self.heads, self.residual, self.backend = dim, heads, residual, backend
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, qk_channels, bias=bias)
        self.k_proj = nn.Linear(dim, qk_channels, bias=bias)
        self.v_proj = nn.Linear(dim, v_channels, bias=bias)
        self.out_proj = nn.Linear(v_channels, dim, bias=bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim)."""
        _check_sequence("x", x, self.dim)
        normed = self.norm(x)
        q, k, v = (split_heads(proj(normed), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout if self.training else 0.0
        out = self.out_proj(merge_heads(attention(q, k, v, causal=causal, dropout_p=dropout_p, backend=self.backend)))
        return out + x if self.residual else out
