"""Perceiver layers (attention + MLP, each with a residual) and an encoder built from them."""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import check_int, type_name
from .attention import CrossAttention, SelfAttention, check_heads_divide, head_channels


class MLP(nn.Module):
    """Pre-LayerNorm two-layer MLP with GELU, widened by `widening`."""

    def __init__(self, dim: int, widening: int = 4):
        super().__init__()
        dim, widening = check_int("dim", dim), check_int("widening", widening)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, widening * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(widening * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    """An attention module (which adds its own residual) followed by a residual MLP."""

    def __init__(self, attention: CrossAttention | SelfAttention, widening: int = 4):
        super().__init__()
        if not isinstance(attention, (CrossAttention, SelfAttention)):
            raise TypeError(f"attention must be a perceiver_fast.nn CrossAttention or SelfAttention, "
                            f"got {type_name(attention)}")
        dim = attention.out_proj.out_features
        self.attention = attention
        self.mlp = MLP(dim, widening)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.attention(x, *args, **kwargs)
        return x + self.mlp(x)


class PerceiverEncoder(nn.Module):
    """Learned latents read an input by cross-attention, then `blocks` passes through shared self-attention layers.

    forward(inputs (B, M, input_dim), key_mask bool (B, M) True = attend) -> latents (B, num_latents, latent_dim).
    With a process_group, inputs and key_mask are this rank's shard along M (see CrossAttention);
    everything after the cross-attention runs replicated. `dropout`: the attention dropout of every
    attention module, in training mode (not with a process_group).
    """

    def __init__(self, input_dim: int, *, num_latents: int = 512, latent_dim: int = 1024, cross_heads: int = 1,
                 cross_qk_channels: int | None = None, cross_v_channels: int | None = None, self_heads: int = 8,
                 self_layers: int = 6, blocks: int = 1, widening: int = 1, dropout: float = 0.0,
                 backend: str | None = None, process_group=None):
        super().__init__()
        # Checked here, not only by the modules built below, so that an error names this constructor's argument.
        input_dim, latent_dim = check_int("input_dim", input_dim), check_int("latent_dim", latent_dim)
        num_latents, widening = check_int("num_latents", num_latents), check_int("widening", widening)
        self_layers, blocks = check_int("self_layers", self_layers, minimum=0), check_int("blocks", blocks)
        cross_heads, self_heads = check_int("cross_heads", cross_heads), check_int("self_heads", self_heads)
        cross_qk_channels = head_channels("cross_qk_channels", cross_qk_channels, "latent_dim", latent_dim,
                                          "cross_heads", cross_heads)
        head_channels("cross_v_channels", cross_v_channels, "cross_qk_channels", cross_qk_channels, "cross_heads",
                      cross_heads)
        check_heads_divide("latent_dim", latent_dim, "self_heads", self_heads)
        self.blocks = blocks
        self.latents = nn.Parameter(torch.empty(num_latents, latent_dim))
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.cross = PerceiverLayer(CrossAttention(latent_dim, input_dim, heads=cross_heads,
                                                   qk_channels=cross_qk_channels, v_channels=cross_v_channels,
                                                   dropout=dropout, backend=backend, process_group=process_group),
                                    widening)
        self.self_attends = nn.ModuleList(
            PerceiverLayer(SelfAttention(latent_dim, heads=self_heads, dropout=dropout, backend=backend), widening)
            for _ in range(self_layers))

    def forward(self, inputs: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a (B, M, C) tensor, got {type_name(inputs)}")
        if inputs.dim() != 3:
            raise ValueError(f"inputs must be a (B, M, C) tensor, got shape {tuple(inputs.shape)}")
        x = self.latents.expand(inputs.shape[0], -1, -1)
        x = self.cross(x, inputs, key_mask)
        for _ in range(self.blocks):
            for layer in self.self_attends:
                x = layer(x)
        return x
