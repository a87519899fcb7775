"""Input checks shared by every op: one place that turns user arguments into a validated problem.

Errors name the argument and what was expected: TypeError for a wrong type or dtype, ValueError
for a wrong shape or value. Nothing is broadcast. Every check reads only shapes, dtypes and
devices, never tensor values, so that torch.compile traces it without a graph break.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field

import torch

from .arguments import check_flag, type_name
from .dropout import check_dropout_p
from .flops import INPUT_METHODS, choose_method
from .shards import ShardedCall, ShardLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 1024
ATTENTION, INPUT_ATTENTION, LINEAR = "attention", "input_attention", "linear"
# The linear op's activations: GELU exact (erf) and its tanh form, the two the Perceiver libraries use.
ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Problem:
    """What every op's problem shares, and what a backend's capabilities are judged on.

    q is the (B, H, N, Dqk) queries of either op; `kind` is "cross" or "latent" (tile choices).
    Each op's problem adds its tensors, `keys`, `dim_v` and `tensors()` (all its tensor inputs).
    `shards`: where this rank's keys lie when the key axis is sharded over a process group (`keys`
    is then this rank's shard length), else None. `dropout_p`: the attention dropout probability
    (perceiver_fast/dropout.py), 0 for none.
    """

    q: torch.Tensor
    key_mask: torch.Tensor | None
    causal: bool
    scale: float
    kind: str
    shards: ShardLayout | None = field(default=None, kw_only=True)
    dropout_p: float = field(default=0.0, kw_only=True)

    op = ""

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def queries(self) -> int:
        return self.q.shape[2]

    @property
    def dim_qk(self) -> int:
        return self.q.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def needs_grad(self) -> bool:
        return _needs_grad(self.tensors())

    def describe(self) -> str:
        return (f"{self.op.replace('_', ' ')} ({self.kind}) B={self.batch} H={self.heads} N={self.queries} "
                f"M={self.keys} Dqk={self.dim_qk} Dv={self.dim_v} {_dtype_name(self.dtype)} on {self.device.type}"
                f"{' key_mask' if self.key_mask is not None else ''}{' causal' if self.causal else ''}"
                f"{' grad' if self.needs_grad else ''}{f' dropout_p={self.dropout_p:g}' if self.dropout_p else ''}"
                f"{' ' + self.shards.describe() if self.shards else ''}")


@dataclass(frozen=True)
class AttentionProblem(Problem):
    """A validated `cross_attention` / `latent_attention` call."""

    k: torch.Tensor
    v: torch.Tensor

    op = ATTENTION

    @property
    def keys(self) -> int:
        return self.k.shape[2]

    @property
    def dim_v(self) -> int:
        return self.v.shape[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k, self.v


@dataclass(frozen=True)
class InputAttentionProblem(Problem):
    """A validated `fused_input_attention` call, its tensors already in the compute dtype.

    norm_eps None: no LayerNorm. method: "shortcut" or "projection" (never "auto" here).
    """

    x: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    norm_eps: float | None
    method: str

    op = INPUT_ATTENTION

    @property
    def keys(self) -> int:
        return self.x.shape[1]

    @property
    def channels(self) -> int:
        return self.x.shape[2]

    @property
    def dim_v(self) -> int:
        return self.v_weight.shape[0] // self.heads

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.q, self.x, self.k_weight, self.k_bias, self.v_weight, self.v_bias,
                                 self.norm_weight, self.norm_bias) if t is not None)


@dataclass(frozen=True)
class LinearProblem:
    """A validated `linear` call: y = activation(x W^T + b) (+ residual), x flattened to (rows, in).

    x is in the compute dtype (autocast's where it is on, else the one dtype of every argument);
    weight and bias keep theirs (an fp32 parameter under bfloat16 autocast), and the kernels compute
    in x's dtype. `residual` (rows, out) is added inside the op; under autocast, a residual of
    another dtype is `residual_after` instead, added after the op with type promotion as
    `F.linear(...) + residual` would. `shape`: the output's shape.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    activation: str
    shape: tuple[int, ...]
    residual_after: torch.Tensor | None = None

    op = LINEAR
    shards = None
    dropout_p = 0.0

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def in_features(self) -> int:
        return self.x.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def macs(self) -> int:
        """Multiply-adds of x W^T."""
        return self.rows * self.in_features * self.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def needs_grad(self) -> bool:
        return _needs_grad(self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.x, self.weight, self.bias, self.residual) if t is not None)

    def describe(self) -> str:
        return (f"linear {self.rows} x {self.in_features} -> {self.out_features} {_dtype_name(self.dtype)} on "
                f"{self.device.type}{' bias' if self.bias is not None else ''}"
                f"{'' if self.activation == 'none' else ' ' + self.activation}"
                f"{' residual' if self.residual is not None else ''}{' grad' if self.needs_grad else ''}")


def attention_kind(queries: int, keys: int, key_mask) -> str:
    """"latent" for self-attention over the latents (N == M, no key mask), else "cross": the one
    place that decides which tile choices a problem gets."""
    return "latent" if key_mask is None and queries == keys else "cross"


def check_scale(scale, dim_qk: int) -> float:
    """The softmax scale: 1/sqrt(Dqk) for None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim_qk)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type_name(scale)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_tensor(name: str, t, layout: str, dims: int, floating: tuple = FLOAT_DTYPES,
                 empty_dim: int | None = None) -> None:
    """A tensor of `dims` dimensions, of one of the `floating` dtypes, with no empty dimension but
    `empty_dim` (a key axis sharded over ranks, where a rank may hold no key)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type_name(t)}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in floating:
        names = [_dtype_name(d) for d in floating]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {t.dtype}")
    if any(s == 0 for i, s in enumerate(t.shape) if i != empty_dim):
        raise ValueError(f"{name} must have no empty dimension {layout}, got shape {tuple(t.shape)}")


def check_head_dims(dim_qk: int, dim_v: int) -> None:
    for name, dim in (("Dqk", dim_qk), ("Dv", dim_v)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"head dimension {name} must be at most {MAX_HEAD_DIM}, got {dim}")


def check_key_mask(key_mask, batch: int, keys: int, device: torch.device) -> None:
    if key_mask is None:
        return
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a bool torch.Tensor of shape (B, M) = ({batch}, {keys}), "
                        f"got {type_name(key_mask)}")
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must have dtype torch.bool (True = key may be attended), got {key_mask.dtype}")
    if tuple(key_mask.shape) != (batch, keys):
        raise ValueError(f"key_mask must have shape (B, M) = ({batch}, {keys}), got {tuple(key_mask.shape)}")
    if key_mask.device != device:
        raise ValueError(f"key_mask must be on q's device {device}, got {key_mask.device}")


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sharded_call(op: str, process_group):
    """The agreement step of a sharded call (see shards.ShardedCall); nothing for an unsharded one."""
    return contextlib.nullcontext() if process_group is None else ShardedCall(op, process_group)


def _checked_dropout(dropout_p, process_group) -> float:
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p and process_group is not None:
        raise ValueError(f"dropout_p must be 0 with a process_group (attention dropout over sharded keys is not "
                         f"supported), got {dropout_p}")
    return dropout_p


def validate_attention(q, k, v, *, key_mask=None, causal=False, scale=None, kind: str = "cross", dropout_p=0.0,
                       process_group=None) -> AttentionProblem:
    """Checks the arguments of `cross_attention` (kind "cross") or `latent_attention` (kind "latent");
    with a process_group, also that every rank of it makes the same call (a collective)."""
    with _sharded_call(f"{kind}_attention", process_group) as call:
        return _validate_attention(q, k, v, key_mask, causal, scale, kind, _checked_dropout(dropout_p, process_group),
                                   call)


def _validate_attention(q, k, v, key_mask, causal, scale, kind: str, dropout_p: float,
                        call: ShardedCall | None) -> AttentionProblem:
    sharded = call is not None
    check_tensor("q", q, "(B, H, N, Dqk)", 4)
    check_tensor("k", k, "(B, H, M, Dqk)", 4, empty_dim=2 if sharded else None)
    check_tensor("v", v, "(B, H, M, Dv)", 4, empty_dim=2 if sharded else None)
    B, H, N, dqk = q.shape
    M = k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if tuple(k.shape) != (B, H, M, dqk):
        raise ValueError(f"k must have shape (B, H, M, Dqk) = ({B}, {H}, M, {dqk}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, M):
        raise ValueError(f"v must have shape (B, H, M, Dv) = ({B}, {H}, {M}, Dv) to match q and k, "
                         f"got {tuple(v.shape)}")
    check_head_dims(dqk, v.shape[3])
    if kind == "latent" and N != M:
        raise ValueError(f"latent_attention is self-attention: q and k must have the same length, "
                         f"got N={N} queries and M={M} keys (use cross_attention for N != M)")
    check_key_mask(key_mask, B, M, q.device)
    causal, scale = check_flag("causal", causal), check_scale(scale, dqk)
    shards = None
    if sharded:
        shards = call.layout(M, {"B": B, "H": H, "N": N, "Dqk": dqk, "Dv": v.shape[3], "dtype": q.dtype,
                                 "causal": causal, "whether key_mask is given": key_mask is not None, "scale": scale,
                                 "whether gradients are needed": _needs_grad((q, k, v))}, {"q": q}, q.device)
    return AttentionProblem(q=q, k=k, v=v, key_mask=key_mask, causal=causal, scale=scale, kind=kind, shards=shards,
                            dropout_p=dropout_p)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this kind of device (never for one autocast does not cover, such as meta).
    Traced, only the second question is asked: dynamo before torch 2.13 cannot trace the first."""
    if torch.compiler.is_compiling():
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(tensors: list[torch.Tensor], device_type: str) -> torch.dtype:
    """autocast's dtype where autocast is on (as F.linear would run), else the promoted dtype."""
    if autocast_on(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def validate_input_attention(q, x, *, k_weight, k_bias=None, v_weight, v_bias=None, norm_weight=None,
                             norm_bias=None, norm_eps=1e-5, key_mask=None, causal=False, scale=None,
                             method="auto", dropout_p=0.0, process_group=None) -> InputAttentionProblem:
    """Checks the arguments of `fused_input_attention`, casts every tensor to the compute dtype
    (autocast's where it is on, else the promoted one) and resolves method "auto" by FLOPs (over
    every rank's keys with a process_group, after checking that every rank makes the same call)."""
    with _sharded_call("fused_input_attention", process_group) as call:
        return _validate_input_attention(q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias, norm_eps,
                                         key_mask, causal, scale, method, _checked_dropout(dropout_p, process_group),
                                         call)


def _validate_input_attention(q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias, norm_eps, key_mask,
                              causal, scale, method, dropout_p: float,
                              call: ShardedCall | None) -> InputAttentionProblem:
    sharded = call is not None
    check_tensor("q", q, "(B, H, N, Dqk)", 4)
    check_tensor("x", x, "(B, M, C)", 3, empty_dim=1 if sharded else None)
    batch, heads, queries, dim_qk = q.shape
    _, keys, channels = x.shape
    if x.shape[0] != batch:
        raise ValueError(f"x must have q's batch size {batch}, got shape {tuple(x.shape)}")
    check_tensor("k_weight", k_weight, "(H * Dqk, C)", 2)
    if tuple(k_weight.shape) != (heads * dim_qk, channels):
        raise ValueError(f"k_weight must have shape (H * Dqk, C) = {(heads * dim_qk, channels)}, "
                         f"got {tuple(k_weight.shape)}")
    check_tensor("v_weight", v_weight, "(H * Dv, C)", 2)
    if v_weight.shape[0] % heads or v_weight.shape[1] != channels:
        raise ValueError(f"v_weight must have shape (H * Dv, C) with H = {heads}, C = {channels}, "
                         f"got {tuple(v_weight.shape)}")
    dim_v = v_weight.shape[0] // heads
    check_head_dims(dim_qk, dim_v)
    for name, t, size, layout in (("k_bias", k_bias, heads * dim_qk, "(H * Dqk,)"),
                                  ("v_bias", v_bias, heads * dim_v, "(H * Dv,)"),
                                  ("norm_weight", norm_weight, channels, "(C,)"),
                                  ("norm_bias", norm_bias, channels, "(C,)")):
        if t is not None:
            check_tensor(name, t, layout, 1)
            if t.shape[0] != size:
                raise ValueError(f"{name} must have shape {layout} = ({size},), got {tuple(t.shape)}")
    tensors = [t for t in (q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias) if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"q, x, the projections and the norm must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if norm_eps is not None and (isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real)
                                 or not math.isfinite(norm_eps) or norm_eps < 0):
        raise ValueError(f"norm_eps must be a finite number >= 0, or None for no LayerNorm, got {norm_eps!r}")
    if norm_eps is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight and norm_bias need a LayerNorm: pass norm_eps (None means no LayerNorm)")
    check_key_mask(key_mask, batch, keys, q.device)
    causal = check_flag("causal", causal)
    if method not in ("auto",) + INPUT_METHODS:
        raise ValueError(f"method must be one of 'auto', {', '.join(map(repr, INPUT_METHODS))}, got {method!r}")
    dtype = compute_dtype(tensors, q.device.type)
    scale = check_scale(scale, dim_qk)
    shards = None
    if sharded:
        shards = call.layout(
            keys, {"B": batch, "H": heads, "N": queries, "Dqk": dim_qk, "C": channels, "Dv": dim_v,
                   "compute dtype": dtype, "causal": causal, "whether key_mask is given": key_mask is not None,
                   "scale": scale, "norm_eps": None if norm_eps is None else float(norm_eps), "method": method,
                   "whether gradients are needed": _needs_grad(tensors)},
            {"q": q, "k_weight": k_weight, "k_bias": k_bias, "v_weight": v_weight, "v_bias": v_bias,
             "norm_weight": norm_weight, "norm_bias": norm_bias}, q.device)
    # The shortcut adds V's bias (v_bias + Wv norm_bias) once per row, which assumes the row's
    # probabilities sum to 1; dropped ones do not.
    value_bias = v_bias is not None or (norm_eps is not None and norm_bias is not None)
    if dropout_p and value_bias and method == "shortcut":
        raise ValueError(f"method 'shortcut' cannot drop attention probabilities when V has a bias (v_bias or "
                         f"norm_bias given): use method 'projection' or 'auto' with dropout_p={dropout_p}")
    if method == "auto":
        method = ("projection" if dropout_p and value_bias else
                  choose_method(queries, shards.total if shards else keys, channels, dim_qk, dim_v, causal))
    q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias = (
        None if t is None else t.to(dtype) for t in (q, x, k_weight, k_bias, v_weight, v_bias, norm_weight, norm_bias))
    return InputAttentionProblem(
        q=q, key_mask=key_mask, causal=causal, scale=scale, kind=attention_kind(queries, keys, key_mask), x=x,
        k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias, norm_weight=norm_weight, norm_bias=norm_bias,
        norm_eps=None if norm_eps is None else float(norm_eps), method=method, shards=shards, dropout_p=dropout_p)


def validate_linear(x, weight, bias=None, *, activation="none", residual=None) -> LinearProblem:
    """Checks the arguments of `linear`: x (..., in), weight (out, in), bias (out,), residual of the
    output's shape (..., out), nothing broadcast; one dtype (or autocast on) and one device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., in_features), got {type_name(x)}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, "(out_features, in_features)", 2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} (weight's second dimension) as its last "
                         f"dimension, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, "(out_features,)", 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape (out_features,) = ({out_features},), got {tuple(bias.shape)}")
    shape = (*x.shape[:-1], out_features)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor of the output's shape {shape} or None, "
                            f"got {type_name(residual)}")
        if tuple(residual.shape) != shape:
            raise ValueError(f"residual must have the output's shape (..., out_features) = {shape} (it is not "
                             f"broadcast), got {tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    tensors = [t for t in (x, weight, bias, residual) if t is not None]
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor ({', '.join(map(_dtype_name, FLOAT_DTYPES))}), "
                            f"got {t.dtype}")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"x, weight, bias and residual must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    autocast = autocast_on(x.device.type)
    if not autocast and len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"x, weight, bias and residual must share one dtype (as in F.linear; or run under autocast), "
                        f"got " + ", ".join(f"{n} {t.dtype}" for n, t in
                                            (("x", x), ("weight", weight), ("bias", bias), ("residual", residual))
                                            if t is not None))
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    fused = residual is not None and residual.dtype == dtype
    return LinearProblem(x=x.reshape(-1, in_features).to(dtype), weight=weight, bias=bias,
                         residual=residual.reshape(-1, out_features) if fused else None, activation=activation,
                         shape=shape, residual_after=None if fused else residual)
