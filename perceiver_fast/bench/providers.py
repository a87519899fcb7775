"""What a benchmark compares: our backends and the implementations people use today.

A provider says why it cannot run a case (`refusal`, None when it can) or builds one call of it
(`prepare`: inputs made once, the returned function runs forward, or forward and backward).
Op level: q, k, v in SDPA layout. Layer level: a full Perceiver attention layer with LayerNorms
and projections, built from HF transformers' `PerceiverAttention` (the module HF's
`PerceiverLayer` wraps) or lucidrains' `PreNorm(Attention)`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import Case

# Share of the free memory a predicted peak may take before a provider refuses to start.
MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class Provider:
    name: str
    level: str
    refusal: Callable[[Case, torch.dtype, str], str | None]
    prepare: Callable[[Case, torch.dtype, str, bool], Callable[[], object]]
    # Why it runs on the CPU in the --full set only (too slow to set up for the quick one); "" if it does not.
    full_set_only_on_cpu: str = ""


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def score_matrix_refusal(case: Case, dtype: torch.dtype, device: str, copies: int) -> str | None:
    """Refuses a provider that materialises `copies` B x H x N x M score tensors when they would not fit."""
    size = copies * case.B * case.H * case.N * case.M * torch.finfo(dtype).bits // 8
    if size > MEMORY_SHARE * free_bytes(device):
        return (f"out of memory: its {copies} score tensors need {size / 2**30:.1f} GiB, "
                f"{free_bytes(device) / 2**30:.1f} GiB free")
    return None


def _run(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool) -> Callable[[], object]:
    """One call: forward under no_grad, or forward and backward to every leaf (inputs and weights).

    The gradients are returned with the output and taken off the leaves, so that each call's
    memory holds its own gradients and none are left over from the call before.
    """
    if not backward:
        def call():
            with torch.no_grad():
                return forward()
        return call

    def call():
        out = forward()
        out.backward(torch.ones_like(out))
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return out.detach(), grads
    return call


# ---------------------------------------------------------------------------------------------
# Op level


def op_inputs(case: Case, dtype, device, backward):
    q = torch.randn(case.B, case.H, case.N, case.dqk, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(case.B, case.H, case.M, case.dqk, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn(case.B, case.H, case.M, case.dv, device=device, dtype=dtype, requires_grad=backward)
    return q, k, v


def eager(q, k, v, causal):
    """Naive attention as the HF and lucidrains Perceivers compute it: the N x M scores materialized."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        N, M = q.shape[2], k.shape[2]
        keep = torch.ones(N, M, dtype=torch.bool, device=q.device).tril(M - N)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q, k, v, causal):
    """F.scaled_dot_product_attention, bottom-right causal as ours (causal_lower_right)."""
    mask = None
    if causal:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _op_provider(name: str, fn, refusal=None, full_set_only_on_cpu: str = "") -> Provider:
    def prepare(case, dtype, device, backward):
        q, k, v = op_inputs(case, dtype, device, backward)
        return _run(lambda: fn(q, k, v, case), [q, k, v], backward)

    return Provider(name, "op", refusal or (lambda case, dtype, device: None), prepare, full_set_only_on_cpu)


def _flex_refusal(case, dtype, device):
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no FlexAttention"
    return None


def _flex(q, k, v, case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if "_compiled_flex" not in globals():
        _compiled_flex = torch.compile(flex_attention)
    block_mask = None
    if case.causal:
        offset = case.M - case.N
        block_mask = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, case.N, case.M,
                                       device=q.device)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def _flash_attn_refusal(case, dtype, device):
    if device != "cuda":
        return "flash-attn runs on CUDA only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if max(case.dqk, case.dv) > 256 or case.dqk != case.dv:
        return f"flash-attn needs dqk == dv <= 256, got {case.dqk}/{case.dv}"
    if dtype == torch.float32:
        return "flash-attn runs float16/bfloat16 only"
    return None


def _flash_attn(q, k, v, case):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=case.causal)
    return out.transpose(1, 2)


def _ours(backend: str | None) -> Provider:
    import perceiver_fast as pf

    def fn(q, k, v, case):
        if case.kind == "latent":
            return pf.latent_attention(q, k, v, causal=case.causal, backend=backend)
        return pf.cross_attention(q, k, v, causal=case.causal, backend=backend)

    def refusal(case, dtype, device):
        from ..backends import get_backend
        from ..validation import validate

        meta = [torch.empty(case.B, case.H, rows, dim, dtype=dtype, device=device)
                for rows, dim in ((case.N, case.dqk), (case.M, case.dqk), (case.M, case.dv))]
        problem = validate(*meta, causal=case.causal, kind="latent" if case.kind == "latent" else "cross")
        # As auto dispatch would judge it: the Triton interpreter is not timed.
        return "; ".join(get_backend(backend).refusals(problem, explicit=False)) or None

    return _op_provider(f"perceiver_fast[{backend}]", fn, refusal)


def op_providers() -> list[Provider]:
    """Every fast backend of ours (the reference is for checking), then the references."""
    from ..backends import BACKEND_NAMES

    return ([_ours(b) for b in BACKEND_NAMES if b != "reference"]
            + [_op_provider("eager", lambda q, k, v, case: eager(q, k, v, case.causal),
                            lambda case, dtype, device: score_matrix_refusal(case, dtype, device, 3)),
               _op_provider("sdpa", lambda q, k, v, case: sdpa(q, k, v, case.causal)),
               _op_provider("flex_attention", _flex, _flex_refusal,
                            "compiled per shape (about 20 s each on the 2-core CPU): in the --full set only"),
               _op_provider("flash_attn", _flash_attn, _flash_attn_refusal)])


# ---------------------------------------------------------------------------------------------
# Layer level


def hf_attention(case: Case, dtype, device):
    """HF's PerceiverAttention: the cross-attention layer (latents -> input) or a latent self-attention layer."""
    from transformers import PerceiverConfig
    from transformers.models.perceiver.modeling_perceiver import PerceiverAttention

    cross = case.kind != "latent"
    layer = PerceiverAttention(PerceiverConfig(attention_probs_dropout_prob=0.0), is_cross_attention=cross,
                               qk_channels=case.H * case.dqk, v_channels=case.H * case.dv, num_heads=case.H,
                               q_dim=case.latent_dim, kv_dim=case.C if cross else case.latent_dim,
                               use_query_residual=True)
    return layer.eval().to(device, dtype)


def sdpa_layer_forward(layer, latents, inputs, causal: bool):
    """HF PerceiverAttention's computation with SDPA in place of its eager attention."""
    attn = layer.self
    q = attn.query(attn.layernorm1(latents))
    normed = attn.layernorm2(inputs) if inputs is not None else attn.layernorm1(latents)
    k, v = attn.key(normed), attn.value(normed)
    q, k, v = (t.view(t.shape[0], t.shape[1], attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = sdpa(q, k, v, causal).transpose(1, 2).flatten(2)
    return layer.output(out) + latents


def _layer_inputs(case: Case, dtype, device, backward):
    latents = torch.randn(case.B, case.N, case.latent_dim, device=device, dtype=dtype, requires_grad=backward)
    if case.kind == "latent":
        return latents, None
    return latents, torch.randn(case.B, case.M, case.C, device=device, dtype=dtype, requires_grad=backward)


def _needs(module: str):
    def refusal(case, dtype, device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install perceiver-fast[test])"
        if case.causal:
            return "causal layers are not in this layer suite"
        return None
    return refusal


def _with_memory_check(refusal, copies):
    def check(case, dtype, device):
        return refusal(case, dtype, device) or (score_matrix_refusal(case, dtype, device, copies) if copies else None)
    return check


def _hf_provider(name: str, patched: bool, use_sdpa: bool) -> Provider:
    def prepare(case, dtype, device, backward):
        layer = hf_attention(case, dtype, device)
        if patched:
            import perceiver_fast as pf

            pf.patch(layer)
        latents, inputs = _layer_inputs(case, dtype, device, backward)
        if use_sdpa:
            forward = lambda: sdpa_layer_forward(layer, latents, inputs, False)  # noqa: E731
        else:
            forward = lambda: layer(latents, inputs=inputs)[0]  # noqa: E731
        leaves = [t for t in (latents, inputs) if t is not None] + list(layer.parameters())
        return _run(forward, leaves, backward)

    copies = 0 if patched or use_sdpa else 3  # HF keeps scores, probabilities and their dropout output
    return Provider(name, "layer", _with_memory_check(_needs("transformers"), copies), prepare)


def lucidrains_block(case: Case, dtype, device):
    """lucidrains' cross-attention block: PreNorm(Attention) with a context norm, as in its Perceiver."""
    from perceiver_pytorch.perceiver_pytorch import Attention, PreNorm

    context = case.C if case.kind != "latent" else None
    block = PreNorm(case.latent_dim, Attention(case.latent_dim, context, heads=case.H, dim_head=case.dqk),
                    context_dim=context)
    return block.eval().to(device, dtype)


def _lucidrains_provider(name: str, patched: bool) -> Provider:
    def refusal(case, dtype, device):
        if case.dqk != case.dv:
            return "lucidrains' Attention has one head dim for q/k and v"
        return None

    def prepare(case, dtype, device, backward):
        block = lucidrains_block(case, dtype, device)
        if patched:
            import perceiver_fast as pf

            pf.patch(block)
        latents, inputs = _layer_inputs(case, dtype, device, backward)
        kwargs = {} if inputs is None else {"context": inputs}
        leaves = [t for t in (latents, inputs) if t is not None] + list(block.parameters())
        return _run(lambda: block(latents, **kwargs), leaves, backward)

    needs = _needs("perceiver_pytorch")
    return Provider(name, "layer",
                    _with_memory_check(lambda c, d, dev: needs(c, d, dev) or refusal(c, d, dev), 0 if patched else 2),
                    prepare)


def layer_providers() -> list[Provider]:
    return [_hf_provider("HF + pf.patch", patched=True, use_sdpa=False),
            _hf_provider("HF", patched=False, use_sdpa=False),
            _hf_provider("HF on SDPA", patched=False, use_sdpa=True),
            _lucidrains_provider("lucidrains + pf.patch", patched=True),
            _lucidrains_provider("lucidrains", patched=False)]


def providers_for(level: str) -> list[Provider]:
    return op_providers() if level == "op" else layer_providers()
