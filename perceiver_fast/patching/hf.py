"""HF transformers Perceiver models: `PerceiverSelfAttention` (encoder cross-attention, latent
self-attention, decoders) and `PerceiverModel`, whose padding mask is kept at O(B * M); with the
linear layers patched, the epilogues fused into them: `PerceiverLayer` (the MLP's GELU and the
residual add), `PerceiverAttention` (the query residual) and `PerceiverEmbeddingDecoder` (its bias)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.perceiver import modeling_perceiver as hf

from ..linear import linear
from ..nn.functional import attention, input_attention, merge_heads, split_heads
from .linear_layers import activation_name, fused_linear, linear_backend
from .masks import MaskShapeError, NotPerKey, additive_to_key_mask, mask_shape_error, settled_reason
from .registry import (FastModule, Swap, attention_dropout, bypass_reason, device_reason, dropout_reason, original_class,
                       wrapper_of)


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
        reason = "output_attentions=True" if output_attentions else (
            bypass_reason(self, self.pf_bypassed) or device_reason(source))
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


class FastPerceiverLayer(FastModule, hf.PerceiverLayer):
    """The MLP's GELU fused into its first linear layer, the residual add into its second. A chunked
    feed-forward (chunk_size_feed_forward), or an MLP that is wrapped, of another class or with
    another activation, runs as HF's."""

    def forward(self, hidden_states, attention_mask=None, inputs=None, inputs_mask=None, output_attentions=False):
        if self.chunk_size_feed_forward:
            return super().forward(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
        attention_outputs = self.attention(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
        attention_output = attention_outputs[0]
        mlp, normed = self.mlp, self.layernorm(attention_output)
        activation = activation_name(mlp.intermediate_act_fn)
        if original_class(type(mlp)) is hf.PerceiverMLP and wrapper_of(mlp) is None and activation is not None:
            hidden = fused_linear(mlp.dense1, normed, activation)
            layer_output = fused_linear(mlp.dense2, hidden, residual=attention_output)
        else:
            layer_output = mlp(normed) + attention_output
        return (layer_output,) + attention_outputs[1:]


class FastPerceiverAttention(FastModule, hf.PerceiverAttention):
    """The query residual added in the output projection's epilogue."""

    def forward(self, hidden_states, attention_mask=None, inputs=None, inputs_mask=None, output_attentions=False):
        self_outputs = self.self(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
        residual = hidden_states if self.use_query_residual else None
        if original_class(type(self.output)) is hf.PerceiverSelfOutput and wrapper_of(self.output) is None:
            attention_output = fused_linear(self.output.dense, self_outputs[0], residual=residual)
        else:
            attention_output = self.output(self_outputs[0])
            attention_output = attention_output if residual is None else attention_output + residual
        return (attention_output,) + self_outputs[1:]


class FastPerceiverEmbeddingDecoder(FastModule, hf.PerceiverEmbeddingDecoder):
    """The logits over the vocabulary as one linear op on the input embedding's weight, the bias fused."""

    def forward(self, hidden_states: torch.Tensor, embedding_layer: torch.Tensor) -> torch.Tensor:
        batch, length, channels = hidden_states.shape
        logits = linear(hidden_states.reshape(-1, channels), embedding_layer.weight, self.bias,
                        backend=linear_backend(self.pf_backend))
        return logits.reshape(batch, length, self.vocab_size)


def input_attentions(model):
    """The attention of each PerceiverEncoder's cross-attention layer: it reads the model's input."""
    return [m.cross_attention.attention.self for m in model.modules() if isinstance(m, hf.PerceiverEncoder)]


SWAPS = (Swap(hf.PerceiverSelfAttention, FastPerceiverSelfAttention),
         Swap(hf.PerceiverModel, FastPerceiverModel),
         Swap(hf.PerceiverLayer, FastPerceiverLayer, linear=True),
         Swap(hf.PerceiverAttention, FastPerceiverAttention, linear=True),
         Swap(hf.PerceiverEmbeddingDecoder, FastPerceiverEmbeddingDecoder, linear=True))
