"""lucidrains perceiver-pytorch: `Perceiver` and `PerceiverIO`. The unit swapped is `PreNorm` around an
`Attention` (so the input's LayerNorm is inside the fused call), and a bare `Attention` where it is
used without one. K and V weights are the two halves of the fused `to_kv`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from perceiver_pytorch import perceiver_io as io
from perceiver_pytorch import perceiver_pytorch as pp
from torch import nn

from ..nn.functional import attention, input_attention, layer_norm, merge_heads, split_heads
from .masks import NotPerKey, key_mask_from_bool, settled_reason
from .registry import FastModule, Swap, attention_dropout, bypass_reason, device_reason, dropout_reason

ATTENTION_CLASSES = (pp.Attention, io.Attention)


def _unfused_reason(module, attn, x, context, mask, inverted_attention) -> tuple[str | None, torch.Tensor | None]:
    """(why the library's computation must run, or None; the key mask, True = attend). module is the
    patched one: attn itself or the PreNorm around it."""
    reason, key_mask, keys = _call_reason(module, attn, x, context, mask, inverted_attention)
    reason = settled_reason(reason, key_mask, x.shape[0], x.shape[1], keys, False, module.pf_process_group)
    return reason, (None if reason else key_mask)


def _call_reason(module, attn, x, context, mask, inverted_attention) -> tuple[str | None, torch.Tensor | None, int]:
    """_unfused_reason before the check of rows without keys, and the number of keys."""
    keys = x.shape[1] if context is None else context.shape[1]
    if inverted_attention:
        return "inverted attention", None, keys
    reason = bypass_reason(module, module.pf_bypassed) or device_reason(x)
    reason = reason or dropout_reason(module, attention_dropout(attn, getattr(attn, "dropout", None)))
    if reason:
        return reason, None, keys
    if mask is not None and getattr(attn, "queries_contribute_kv", False) and context is not None:
        mask = torch.cat((mask.new_ones(mask.shape[0], x.shape[1]), mask.reshape(mask.shape[0], -1)), dim=1)
        keys += x.shape[1]
    try:
        key_mask = key_mask_from_bool(mask, x.shape[0], keys, true_means="attend")
    except NotPerKey as e:
        return str(e), None, keys
    return None, key_mask, keys


def _attend(attn, x, context, context_norm, key_mask, backend, process_group=None):
    """lucidrains Attention.forward, fused: x the (normalised) queries' input, context the raw
    key/value input (None: x itself) and context_norm its LayerNorm (None: none)."""
    q = split_heads(attn.to_q(x), attn.heads)
    dropout_p = attention_dropout(attn, getattr(attn, "dropout", None))
    k_weight, v_weight = attn.to_kv.weight.chunk(2, dim=0)
    k_bias, v_bias = attn.to_kv.bias.chunk(2) if attn.to_kv.bias is not None else (None, None)
    if context is None:
        k = split_heads(F.linear(x, k_weight, k_bias), attn.heads)
        v = split_heads(F.linear(x, v_weight, v_bias), attn.heads)
        out = attention(q, k, v, key_mask=key_mask, scale=attn.scale, dropout_p=dropout_p, backend=backend)
    else:
        if getattr(attn, "queries_contribute_kv", False):
            if process_group is not None:  # the latents would count once per rank
                raise RuntimeError("patched Attention with queries_contribute_kv cannot read an input sharded over a "
                                   "process group")
            context, context_norm = torch.cat((x, layer_norm(context, context_norm)), dim=1), None
        out = input_attention(q, context, norm=context_norm, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight,
                              v_bias=v_bias, key_mask=key_mask, scale=attn.scale, dropout_p=dropout_p,
                              backend=backend, process_group=process_group)
    return attn.to_out(merge_heads(out))


class FastAttentionMixin(FastModule):
    # K and V are projected from to_kv's weights inside the fused op; the dropout (pp.Attention's) is fused.
    pf_bypassed = {"to_kv": nn.Linear, "dropout": nn.Dropout}

    def forward(self, x, context=None, mask=None, inverted_attention=False):
        reason, key_mask = _unfused_reason(self, self, x, context, mask, inverted_attention)
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(x, context=context, mask=mask, inverted_attention=inverted_attention)
        return _attend(self, x, context, None, key_mask, self.pf_backend)


class FastPreNormMixin(FastModule):
    # the wrapped Attention's forward is done here, and the context's LayerNorm inside the fused op
    pf_bypassed = {"fn": ATTENTION_CLASSES, "norm_context": None,
                   **{f"fn.{path}": classes for path, classes in FastAttentionMixin.pf_bypassed.items()}}

    def forward(self, x, **kwargs):
        context, mask = kwargs.get("context"), kwargs.get("mask")
        reason, key_mask = _unfused_reason(self, self.fn, x, context, mask, kwargs.get("inverted_attention", False))
        if reason is None and not set(kwargs) <= {"context", "mask", "inverted_attention"}:
            reason = f"arguments {sorted(kwargs)}"
        if reason is None and context is None and self.norm_context is not None:
            reason = "no context for a PreNorm with a context norm"
        if reason is not None:
            self.pf_keep_original(reason)
            return super().forward(x, **kwargs)
        return _attend(self.fn, self.norm(x), context, self.norm_context, key_mask, self.pf_backend,
                       self.pf_process_group)


class FastAttention(FastAttentionMixin, pp.Attention):
    """perceiver_pytorch.Attention (Perceiver), fused."""


class FastIOAttention(FastAttentionMixin, io.Attention):
    """perceiver_pytorch.perceiver_io.Attention (PerceiverIO), fused."""


class FastPreNorm(FastPreNormMixin, pp.PreNorm):
    """perceiver_pytorch.PreNorm around an Attention, fused with its LayerNorms."""


class FastIOPreNorm(FastPreNormMixin, io.PreNorm):
    """perceiver_pytorch.perceiver_io.PreNorm around an Attention, fused with its LayerNorms."""


def _wraps_attention(module) -> bool:
    return isinstance(module.fn, ATTENTION_CLASSES)


def input_attentions(model):
    """The cross-attention of each PerceiverBlock that has one (Perceiver's layers, PerceiverIO's
    encoder block): it reads the data. PerceiverIO's decoder attends to the latents."""
    return [m.cross_attn for m in model.modules() if isinstance(m, pp.PerceiverBlock) and m.cross_attn is not None]


SWAPS = (Swap(pp.PreNorm, FastPreNorm, _wraps_attention, inner="fn", label="PreNorm(Attention)"),
         Swap(io.PreNorm, FastIOPreNorm, _wraps_attention, inner="fn", label="PreNorm(Attention)"),
         Swap(pp.Attention, FastAttention), Swap(io.Attention, FastIOAttention))
