"""Plain PyTorch attention: the obviously-right definition every backend is tested against.

It materialises the full (B, H, N, M) score matrix; use it for checking, not for speed.
"""

from __future__ import annotations

import torch

from .dropout import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS, keep_threshold

_LOW32 = 0xFFFFFFFF


def _multiply_32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64 (no int64 overflow: b is
    split into 16-bit halves)."""
    low_part, high_part = a * (b & 0xFFFF), a * (b >> 16)
    return (high_part + (low_part >> 16)) >> 16, (low_part + ((high_part & 0xFFFF) << 16)) & _LOW32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of uint32 counters (four int64 tensors) under a 64-bit key: four int64 tensors
    of uint32 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        high_b, low_b = _multiply_32(c2, PHILOX_ROUND_B)
        high_a, low_a = _multiply_32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _LOW32, (k1 + PHILOX_KEY_B) & _LOW32
    return c0, c1, c2, c3


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, queries: int, keys: int,
                      dropout_p: float) -> torch.Tensor:
    """The bool (B, H, N, M) keep mask of attention dropout drawn from `seed` (int64 (2,): seed,
    offset), by the definition in perceiver_fast/dropout.py."""
    seed_word, offset = (int(w) for w in seed.tolist())
    device = seed.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    i = torch.arange(queries, device=device).view(1, 1, -1, 1)
    j = torch.arange(keys, device=device).view(1, 1, 1, -1)
    shape = (batch, heads, queries, keys)
    counter = ((j >> 2).expand(shape), i.expand(shape), (b * heads + h).expand(shape),
               torch.full(shape, offset & _LOW32, dtype=torch.int64, device=device))
    words = torch.stack(philox4x32(counter, (seed_word & _LOW32, (seed_word >> 32) & _LOW32)))
    chosen = words.gather(0, (j & 3).expand(shape).unsqueeze(0)).squeeze(0)
    return chosen >= keep_threshold(dropout_p)


def allowed_keys(batch: int, queries: int, keys: int, key_mask: torch.Tensor | None, causal: bool,
                 device: torch.device) -> torch.Tensor | None:
    """Bool (B, 1, N, M) or (1, 1, N, M): True where query i may attend key j; None if all may.

    Causal is bottom-right aligned: query i sees key j iff j <= i + M - N.
    """
    allowed = None
    if causal:
        i = torch.arange(queries, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        allowed = (j <= i + (keys - queries))[None, None]
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """probs with dropout's keep mask applied: kept entries scaled by 1 / (1 - p), the rest 0."""
    if keep is None:
        return probs
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                        causal: bool = False, scale: float | None = None, compute_dtype: torch.dtype | None = None,
                        dropout_p: float = 0.0, dropout_keep: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out (B, H, N, Dv) in q's dtype, lse (B, H, N) float32.

    Computes in `compute_dtype` (default: q's dtype). Rows with no key to attend give
    out 0 and lse -inf. Differentiable in q, k, v; lse is returned detached. dropout_keep: a bool
    (B, H, N, M) mask (`dropout_keep_mask`) applied to the probabilities, kept ones scaled by
    1 / (1 - dropout_p); lse stays that of the undropped scores.
    """
    dtype = compute_dtype or q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    allowed = allowed_keys(q.shape[0], q.shape[2], k.shape[2], key_mask, causal, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax is shift-invariant, so the detached row max carries no gradient; a row with
    # no key has max -inf, and shifting it by 0 keeps every term exp(-inf) = 0, never NaN.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    out = torch.matmul(_dropped(probs, dropout_keep, dropout_p), vc)
    lse = (row_max + torch.log(total.detach())).squeeze(-1)
    return out.to(q.dtype), lse.float()


def input_attention_reference(q: torch.Tensor, x: torch.Tensor, *, k_weight: torch.Tensor,
                              k_bias: torch.Tensor | None, v_weight: torch.Tensor, v_bias: torch.Tensor | None,
                              norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                              norm_eps: float | None = 1e-5, key_mask: torch.Tensor | None = None,
                              causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                              dropout_keep: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused input attention: LayerNorm(x), K, V and the score matrix all materialised.

    LayerNorm (none when norm_eps is None), then the projections as nn.Linear computes them,
    split over heads, then `attention_reference` (with its dropout arguments).
    """
    if norm_eps is not None:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, norm_eps)
    batch, keys, _ = x.shape
    heads = q.shape[1]
    k = torch.nn.functional.linear(x, k_weight, k_bias).view(batch, keys, heads, -1).transpose(1, 2)
    v = torch.nn.functional.linear(x, v_weight, v_bias).view(batch, keys, heads, -1).transpose(1, 2)
    return attention_reference(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p,
                               dropout_keep=dropout_keep)[0]


def attention_reference_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                                 causal: bool = False, scale: float | None = None,
                                 compute_dtype: torch.dtype | None = None, dropout_p: float = 0.0,
                                 dropout_keep: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_reference` from the forward's out and lse, by the formula the
    backward kernels implement: P = exp(s - lse), with Z the dropout keep mask over 1 - p (all ones
    without dropout): dV = (P Z)^T dO, dS = P (Z dO V^T - rowsum(dO * O)), dQ = scale dS K,
    dK = scale dS^T Q. Given the out and lse of attention over more keys than k holds (a shard of
    them), it gives that shard's share of the gradients."""
    dtype = compute_dtype or q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qc, kc, vc, dc, oc = (t.to(dtype) for t in (q, k, v, dout, out))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    row_lse = lse.to(dtype).unsqueeze(-1)
    probs = torch.exp(scores - torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse))
    allowed = allowed_keys(q.shape[0], q.shape[2], k.shape[2], key_mask, causal, q.device)
    if allowed is not None:
        probs = probs.masked_fill(~allowed, 0.0)
    probs = torch.where(torch.isinf(row_lse), torch.zeros_like(probs), probs)  # rows with no key: no gradient
    dv = torch.matmul(_dropped(probs, dropout_keep, dropout_p).transpose(-1, -2), dc)
    dprobs = _dropped(torch.matmul(dc, vc.transpose(-1, -2)), dropout_keep, dropout_p)
    dscores = probs * (dprobs - (dc * oc).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, kc) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def activation_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The linear op's activations ("none", "gelu": exact, "gelu_tanh") as torch's own."""
    if activation == "none":
        return z
    return torch.nn.functional.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    """activation(x W^T + b) (+ residual) by torch's own ops, in x's dtype (weight and bias cast to it)."""
    z = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = activation_reference(z, activation)
    return y if residual is None else y + residual
