"""What a benchmark compares: our backends and the implementations people use today.

A provider says why it cannot run a case (`refusal`, None when it can), may predict the memory
its call needs (`predicted_bytes`, checked against the free memory before it starts) and builds
one call of it (`prepare`: inputs made once, the returned function runs forward, or forward and
backward). Op level: q, k, v in SDPA layout. Layer level: a full Perceiver attention layer with
LayerNorms and projections, built from HF transformers' `PerceiverAttention` (the module HF's
`PerceiverLayer` wraps) or lucidrains' `PreNorm(Attention)`. Model level: model_providers.py; each
level's list: levels.py.
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
    # Bytes its call holds at its peak above the inputs, given whether it runs the backward; None: small.
    predicted_bytes: Callable[[Case, torch.dtype, bool], int] | None = None
    # Why it runs on the CPU in the --full set only (too slow to set up for the quick one); "" if it does not.
    full_set_only_on_cpu: str = ""
    # Which of a library's kernels runs the case (SDPA: flash, efficient, cudnn or math); None: one kernel.
    kernel: Callable[[Case, torch.dtype, str, bool], str] | None = None
    # Its call runs the cpu backend's attention kernels: on the CPU, measure() times them by phase too.
    cpu_phases: bool = False
    # More fields of its row, from (case, dtype, device, call, what the measured call returned).
    extras: Callable[[Case, torch.dtype, str, Callable[[], object], object], dict] | None = None


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_refusal(needed: int, device: str) -> str | None:
    free = free_bytes(device)
    if needed > MEMORY_SHARE * free:
        return (f"out of memory predicted: needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                f"(a provider may take {MEMORY_SHARE:.0%})")
    return None


def why_not(provider: Provider, case: Case, dtype: torch.dtype, device: str, backward: bool,
            full: bool) -> str | None:
    """Why `provider` does not run `case` in this run, None when it does: its own refusal, a predicted
    peak that does not fit, or a set-up too slow for a CPU run outside the full set (`full`)."""
    reason = provider.refusal(case, dtype, device)
    if not reason and provider.predicted_bytes:
        reason = memory_refusal(provider.predicted_bytes(case, dtype, backward), device)
    if not reason and device == "cpu" and not full:
        reason = provider.full_set_only_on_cpu
    return reason or None


def with_backward(forward_bytes: Callable[[Case, torch.dtype], int]) -> Callable[[Case, torch.dtype, bool], int]:
    """predicted_bytes from a forward's peak: a backward keeps the forward's tensors and makes gradients as
    large, so twice it (measured on the 2-core CPU: 1.3x to 1.9x for eager attention and the unfused layers)."""
    return lambda case, dtype, backward: forward_bytes(case, dtype) * (2 if backward else 1)


def score_bytes(case: Case, dtype: torch.dtype) -> int:
    """One B x H x N x M score tensor."""
    return case.B * case.H * case.N * case.M * torch.finfo(dtype).bits // 8


def make_call(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool,
              optimizer: torch.optim.Optimizer | None = None) -> Callable[[], object]:
    """One call: forward under no_grad, or forward and backward to every leaf (inputs and weights),
    then the optimizer's step where one is given (a training step; its parameters' gradients are
    set to None after it).

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
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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


def sdpa_kernel(case: Case, dtype, device: str, backward: bool, causal: bool | None = None) -> str:
    """The kernel F.scaled_dot_product_attention picks for contiguous q, k, v of the case's shapes, as
    sdpa() passes them (causal: the case's unless given): "flash", "efficient", "cudnn" or "math".
    Bottom-right causal with N != M goes through torch.nn.attention.bias: CUDA's flash, then
    efficient, else SDPA again with the mask materialized (which SDPA then chooses a kernel for)."""
    causal = case.causal if causal is None else causal
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    from torch.nn.attention import SDPBackend

    def empty(length, dim):  # strides and flags are all the choice reads; the values are never touched
        return torch.empty(case.B, case.H, length, dim, dtype=dtype, device=device, requires_grad=backward)

    q, k, v = empty(case.N, case.dqk), empty(case.M, case.dqk), empty(case.M, case.dv)
    mask = None
    if causal and case.N != case.M:
        params = SDPAParams(q, k, v, None, 0.0, False, False)
        if can_use_flash_attention(params):
            return "flash"
        if can_use_efficient_attention(params):
            return "efficient"
        mask = torch.ones(case.N, case.M, dtype=torch.bool, device=device).tril(case.M - case.N)
        causal = False
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=mask, is_causal=causal))
    return {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
            SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.MATH: "math"}.get(choice, choice.name.lower())


def _op_provider(name: str, fn, refusal=None, predicted_bytes=None, full_set_only_on_cpu: str = "",
                 kernel=None, cpu_phases: bool = False) -> Provider:
    def prepare(case, dtype, device, backward):
        q, k, v = op_inputs(case, dtype, device, backward)
        return make_call(lambda: fn(q, k, v, case), [q, k, v], backward)

    return Provider(name, "op", refusal or (lambda case, dtype, device: None), prepare,
                    predicted_bytes=predicted_bytes, full_set_only_on_cpu=full_set_only_on_cpu, kernel=kernel,
                    cpu_phases=cpu_phases)


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
        op = pf.latent_attention if case.kind == "latent" else pf.cross_attention
        # As auto dispatch would judge it (the Triton interpreter is not timed); lines saying how it
        # runs ("runs ...") are no refusal.
        verdict = pf.explain(op, *meta_inputs(case, dtype, device), causal=case.causal)[backend]
        return "; ".join(line for line in verdict if not line.startswith("runs ")) or None

    if backend != "cpu":
        return _op_provider(f"perceiver_fast[{backend}]", fn, refusal)
    return _op_provider(f"perceiver_fast[{backend}]", fn, refusal, kernel=_cpu_products, cpu_phases=True)


def _cpu_products(case, dtype, device, backward) -> str:
    """The products the cpu kernels run: float32 inputs follow torch's float32 matmul precision."""
    from ..backends.cpu import float32_products

    name = float32_products() if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    return f"{name} products"


def _below_the_python_layer(name: str, fn) -> Provider:
    """The cpu backend's kernels reached past the public function, for the per-call overhead of the
    layers above them: only on cases that time loops of calls (the overhead set)."""
    def refusal(case, dtype, device):
        if case.calls == 1:
            return "measures the overhead of one call: in the overhead set only"
        import perceiver_fast as pf

        reasons = pf.explain(pf.cross_attention, *meta_inputs(case, dtype, device), causal=case.causal)["cpu"]
        return "; ".join(reasons) or None

    return _op_provider(name, fn, refusal)


def meta_inputs(case: Case, dtype, device) -> list[torch.Tensor]:
    """Stride-0 views: the shapes, dtype and device of the case's q, k, v without their memory."""
    return [torch.empty(1, dtype=dtype, device=device).expand(case.B, case.H, rows, dim)
            for rows, dim in ((case.N, case.dqk), (case.M, case.dqk), (case.M, case.dv))]


def _registered_op(q, k, v, case):
    from ..ops.attention import attention

    return attention(q, k, v, None, case.causal, case.dqk ** -0.5, 0.0, None, "cpu", case.kind, [])[0]


class _BareKernel(torch.autograd.Function):
    """The C++ forward and backward with nothing between them and the caller but this Function."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        from ..extension import compiled

        out, lse = compiled.cpu_attention_forward(q, k, v, None, causal, q.shape[-1] ** -0.5)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, dout):
        from ..extension import compiled

        q, k, v, out, lse = ctx.saved_tensors
        return (*compiled.cpu_attention_backward(dout, q, k, v, out, lse, None, ctx.causal, q.shape[-1] ** -0.5),
                None)


def _bare_kernel(q, k, v, case):
    if torch.is_grad_enabled() and q.requires_grad:
        return _BareKernel.apply(q, k, v, case.causal)
    from ..extension import compiled

    return compiled.cpu_attention_forward(q, k, v, None, case.causal, case.dqk ** -0.5)[0]


def op_providers() -> list[Provider]:
    """Every fast backend of ours (auto dispatch's, less the reference, which is for checking), then the
    references, then the cpu backend's kernels below the Python layer (overhead set only)."""
    from ..dispatch import BACKENDS

    return ([_ours(b.name) for b in BACKENDS if b.name != "reference"]
            + [_op_provider("eager", lambda q, k, v, case: eager(q, k, v, case.causal),
                            # scores and probabilities (2 GiB measured where they are 1 GiB each)
                            predicted_bytes=with_backward(lambda case, dtype: 2 * score_bytes(case, dtype))),
               _op_provider("sdpa", lambda q, k, v, case: sdpa(q, k, v, case.causal), kernel=sdpa_kernel),
               _op_provider("flex_attention", _flex, _flex_refusal, full_set_only_on_cpu=(
                   "compiled per shape (about 20 s each on the 2-core CPU): in the --full set only")),
               _op_provider("flash_attn", _flash_attn, _flash_attn_refusal),
               _below_the_python_layer("registered op[cpu]", _registered_op),
               _below_the_python_layer("C++ kernel[cpu]", _bare_kernel)])


# ---------------------------------------------------------------------------------------------
# Layer level


def hf_attention(case: Case, dtype, device):
    """HF's PerceiverAttention: the cross-attention layer (latents -> input) or a latent self-attention
    layer; in training mode with the case's attention dropout, if any."""
    from transformers import PerceiverConfig
    from transformers.models.perceiver.modeling_perceiver import PerceiverAttention

    cross = case.kind != "latent"
    layer = PerceiverAttention(PerceiverConfig(attention_probs_dropout_prob=case.dropout), is_cross_attention=cross,
                               qk_channels=case.H * case.dqk, v_channels=case.H * case.dv, num_heads=case.H,
                               q_dim=case.latent_dim, kv_dim=case.C if cross else case.latent_dim,
                               use_query_residual=True)
    return layer.train(bool(case.dropout)).to(device, dtype)


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


def missing_module(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install perceiver-fast[test])"
    return None


def _layer_refusal(module: str):
    def refusal(case, dtype, device):
        if case.causal:
            return "causal layers are not in this layer suite"
        return missing_module(module)
    return refusal


def unfused_layer_bytes(score_copies: int, dropout_copies: int = 0):
    """predicted_bytes of a layer that stores LayerNorm(x), K and V of every input and `score_copies`
    score tensors, `dropout_copies` more for a case with attention dropout (measured on the 2-core
    CPU: within 4% of the forward's peak for HF's layer and SDPA's, without dropout)."""
    def forward_bytes(case, dtype):
        activations = case.B * case.M * (case.C + case.H * (case.dqk + case.dv)) * torch.finfo(dtype).bits // 8
        copies = score_copies + (dropout_copies if case.dropout else 0)
        return activations + copies * score_bytes(case, dtype)
    return with_backward(forward_bytes)


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
        return make_call(forward, leaves, backward)

    # HF keeps scores and probabilities, and with dropout in training its mask and the dropped
    # probabilities (counted as 2 more); the fused layer none of them.
    predicted = None if patched else unfused_layer_bytes(0 if use_sdpa else 2, dropout_copies=2)
    return Provider(name, "layer", _layer_refusal("transformers"), prepare, predicted_bytes=predicted,
                    kernel=(lambda case, dtype, device, backward: sdpa_kernel(case, dtype, device, backward, False))
                    if use_sdpa else None)  # sdpa_layer_forward's attention is never causal


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
        return make_call(lambda: block(latents, **kwargs), leaves, backward)

    needs = _layer_refusal("perceiver_pytorch")
    return Provider(name, "layer", lambda c, d, dev: needs(c, d, dev) or refusal(c, d, dev), prepare,
                    predicted_bytes=None if patched else unfused_layer_bytes(2))


def layer_providers() -> list[Provider]:
    return [_hf_provider("HF + pf.patch", patched=True, use_sdpa=False),
            _hf_provider("HF", patched=False, use_sdpa=False),
            _hf_provider("HF on SDPA", patched=False, use_sdpa=True),
            _lucidrains_provider("lucidrains + pf.patch", patched=True),
            _lucidrains_provider("lucidrains", patched=False)]
