"""`pf.explain`: what auto dispatch would do with a call of any op, backend by backend."""

from __future__ import annotations

import inspect

import torch

from .arguments import type_name
from .attention import cross_attention, latent_attention
from .dispatch import refusals_by_backend
from .input_attention import fused_input_attention
from .linear import linear
from .validation import validate_attention, validate_input_attention, validate_linear

_VALIDATORS = {
    cross_attention: lambda *a, **kw: validate_attention(*a, **kw, kind="cross"),
    latent_attention: lambda *a, **kw: validate_attention(*a, **kw, kind="latent"),
    fused_input_attention: validate_input_attention,
    linear: validate_linear,
}


def explain(op, *args, **kwargs) -> dict[str, list[str]]:
    """For each backend in auto-dispatch priority order, why it would not run a call; where it would,
    nothing (it runs the call fused, as given) or lines starting "runs " that say how.

        pf.explain(pf.cross_attention, q, k, v, key_mask=mask, causal=True)
        pf.explain(pf.latent_attention, q, k, v)
        pf.explain(pf.fused_input_attention, q, x, k_weight=wk, v_weight=wv, method="projection")
        pf.explain(pf.linear, x, weight, bias, activation="gelu")

    The arguments are those of the op (`backend` and `return_lse` are ignored). An entry
    "runs unfused: ..." means the backend would run an input attention composed (LayerNorm and
    projections in torch, then its attention kernel) rather than fused; "runs float32 with bfloat16
    products ..." (or "runs full float32 ...") says how the cpu backend honours torch's float32 matmul
    precision (perceiver_fast/backends/cpu.py); for the linear op, whether it runs oneDNN's GEMMs or
    torch's own, and how they compared here. `pf.explain(q, k, v, ...)`
    is short for `pf.explain(pf.cross_attention, q, k, v, ...)`.
    """
    if isinstance(op, torch.Tensor):
        return explain(cross_attention, op, *args, **kwargs)
    if not callable(op) or op not in _VALIDATORS:
        names = ", ".join(f"pf.{f.__name__}" for f in _VALIDATORS)
        given = repr(op) if callable(op) else type_name(op)
        raise TypeError(f"pf.explain's op must be one of {names}, or a q tensor (short for pf.cross_attention), "
                        f"got {given}")
    kwargs = {name: value for name, value in kwargs.items() if name not in ("backend", "return_lse")}
    try:
        inspect.signature(op).bind(*args, **kwargs)
    except TypeError as error:  # said by the op, not by the validator it would reach
        raise TypeError(f"pf.explain(pf.{op.__name__}, ...) takes pf.{op.__name__}'s arguments: {error}") from None
    return refusals_by_backend(_VALIDATORS[op](*args, **kwargs))
