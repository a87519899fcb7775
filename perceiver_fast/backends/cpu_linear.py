"""The cpu backend's linear kernels: oneDNN GEMMs with the activation or the residual add fused into
their epilogue, through the oneDNN linear op inside torch (`torch.ops.mkldnn._linear_pointwise`), on
weights packed once into oneDNN's blocked layout. Registered as the "cpu" kernels of
perceiver_fast::linear.

Where torch's own GEMM is as fast (MKL on Intel CPUs may be), the kernels run torch's instead:
a one-time probe per dtype, for many rows and for one, decides (`gemm`), and `pf.explain` says
which runs.

Packed weights: one packed copy per weight, made at its first call and made again when the weight
changes, as its version counter (every in-place change: an optimizer step, `load_state_dict`,
`copy_` under no_grad) or its storage (`.to()`, `.data =`) says; dropped with the weight. Changes
that bypass the version counter (in place through `.data`, or under inference_mode) cannot be
seen: a weight made under inference_mode is never packed.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..reference import activation_reference
from .probes import median_ms

_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)

# Why oneDNN's linear cannot run in this torch; None: it can.
UNAVAILABLE: str | None = (None if torch.backends.mkldnn.is_available() and _LINEAR is not None else
                           "this torch has no oneDNN (torch.backends.mkldnn) linear op")

# oneDNN's fused epilogue per activation: (attr, algorithm).
_EPILOGUES = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}

# oneDNN runs where the probe finds it at least as fast as torch's GEMM: at a tie its fused epilogue
# still saves the activation's or residual's pass (bfloat16 F.linear is oneDNN too, on unpacked weights).
SPEEDUP_NEEDED = 1.0
# (in, out) of the probe: a Perceiver latent layer's projection; at 512 rows, and at one row (a
# decoding step's matrix-vector product, where torch's may win: 0.88x to 1.28x on the 2-core Zen 5).
PROBE_FEATURES = (1024, 1024)
PROBE_ROWS = 512

# Below this many multiply-adds (rows x in x out) auto dispatch leaves a call to torch's own F.linear:
# the op's Python layer and registered-op call cost about 0.1 ms a call on the 2-core Zen 5 (F.linear's:
# 6 to 30 us), more than oneDNN saves on a GEMM under about 0.5 ms (a decoding step's matrix-vector
# products: 54 of them per token made bfloat16 Perceiver AR decoding 1.4x slower).
SMALL_PROBLEM_MACS = 2**25

_forced: str | None = None
_packed = WeakIdKeyDictionary()  # weight -> ((version, data pointer, dtype), packed weight)


def force_gemm(choice: str | None) -> None:
    """Runs every call's GEMMs on "onednn" or "torch" whatever the probe found (tests cover both
    paths); None: the probe decides again."""
    global _forced
    if choice not in (None, "onednn", "torch"):
        raise ValueError(f"choice must be None, 'onednn' or 'torch', got {choice!r}")
    _forced = choice


@functools.cache
def onednn_speedup(dtype: torch.dtype, one_row: bool = False) -> float:
    """torch's F.linear time over oneDNN's on packed weights, at PROBE_ROWS rows (or one) of
    PROBE_FEATURES in `dtype` at the current thread count; measured once per process (about 0.1 s)."""
    rows, (features_in, features_out) = 1 if one_row else PROBE_ROWS, PROBE_FEATURES
    generator = torch.Generator().manual_seed(0)  # torch's default one is the caller's: dropout seeds come from it
    x = torch.randn(rows, features_in, dtype=dtype, generator=generator)
    weight = torch.randn(features_out, features_in, dtype=dtype, generator=generator) / features_in ** 0.5
    bias = torch.randn(features_out, dtype=dtype, generator=generator)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    repeats = 99 if one_row else 9  # a matrix-vector product takes tens of microseconds
    return (median_ms(lambda: torch.nn.functional.linear(x, weight, bias), repeats)
            / median_ms(lambda: _LINEAR(x, packed, bias, "none", [], ""), repeats))


def gemm(dtype: torch.dtype, rows: int = PROBE_ROWS) -> str:
    """Which GEMMs the kernels run for `rows` rows in `dtype`: "onednn" or "torch"."""
    if _forced is not None:
        return _forced
    return "onednn" if onednn_speedup(dtype, rows == 1) >= SPEEDUP_NEEDED else "torch"


def packed_weight(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """weight in dtype, in oneDNN's blocked layout for a GEMM of about `rows` rows: packed at the
    first call and whenever the weight has changed since (see the module's docstring)."""
    if weight.is_inference():  # no version counter: an in-place change would go unseen
        return weight.to(dtype)
    stamp = (weight._version, weight.data_ptr(), dtype)
    entry = _packed.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), rows))
        _packed[weight] = entry
    return entry[1]


def _epilogue(z, activation, residual, save_preactivation):
    """(y, preactivation) from z = x W^T + b, the activation and residual added by torch."""
    y = activation_reference(z, activation)
    saved_z = y is z and save_preactivation  # the op's two outputs must not alias
    if residual is not None:
        y = y + residual if saved_z else y.add_(residual)
    elif saved_z:
        y = z.clone()
    return y, (z if save_preactivation else z.new_empty(0))


def forward(x, weight, bias, residual, activation, save_preactivation):
    if gemm(x.dtype, x.shape[0]) == "torch":
        z = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return _epilogue(z, activation, residual, save_preactivation)
    x = x.contiguous()
    packed = packed_weight(weight, x.dtype, x.shape[0])
    bias = None if bias is None else bias.to(x.dtype)
    if save_preactivation:  # the activation's backward needs x W^T + b itself
        return _epilogue(_LINEAR(x, packed, bias, "none", [], ""), activation, residual, True)
    if activation == "none" and residual is not None:
        return _LINEAR.binary(x, residual.contiguous(), packed, bias, "add"), x.new_empty(0)
    attr, algorithm = _EPILOGUES[activation]
    return _epilogue(_LINEAR(x, packed, bias, attr, [], algorithm), "none", residual, False)


def backward(dy, x, weight, bias, preactivation, activation, grads):
    if activation != "none" and not preactivation.numel():
        preactivation = forward(x, weight, bias, None, "none", False)[0]
    dz = dy if activation == "none" else torch.ops.aten.gelu_backward(
        dy, preactivation, approximate="tanh" if activation == "gelu_tanh" else "none")
    w = weight.to(dz.dtype)
    onednn = gemm(dz.dtype, x.shape[0]) == "onednn"
    dx, dweight, dbias = (x.new_empty(0) for _ in range(3))  # the op's outputs must not alias
    if grads[0]:  # oneDNN reads the transposed weight in place
        dx = _LINEAR(dz, w.t(), None, "none", [], "") if onednn else dz @ w
    if grads[1]:
        dweight = (_LINEAR(dz.t(), x.t(), None, "none", [], "") if onednn else dz.t() @ x).to(weight.dtype)
    if grads[2]:
        dbias = dz.sum(0, dtype=torch.promote_types(dz.dtype, torch.float32)).to(weight.dtype)
    return dx, dweight, dbias
