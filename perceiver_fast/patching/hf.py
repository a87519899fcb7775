"""HF transformers Perceiver models: `PerceiverSelfAttention` (encoder cross-attention, latent
self-attention, decoders) and `PerceiverModel`, whose padding mask is kept at O(B * M)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.perceiver import modeling_perceiver as hf

from ..nn.functional import attention, input_attention, merge_heads, split_heads
from .masks import MaskShapeError, NotPerKey, additive_to_key_mask, mask_shape_error, settled_reason
from .registry import FastModule, Swap, attention_dropout, bypass_reason, dropout_reason


class FastPerceiverSelfAttention(FastModule, hf.PerceiverSelfAttention):
    """Same forward signature and outputs; the attention runs fused, with the configured attention
    dropout inside the kernels in training. With output_attentions, a mask that is not per key, or a
    query with no key to attend, it runs HF's code. A mask that does not fit the keys raises
    MaskShapeError (a ValueError) where HF's would fail to broadcast."""

    # K and V are projected inside the fused input attention (self-attention calls key and value,
    # but which one a module is shows only in its call); the dropout is fused.
    pf_bypassed = {"key": nn.Linear, "value": nn.Linear, "layernorm2": None, "dropout": nn.Dropout}

    def forward(self, hidden_states, attention_mask=None, inputs=None, inputs_mask=None, output_attentions=False):
        cross = inputs is not None
        source = inputs if cross else hidden_states
        batch, keys = source.shape[0], source.shape[1]
        mask = inputs_mask if cross else attention_mask
        group = self.pf_process_group
        reason = "output_attentions=True" if output_attentions else bypass_reason(self, self.pf_bypassed)
        wrong_shape = mask_shape_error("inputs_mask" if cross else "attention_mask", mask, batch, keys)
        if wrong_shape is not None:
            if group is None:
                raise wrong_shape
            reason = str(wrong_shape)  # sharded: the ranks settle the call together first, then all of them raise
        dropout_p = 0.0 if reason else attention_dropout(self, self.dropout)
        reason = reason or dropout_reason(self, dropout_p)
        key_mask = None
        if reason is None:
            try:
                key_mask = additive_to_key_mask(mask, batch, keys)
            except NotPerKey as e:
                reason = str(e)
        reason = settled_reason(reason, key_mask, batch, hidden_states.shape[1], keys, False, group)
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)

        normed = self.layernorm1(hidden_states)
        q = split_heads(self.query(normed), self.num_heads)
        if cross:
            context = input_attention(q, inputs, norm=self.layernorm2, k_weight=self.key.weight,
                                      k_bias=self.key.bias, v_weight=self.value.weight, v_bias=self.value.bias,
                                      key_mask=key_mask, dropout_p=dropout_p, backend=self.pf_backend,
                                      process_group=group)
        else:
            k = split_heads(self.key(normed), self.num_heads)
            v = split_heads(self.value(normed), self.num_heads)
            context = attention(q, k, v, key_mask=key_mask, dropout_p=dropout_p, backend=self.pf_backend)
        return (merge_heads(context),)


class FastPerceiverModel(FastModule, hf.PerceiverModel):
    """Hands the encoder a padding mask of O(B * M) memory: the (B, 1, N, M) additive mask HF
    builds, as a stride-0 expansion of one row per batch item (HF passes 4-D masks through)."""

    def forward(self, inputs, attention_mask=None, *args, **kwargs):
        given_mask = attention_mask
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            dtype = self.embeddings.latents.dtype
            batch, keys = attention_mask.shape
            device = self.embeddings.latents.device  # where HF itself puts the mask
            row = torch.zeros(batch, 1, 1, keys, dtype=dtype, device=device)
            keep = attention_mask.to(device=device, dtype=torch.bool)
            row.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)
            attention_mask = row.expand(batch, 1, self.embeddings.latents.shape[0], keys)
        try:
            return super().forward(inputs, attention_mask, *args, **kwargs)
        except MaskShapeError as e:  # the number of inputs is known only after HF's input preprocessor
            raise ValueError(f"attention_mask of shape {tuple(given_mask.shape)} does not fit the inputs: expected "
                             f"({e.batch}, {e.keys}), one entry per input ({e.keys} after the input preprocessor)"
                             ) from e


def input_attentions(model):
    """The attention of each PerceiverEncoder's cross-attention layer: it reads the model's input."""
    return [m.cross_attention.attention.self for m in model.modules() if isinstance(m, hf.PerceiverEncoder)]


SWAPS = (Swap(hf.PerceiverSelfAttention, FastPerceiverSelfAttention),
         Swap(hf.PerceiverModel, FastPerceiverModel))
