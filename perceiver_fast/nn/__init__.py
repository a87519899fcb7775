"""Perceiver modules on the fused attention: cross-attention, latent self-attention, layers, encoder."""

from .attention import CrossAttention, SelfAttention
from .functional import input_attention
from .perceiver import MLP, PerceiverEncoder, PerceiverLayer

__all__ = ["CrossAttention", "SelfAttention", "MLP", "PerceiverLayer", "PerceiverEncoder", "input_attention"]
