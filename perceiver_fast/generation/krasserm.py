"""Prefill and decode steps of krasserm perceiver-io's Perceiver AR (`CausalSequenceModel`) over a
DecodeCache: the model's own cached forward (`PerceiverAR.forward` with `kv_cache`), computed with
the library's fused attention, keys rotated once when written, and nothing copied but the new
position. The model's layers run as they are (LayerNorms, projections, MLPs, output head); only the
attention and the cache are the library's. Dropout never applies: generation runs as in eval mode."""

from __future__ import annotations

import torch

from ..attention import cross_attention, latent_attention
from ..nn.functional import merge_heads
from .cache import DecodeCache


def causal_sequence_model_class():
    """krasserm's CausalSequenceModel, or None when perceiver-io is not installed."""
    try:
        from perceiver.model.core.modules import CausalSequenceModel
    except ImportError:
        return None
    return CausalSequenceModel


def rotate(t: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """krasserm's rotary embedding (`RotaryPositionEmbedding.rotate`) of t (B, n, H, D) at positions
    whose encodings are `frequencies` (B, n, R): the first R channels of each head, as pairs."""
    rotated = frequencies.shape[-1]
    cos, sin = frequencies.cos()[:, :, None], frequencies.sin()[:, :, None]
    part, rest = t[..., :rotated], t[..., rotated:]
    pairs = part.unflatten(-1, (-1, 2))
    half_turn = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((part * cos + half_turn * sin, rest), dim=-1).to(t.dtype)


class _Attention:
    """One pre-LayerNorm attention of the model: its projections, heads and scale."""

    def __init__(self, mha):
        self.mha, self.heads, self.scale = mha, mha.num_heads, mha.dp_scale

    def keys(self, normed: torch.Tensor, frequencies: torch.Tensor | None):
        """(k (B, n, Cqk) rotated when frequencies are given, v (B, n, Cv)) of normalised inputs."""
        k = self.mha.k_proj(normed)
        if frequencies is not None:
            k = rotate(k.unflatten(-1, (self.heads, -1)), frequencies).flatten(-2)
        return k, self.mha.v_proj(normed)

    def queries(self, normed: torch.Tensor, frequencies: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, n, Dqk), scaled then rotated as krasserm's MultiHeadAttention does."""
        q = self.mha.q_proj(normed).unflatten(-1, (self.heads, -1)) * self.scale
        if frequencies is not None:
            q = rotate(q, frequencies)
        return q.transpose(1, 2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        return self.mha.o_proj(merge_heads(out))


class KrassermPerceiverAR:
    """The decode path of one krasserm `CausalSequenceModel`. Reads the model's modules, holds no
    state of a generation (that is the DecodeCache's)."""

    def __init__(self, model: torch.nn.Module, backend: str | None):
        from perceiver.model.core.utils import Residual

        self.model, self.backend = model, backend
        cross_layer, self.latent_layers = model.cross_attention, list(model.self_attention)
        if not isinstance(cross_layer[0], Residual):
            raise TypeError("model: its cross-attention layer has no residual around the attention "
                            "(attention_residual=False), which this decode path does not cover")
        self.cross_unit, self.cross_mlp = cross_layer[0].module, cross_layer[1].module
        self.cross = _Attention(self.cross_unit.attention)
        self.latent = [_Attention(layer[0].module.attention) for layer in self.latent_layers]
        rotary_layers = model.self_attention.num_rotary_layers
        self.rotary = [rotary_layers == -1 or i < rotary_layers for i in range(len(self.latent_layers))]
        self.adapter = model.input_adapter
        self.max_seq_len, self.max_latents = model.max_seq_len, model.max_latents

    @property
    def parameter(self) -> torch.Tensor:
        return next(self.model.parameters())

    def new_cache(self, batch: int, padded: bool) -> DecodeCache:
        cross, latent = self.cross.mha, self.latent[0].mha if self.latent else self.cross.mha
        p = self.parameter
        return DecodeCache(batch, self.max_seq_len, self.max_latents, len(self.latent), self.cross.heads,
                           (cross.num_qk_channels, cross.num_v_channels),
                           (latent.num_qk_channels, latent.num_v_channels), p.dtype, p.device, padded)

    def _embed(self, tokens: torch.Tensor, embedding_positions: torch.Tensor, rotary_positions: torch.Tensor):
        """(embedded tokens (B, n, C), rotary frequencies (B, n, R)). krasserm's absolute position
        embedding counts positions inside the window of the last max_seq_len; rotary counts from the
        sequence start, which gives the same scores (rotary sees only differences of positions)."""
        x, _ = self.adapter(tokens, abs_pos=embedding_positions)
        return x, self.adapter.frq_pos_encoding(rotary_positions)

    def _latent_stack(self, cache: DecodeCache, x: torch.Tensor, frequencies: torch.Tensor,
                      prefill: bool) -> torch.Tensor:
        """The latent self-attention layers on the newest latents x (B, n, C), each writing its cache:
        causal over the prompt's latents at prefill, one new latent over the cached ones after."""
        for layer, attention, ring, rotary in zip(self.latent_layers, self.latent, cache.latents, self.rotary):
            unit, mlp = layer[0].module, layer[1].module
            normed = unit.norm(x)
            used = frequencies if rotary else None
            ring.write(*attention.keys(normed, used))
            q = attention.queries(normed, used)
            k, v, _ = ring.attention_operands()  # krasserm's latent self-attention takes no padding mask
            if prefill:
                out = latent_attention(q, k, v, causal=True, scale=1.0, backend=self.backend)
            else:
                out = cross_attention(q, k, v, scale=1.0, backend=self.backend)
            x = attention.output(out) + x
            x = mlp(x).last_hidden_state + x
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next token's logits (B, vocab) from the last latent's state."""
        x = x[:, -1:]
        if self.model.config.output_norm:
            x = self.model.out_norm(x)
        return self.model.output_adapter(x, txt_embedding=self.adapter.txt_embedding)[:, -1]

    def prefill(self, cache: DecodeCache, tokens: torch.Tensor, prefix_len: int, pads: torch.Tensor) -> torch.Tensor:
        """krasserm's forward of the prompt tokens (B, L) with `prefix_len`, left padding of pads (B,)
        tokens per row: fills the empty cache, returns the next token's logits (B, vocab)."""
        length = tokens.shape[1]
        positions = (torch.arange(length, device=tokens.device) - pads[:, None]).clamp(min=0)
        x, frequencies = self._embed(tokens, positions, positions)
        latents, attention = x[:, prefix_len:], self.cross
        normed_latents = self.cross_unit.q_norm(latents)
        keep = None if cache.cross.key_mask is None else torch.arange(length, device=tokens.device) >= pads[:, None]
        if prefix_len:
            # krasserm normalises prefix keys with kv_norm and latent keys with q_norm
            normed_prefix = self.cross_unit.kv_norm(x[:, :prefix_len])
            cache.cross.write(*attention.keys(normed_prefix, frequencies[:, :prefix_len]),
                              None if keep is None else keep[:, :prefix_len])
        cache.cross.write(*attention.keys(normed_latents, frequencies[:, prefix_len:]),
                          None if keep is None else keep[:, prefix_len:])
        q = attention.queries(normed_latents, frequencies[:, prefix_len:])
        k, v, key_mask = cache.cross.attention_operands()
        out = cross_attention(q, k, v, key_mask=key_mask, causal=True, scale=1.0, backend=self.backend)
        x = attention.output(out) + latents
        x = self.cross_mlp(x).last_hidden_state + x
        return self._logits(self._latent_stack(cache, x, frequencies[:, prefix_len:], prefill=True))

    def step(self, cache: DecodeCache, tokens: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        """One decode step: the newest tokens (B,) become the newest latents, attend over the caches
        (writing their keys), and give the next token's logits (B, vocab)."""
        position = cache.cross.written  # this token's index in the sequence
        slid = max(0, position + 1 - self.max_seq_len)  # positions that have left the window
        window_pads = (pads - slid).clamp(min=0)
        embedding_position = (position - slid - window_pads).clamp(min=0)[:, None]
        rotary_position = (position - pads).clamp(min=0)[:, None]
        x, frequencies = self._embed(tokens[:, None], embedding_position, rotary_position)
        attention = self.cross
        normed = self.cross_unit.q_norm(x)
        key_mask = None if cache.cross.key_mask is None else torch.ones_like(tokens, dtype=torch.bool)[:, None]
        cache.cross.write(*attention.keys(normed, frequencies), key_mask)
        k, v, key_mask = cache.cross.attention_operands()
        out = cross_attention(attention.queries(normed, frequencies), k, v, key_mask=key_mask, scale=1.0,
                              backend=self.backend)
        x = attention.output(out) + x
        x = self.cross_mlp(x).last_hidden_state + x
        return self._logits(self._latent_stack(cache, x, frequencies, prefill=False))
