"""krasserm perceiver-io (`perceiver.model.core`): `CrossAttention` and `SelfAttention` (pre-LayerNorm
units, so the input's LayerNorm is inside the fused call) and a bare `MultiHeadAttention`, including
the causal Perceiver AR configuration with rotary embeddings and a KV cache."""

from __future__ import annotations

import torch
from perceiver.model.core import modules as km
from perceiver.model.core.position import FrequencyPositionEncoding
from perceiver.model.core.utils import ModuleOutput
from torch import nn

from ..nn.functional import attention, input_attention, layer_norm, merge_heads, split_heads
from .linear_layers import activation_name, fused_linear
from .masks import NotPerKey, key_mask_from_bool, settled_reason
from .registry import FastModule, Swap, attention_dropout, bypass_reason, device_reason, dropout_reason


def _unfused_reason(module, mha, queries, kv_input, keys_in_call, pad_mask, kv_cache, process_group=None):
    """(why the library's computation must run, or None; the key mask, True = attend). module is the
    patched one: mha itself or the pre-LayerNorm unit around it."""
    reason, key_mask = _call_reason(module, mha, kv_input, keys_in_call, pad_mask, kv_cache)
    keys = keys_in_call + (kv_cache[0].shape[1] if kv_cache is not None else 0)
    reason = settled_reason(reason, key_mask, kv_input.shape[0], queries.shape[1], keys, mha.causal_attention,
                            process_group)
    return reason, (None if reason else key_mask)


def _call_reason(module, mha, kv_input, keys_in_call, pad_mask, kv_cache):
    """_unfused_reason before the check of rows without keys."""
    reason = bypass_reason(module, module.pf_bypassed) or device_reason(kv_input)
    reason = reason or dropout_reason(module, attention_dropout(mha, mha.dropout))
    if reason:
        return reason, None
    keys = keys_in_call + (kv_cache[0].shape[1] if kv_cache is not None else 0)
    try:
        key_mask = key_mask_from_bool(pad_mask, kv_input.shape[0], keys, true_means="pad")
    except NotPerKey as e:
        return str(e), None
    return None, key_mask


def _attend(mha, x_q, x_kv, kv_norm, key_mask, rot_pos_emb_q, rot_pos_emb_k, kv_cache, backend, process_group=None):
    """MultiHeadAttention.forward on x_q (normalised) and x_kv (raw, normalised here by kv_norm)."""
    heads, causal, scale = mha.num_heads, mha.causal_attention, mha.dp_scale
    dropout_p = attention_dropout(mha, mha.dropout)
    q = split_heads(mha.q_proj(x_q), heads)
    if q.shape[0] == 1 < x_kv.shape[0]:
        q = q.expand(x_kv.shape[0], -1, -1, -1)  # a decoder's query array, broadcast over the batch as the library does
    if rot_pos_emb_q is not None:
        q = rot_pos_emb_q.rotate(q)
    if kv_cache is None and rot_pos_emb_k is None and x_kv is not x_q:
        out = input_attention(q, x_kv, norm=kv_norm, k_weight=mha.k_proj.weight, k_bias=mha.k_proj.bias,
                              v_weight=mha.v_proj.weight, v_bias=mha.v_proj.bias, key_mask=key_mask, causal=causal,
                              scale=scale, dropout_p=dropout_p, backend=backend, process_group=process_group)
    else:
        normed = layer_norm(x_kv, kv_norm)
        k, v = mha.k_proj(normed), mha.v_proj(normed)
        if kv_cache is not None:
            k, v = torch.cat([kv_cache[0], k], dim=1), torch.cat([kv_cache[1], v], dim=1)
            kv_cache = (k, v)
        k, v = split_heads(k, heads), split_heads(v, heads)
        if rot_pos_emb_k is not None:
            k = rot_pos_emb_k.rotate(k)
        out = attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p, backend=backend)
    return ModuleOutput(last_hidden_state=mha.o_proj(merge_heads(out)), kv_cache=kv_cache)


class FastMultiHeadAttention(FastModule, km.MultiHeadAttention):
    """krasserm MultiHeadAttention, fused (its own q/k/v inputs, no LayerNorm)."""

    # K and V are projected inside the fused input attention; the dropout is fused.
    pf_bypassed = {"k_proj": nn.Linear, "v_proj": nn.Linear, "dropout": nn.Dropout}

    def forward(self, x_q, x_kv, pad_mask=None, rot_pos_emb_q=None, rot_pos_emb_k=None, kv_cache=None):
        reason, key_mask = _unfused_reason(self, self, x_q, x_kv, x_kv.shape[1], pad_mask, kv_cache)
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(x_q, x_kv, pad_mask, rot_pos_emb_q, rot_pos_emb_k, kv_cache)
        return _attend(self, x_q, x_kv, None, key_mask, rot_pos_emb_q, rot_pos_emb_k, kv_cache, self.pf_backend)


class FastCrossAttention(FastModule, km.CrossAttention):
    """krasserm CrossAttention (pre-LayerNorm), fused with the key/value LayerNorm. With `x_kv_prefix`
    (Perceiver AR) the keys are the prefix followed by the queries, as in the library."""

    # the MultiHeadAttention's forward is done here, and the key/value LayerNorm inside the fused op
    pf_bypassed = {"attention": km.MultiHeadAttention, "kv_norm": None,
                   **{f"attention.{path}": classes for path, classes in FastMultiHeadAttention.pf_bypassed.items()}}

    def forward(self, x_q, x_kv=None, x_kv_prefix=None, pad_mask=None, rot_pos_emb_q=None, rot_pos_emb_k=None,
                kv_cache=None):
        if self.pf_process_group is not None and (x_kv is None or kv_cache is not None or rot_pos_emb_k is not None):
            raise RuntimeError("patched CrossAttention sharded over a process group reads a plain input only: no "
                               "prefix, KV cache or rotary keys (Perceiver AR is not sharded)")
        kv_input = x_kv if x_kv is not None else x_kv_prefix
        keys = x_kv.shape[1] if x_kv is not None else x_kv_prefix.shape[1] + x_q.shape[1]
        reason, key_mask = _unfused_reason(self, self.attention, x_q, kv_input, keys, pad_mask, kv_cache,
                                           self.pf_process_group)
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(x_q, x_kv, x_kv_prefix, pad_mask, rot_pos_emb_q, rot_pos_emb_k, kv_cache)
        normed_q = self.q_norm(x_q)
        kv_norm = self.kv_norm
        if x_kv is None:
            x_kv, kv_norm = torch.cat([self.kv_norm(x_kv_prefix), normed_q], dim=1), None
        return _attend(self.attention, normed_q, x_kv, kv_norm, key_mask, rot_pos_emb_q, rot_pos_emb_k, kv_cache,
                       self.pf_backend, self.pf_process_group)


class FastSelfAttention(FastModule, km.SelfAttention):
    """krasserm SelfAttention (pre-LayerNorm), fused."""

    # the MultiHeadAttention's forward is done here; it calls k_proj and v_proj, and the dropout is fused
    pf_bypassed = {"attention": km.MultiHeadAttention, "attention.dropout": nn.Dropout}

    def forward(self, x, pad_mask=None, rot_pos_emb=None, kv_cache=None):
        reason, key_mask = _unfused_reason(self, self.attention, x, x, x.shape[1], pad_mask, kv_cache)
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(x, pad_mask, rot_pos_emb, kv_cache)
        normed = self.norm(x)
        return _attend(self.attention, normed, normed, None, key_mask, rot_pos_emb, rot_pos_emb, kv_cache,
                       self.pf_backend)


class FastMLP(FastModule, km.MLP):
    """LayerNorm, then the GELU fused into the first linear layer. An MLP whose GELU is of another
    kind or has hooks runs as krasserm's."""

    def forward(self, x):
        if len(self) != 4 or activation_name(self[2]) is None:
            return super().forward(x)
        norm, first, act, second = self
        activation = activation_name(act)
        return ModuleOutput(last_hidden_state=fused_linear(second, fused_linear(first, norm(x), activation)))


class FastFrequencyPositionEncoding(FastModule, FrequencyPositionEncoding):
    """The rotary embeddings' angles with the integer positions cast to the frequencies' dtype first:
    the same values (positions are exact in float32 up to 2^24), from an einsum of one dtype, which ONNX
    requires (krasserm's multiplies int64 by float, which ONNX Runtime and OpenVINO refuse to load)."""

    def forward(self, abs_pos):
        return super().forward(abs_pos.to(self.inv_freq.dtype))


def input_attentions(model):
    """The cross-attention layers of each PerceiverEncoder (all of them read the encoder's input)."""
    return [m for encoder in model.modules() if isinstance(encoder, km.PerceiverEncoder)
            for m in encoder.modules() if isinstance(m, km.CrossAttention)]


SWAPS = (Swap(km.CrossAttention, FastCrossAttention, inner="attention"),
         Swap(km.SelfAttention, FastSelfAttention, inner="attention"),
         Swap(km.MultiHeadAttention, FastMultiHeadAttention),
         Swap(km.MLP, FastMLP, linear=True),
         Swap(FrequencyPositionEncoding, FastFrequencyPositionEncoding))
