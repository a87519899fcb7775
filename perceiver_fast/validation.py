"""Input checks shared by every backend: one place that turns user arguments into a Problem."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 1024


@dataclass(frozen=True)
class Problem:
    """A validated attention call. kind is "cross" or "latent"."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None
    causal: bool
    scale: float
    kind: str

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
    def keys(self) -> int:
        return self.k.shape[2]

    @property
    def dim_qk(self) -> int:
        return self.q.shape[3]

    @property
    def dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def describe(self) -> str:
        return (f"{self.kind} attention B={self.batch} H={self.heads} N={self.queries} M={self.keys} "
                f"Dqk={self.dim_qk} Dv={self.dim_v} {str(self.dtype).replace('torch.', '')} on {self.device.type}"
                f"{' key_mask' if self.key_mask is not None else ''}{' causal' if self.causal else ''}"
                f"{' grad' if self.needs_grad else ''}")


def _check_tensor(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name} must have no empty dimension {layout}, got shape {tuple(t.shape)}")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def validate(q, k, v, *, key_mask=None, causal=False, scale=None, kind: str = "cross") -> Problem:
    """Checks the arguments against the contract in DESIGN.md and returns a Problem.

    Raises TypeError for a wrong type or dtype and ValueError for a wrong shape or value,
    naming the argument and what was expected. Nothing is broadcast.
    """
    _check_tensor("q", q, "(B, H, N, Dqk)")
    _check_tensor("k", k, "(B, H, M, Dqk)")
    _check_tensor("v", v, "(B, H, M, Dv)")
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
    for name, dim in (("Dqk", dqk), ("Dv", v.shape[3])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"head dimension {name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if kind == "latent" and N != M:
        raise ValueError(f"latent_attention is self-attention: q and k must have the same length, "
                         f"got N={N} queries and M={M} keys (use cross_attention for N != M)")

    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"key_mask must be a bool torch.Tensor of shape (B, M) = ({B}, {M}), "
                            f"got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must have dtype torch.bool (True = key may be attended), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, M):
            raise ValueError(f"key_mask must have shape (B, M) = ({B}, {M}), got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on q's device {q.device}, got {key_mask.device}")

    causal = check_flag("causal", causal)
    if scale is None:
        scale = 1.0 / math.sqrt(dqk)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return Problem(q=q, k=k, v=v, key_mask=key_mask, causal=causal, scale=float(scale), kind=kind)
