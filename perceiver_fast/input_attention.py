"""Fused input attention: the input side of a Perceiver cross-attention layer as one op.

    out = attention(q, K, V),  K = LN(x) Wk^T + bk,  V = LN(x) Wv^T + bv  (split over heads)

computed without storing LN(x), K or V (each M x d): the kernel normalises each key tile of x
and makes K and V from it on the fly. LayerNorm's gamma and beta are folded into the
projections first (W diag(gamma), b + W beta), so the kernel's LayerNorm has no parameters.

Two methods (csrc/cpu/input_attention.h):
  "projection": K and V of a tile by GEMM, for all heads at once;
  "shortcut":   per head, softmax(q Wk LN(x)^T) LN(x) Wv^T + bv: the query is folded through Wk
                (q Wk, the key bias cancels in the softmax) and Wv applied after, so the kernel
                attends over the normalised x itself, shared by all heads.
"auto" takes the one with fewer FLOPs (`method_flops`). Backward recomputes the tiles from x
and the saved lse; gradients reach q, x, the LayerNorm and both projections.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from .attention import cross_attention, latent_attention
from .backends import BackendUnsupportedError, get_backend
from .backends.cpu import extension_error
from .backends.triton import interpreting
from .reference import project_input
from .validation import MAX_HEAD_DIM

METHODS = ("auto", "shortcut", "projection")
FUSED_KERNELS = ("cpu", "triton")  # auto dispatch order


def visible_pairs(queries: int, keys: int, causal: bool) -> int:
    """Query-key pairs that are scored: N * M, or under bottom-right causal masking those with j <= i + M - N."""
    if not causal:
        return queries * keys
    return sum(min(keys, max(0, i + keys - queries + 1)) for i in range(queries))


def method_flops(queries: int, keys: int, channels: int, dim_qk: int, dim_v: int, causal: bool = False
                 ) -> dict[str, int]:
    """Multiply-add FLOPs per head and batch item of each method (key-mask savings not counted).

    shortcut: scores and weighted sum over C channels, 4 P C (P scored pairs), plus folding the
    queries through Wk and the result through Wv, 2 N C (Dqk + Dv).
    projection: K and V of every key, 2 M C (Dqk + Dv), plus the attention, 2 P (Dqk + Dv).
    """
    pairs = visible_pairs(queries, keys, causal)
    return {"shortcut": 4 * pairs * channels + 2 * queries * channels * (dim_qk + dim_v),
            "projection": 2 * keys * channels * (dim_qk + dim_v) + 2 * pairs * (dim_qk + dim_v)}


def choose_method(queries: int, keys: int, channels: int, dim_qk: int, dim_v: int, causal: bool = False) -> str:
    flops = method_flops(queries, keys, channels, dim_qk, dim_v, causal)
    return "shortcut" if flops["shortcut"] <= flops["projection"] else "projection"


def _check_tensor(name: str, t, shape: tuple, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(t.shape)}")


def _validate(q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias, norm_eps, key_mask, method):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (B, H, N, Dqk), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor (B, M, C), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch, heads, queries, dim_qk = q.shape
    _, keys, channels = x.shape
    if x.shape[0] != batch:
        raise ValueError(f"x must have q's batch size {batch}, got shape {tuple(x.shape)}")
    if 0 in q.shape or 0 in x.shape:
        raise ValueError(f"q and x must have no empty dimension, got {tuple(q.shape)} and {tuple(x.shape)}")
    _check_tensor("k_weight", k_weight, (heads * dim_qk, channels), "(H * Dqk, C)")
    if not isinstance(v_weight, torch.Tensor) or v_weight.dim() != 2 or v_weight.shape[0] % heads \
            or v_weight.shape[1] != channels:
        raise ValueError(f"v_weight must be a (H * Dv, C) tensor with H = {heads}, C = {channels}, got "
                         f"{tuple(v_weight.shape) if isinstance(v_weight, torch.Tensor) else type(v_weight).__name__}")
    dim_v = v_weight.shape[0] // heads
    for name, dim in (("Dqk", dim_qk), ("Dv", dim_v)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"head dimension {name} must be at most {MAX_HEAD_DIM}, got {dim}")
    for name, t, shape, layout in (("k_bias", k_bias, (heads * dim_qk,), "(H * Dqk,)"),
                                   ("v_bias", v_bias, (heads * dim_v,), "(H * Dv,)"),
                                   ("norm_weight", norm_weight, (channels,), "(C,)"),
                                   ("norm_bias", norm_bias, (channels,), "(C,)")):
        if t is not None:
            _check_tensor(name, t, shape, layout)
    tensors = [t for t in (q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias) if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"q, x, the projections and the norm must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if norm_eps is not None and (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
                                 or not math.isfinite(norm_eps) or norm_eps < 0):
        raise ValueError(f"norm_eps must be a finite number >= 0, or None for no LayerNorm, got {norm_eps!r}")
    if norm_eps is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight and norm_bias need a LayerNorm: pass norm_eps (None means no LayerNorm)")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor (B, M), got "
                            f"{key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__}")
        if tuple(key_mask.shape) != (batch, keys):
            raise ValueError(f"key_mask must have shape (B, M) = ({batch}, {keys}), got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on q's device {q.device}, got {key_mask.device}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return heads, queries, keys, channels, dim_qk, dim_v


def fused_refusals(kernel: str, device: torch.device, dtype: torch.dtype, method: str,
                   explicit: bool = False) -> list[str]:
    """Why fused `kernel` ("cpu": C++, both methods; "triton": the shortcut) cannot run (empty: it can).

    explicit: the caller named the backend (the Triton interpreter runs CPU tensors only then).
    """
    reasons = []
    name = str(dtype).replace("torch.", "")
    if kernel == "cpu":
        if device.type != "cpu":
            reasons.append(f"the C++ fused input kernel runs on the CPU, inputs are on {device.type}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16):
            reasons.append(f"dtype {name} not supported by the fused input kernel (float32, float64, bfloat16)")
        error = extension_error()
        if error:
            reasons.append(error)
        return reasons
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    if device.type == "cpu" and not (interpreting() and explicit):
        reasons.append("the Triton fused input kernel runs CPU tensors only under the Triton interpreter, "
                       "when asked for by name")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {name} not supported by the Triton fused input kernel (float16, bfloat16, float32)")
    if method == "projection":
        reasons.append("the Triton kernel fuses the shortcut method only")
    return reasons


def _fused_kernel(backend: str | None, device: torch.device, dtype: torch.dtype, method: str) -> str | None:
    """The fused kernel to run ("cpu", "triton"), or None for the unfused computation."""
    if backend in (None, "auto"):
        return next((k for k in FUSED_KERNELS if not fused_refusals(k, device, dtype, method)), None)
    if backend not in FUSED_KERNELS:
        return None
    refusals = fused_refusals(backend, device, dtype, method, explicit=True)
    if backend == "cpu" and refusals:
        raise BackendUnsupportedError("backend 'cpu' cannot run the fused input attention: " + "; ".join(refusals))
    return None if refusals else backend


def _compute_dtype(tensors: list[torch.Tensor], device_type: str) -> torch.dtype:
    """autocast's dtype where autocast is on (as F.linear would run), else the promoted dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _fold(weight, bias, norm_weight, norm_bias):
    """(W, b) of a projection applied after LayerNorm's affine part -> (W diag(gamma), b + W beta)."""
    folded_weight = weight if norm_weight is None else weight * norm_weight
    folded_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    if norm_bias is not None:
        folded_bias = folded_bias + torch.mv(weight, norm_bias)
    return folded_weight, folded_bias


def fused_input_attention(q: torch.Tensor, x: torch.Tensor, *, k_weight: torch.Tensor,
                          k_bias: torch.Tensor | None = None, v_weight: torch.Tensor,
                          v_bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                          norm_bias: torch.Tensor | None = None, norm_eps: float | None = 1e-5,
                          key_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                          method: str = "auto", backend: str | None = None) -> torch.Tensor:
    """Attention of projected queries over LayerNorm(x) projected to K and V, fused.

    q (B, H, N, Dqk); x (B, M, C); k_weight (H * Dqk, C), v_weight (H * Dv, C) and optional
    biases as in nn.Linear; norm_weight, norm_bias (C,) and norm_eps those of the input's
    nn.LayerNorm (norm_eps=None: no LayerNorm). key_mask bool (B, M) True = attend; causal
    bottom-right aligned; scale defaults to 1/sqrt(Dqk). Returns (B, H, N, Dv); a query with no
    key to attend gives 0. Runs in autocast's dtype where autocast is on, else in the promoted
    dtype of the inputs.

    method: "auto" (fewer FLOPs), "shortcut" or "projection" (see the module docstring).
    backend: None/"auto" takes the first fused kernel that can run the inputs (the C++ one on
    the CPU, the Triton one, shortcut method only, on CUDA), else the unfused computation on the
    best attention backend. "cpu" requires the C++ fused kernel and raises
    BackendUnsupportedError saying why it cannot run; "triton" runs the Triton fused kernel for
    the shortcut and the Triton attention unfused otherwise; "reference" computes unfused.
    """
    heads, queries, keys, channels, dim_qk, dim_v = _validate(q, x, k_weight, k_bias, v_weight, v_bias,
                                                              norm_weight, norm_bias, norm_eps, key_mask, method)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend not in (None, "auto"):
        get_backend(backend)  # raises for an unknown name
    params = [t for t in (k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias) if t is not None]
    dtype = _compute_dtype([q, x, *params], q.device.type)
    if method == "auto":
        method = choose_method(queries, keys, channels, dim_qk, dim_v, causal)
    kernel = _fused_kernel(backend, q.device, dtype, method)
    if scale is None:
        scale = dim_qk ** -0.5

    with torch.autocast(q.device.type, enabled=False):
        q, x = q.to(dtype), x.to(dtype)
        k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias = (
            None if t is None else t.to(dtype) for t in (k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias))
        if kernel is None:
            k, v = project_input(x, heads, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias,
                                 norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps)
            if key_mask is None and queries == keys:
                return latent_attention(q, k, v, causal=causal, scale=scale, backend=backend)
            return cross_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, backend=backend)

        from .autograd.cpu_input_attention import cpu_input_attention
        from .autograd.triton_input_attention import triton_input_attention

        k_weight, k_bias = _fold(k_weight, k_bias, norm_weight, norm_bias)
        v_weight, v_bias = _fold(v_weight, v_bias, norm_weight, norm_bias)
        normalize, eps = norm_eps is not None, norm_eps or 0.0
        if method == "projection":
            out, _ = cpu_input_attention(q, x, normalize=normalize, eps=eps, k_weight=k_weight, k_bias=k_bias,
                                         v_weight=v_weight, v_bias=v_bias, key_mask=key_mask, causal=causal,
                                         scale=scale)
            return out
        # Shortcut: scores q.(Wk xn + bk) = (q Wk).xn + const per row; out = (P xn) Wv^T + bv where a
        # row has a key (P sums to 1), 0 where it has none.
        folded_q = torch.einsum("bhnd,hdc->bhnc", q, k_weight.view(heads, dim_qk, channels))
        shortcut = cpu_input_attention if kernel == "cpu" else triton_input_attention
        attended, lse = shortcut(folded_q, x, normalize=normalize, eps=eps, key_mask=key_mask, causal=causal,
                                 scale=scale)
        out = torch.einsum("bhnc,hvc->bhnv", attended, v_weight.view(heads, dim_v, channels))
        has_key = torch.isfinite(lse).unsqueeze(-1).to(dtype)
        out = out + has_key * v_bias.view(heads, 1, dim_v)
        if k_bias.requires_grad:
            # The key bias cancels in the softmax, so its gradient is exactly 0; give it that 0
            # rather than none (DistributedDataParallel reports parameters that get no gradient).
            out = out + 0 * k_bias.sum()
        return out

