"""How a backend runs the fused input attention on the registered op `perceiver_fast::input_attention`,
and how one that does not fuse a method runs it composed (unfused).

    out = attention(q, K, V),  K = LN(x) Wk^T + bk,  V = LN(x) Wv^T + bv  (split over heads)

LayerNorm's gamma and beta are folded into the projections first (W diag(gamma), b + W beta), so
the kernels normalise without parameters and autograd carries the gradients back to them.
  "projection": the kernel makes K and V of each key tile by GEMM, for all heads at once.
  "shortcut":   per head, softmax(q Wk LN(x)^T) LN(x) Wv^T + bv: the query is folded through Wk
                (the key bias cancels in the softmax) and Wv applied after, so the kernel attends
                over the normalised x itself, shared by all heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dropout import draw_seed
from ..ops.input_attention import input_attention
from ..ops.sharded import sharded_input_attention, sum_gradients_across
from ..validation import AttentionProblem, InputAttentionProblem, attention_kind


def _fold(weight, bias, norm_weight, norm_bias):
    """(W, b) of a projection applied after LayerNorm's affine part -> (W diag(gamma), b + W beta)."""
    folded_weight = weight if norm_weight is None else weight * norm_weight
    folded_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    if norm_bias is not None:
        folded_bias = folded_bias + torch.mv(weight, norm_bias)
    return folded_weight, folded_bias


def _input_attention_call(problem: InputAttentionProblem, kernel: str, tiling: tuple[int, ...]):
    """The fused op of `kernel`, over every rank's keys for a sharded problem: the op's arguments
    from q to key_mask -> (out, lse)."""
    p = problem
    normalize, eps = p.norm_eps is not None, p.norm_eps or 0.0
    if p.shards is not None:
        return lambda q, x, *weights_and_mask: sharded_input_attention(q, x, normalize, eps, *weights_and_mask,
                                                                       p.causal, p.scale, kernel, p.shards)
    seed = draw_seed(p.device) if p.dropout_p else None
    return lambda q, x, *weights_and_mask: input_attention(q, x, normalize, eps, *weights_and_mask, p.causal, p.scale,
                                                           p.dropout_p, seed, kernel, list(tiling) or [0])


def run_fused(problem: InputAttentionProblem, kernel: str, tiling: tuple[int, ...] = ()) -> torch.Tensor:
    """The output (B, H, N, Dv) of `problem` by its method on `kernel`'s fused input attention."""
    p = problem
    k_weight, k_bias = _fold(p.k_weight, p.k_bias, p.norm_weight, p.norm_bias)
    v_weight, v_bias = _fold(p.v_weight, p.v_bias, p.norm_weight, p.norm_bias)
    call = _input_attention_call(p, kernel, tiling)
    if p.method == "projection":
        out, _ = call(p.q, p.x, k_weight, k_bias, v_weight, v_bias, p.key_mask)
        return out
    # Shortcut: scores q.(Wk xn + bk) = (q Wk).xn + const per row; out = (P xn) Wv^T + bv where a
    # row has a key (P sums to 1), 0 where it has none.
    folded_q = torch.einsum("bhnd,hdc->bhnc", p.q, k_weight.view(p.heads, p.dim_qk, p.channels))
    attended, lse = call(folded_q, p.x, None, None, None, None, p.key_mask)
    out = torch.einsum("bhnc,hvc->bhnv", attended, v_weight.view(p.heads, p.dim_v, p.channels))
    has_key = torch.isfinite(lse).unsqueeze(-1).to(out.dtype)
    out = out + has_key * v_bias.view(p.heads, 1, p.dim_v)
    if k_bias.requires_grad:
        # The key bias cancels in the softmax, so its gradient is exactly 0; give it that 0
        # rather than none (DistributedDataParallel reports parameters that get no gradient).
        out = out + 0 * k_bias.sum()
    return out


def composed(problem: InputAttentionProblem) -> AttentionProblem:
    """The attention problem of `problem` with LayerNorm(x), K and V made in torch (unfused). Sharded,
    the weights act on this rank's keys only, so their gradients are summed over the ranks."""
    p = problem
    weights = (p.norm_weight, p.norm_bias, p.k_weight, p.k_bias, p.v_weight, p.v_bias)
    if p.shards is not None:
        weights = sum_gradients_across(p.shards, *weights)
    norm_weight, norm_bias, k_weight, k_bias, v_weight, v_bias = weights
    # A constant normalized shape: the TorchScript ONNX exporter takes no traced size there.
    x = p.x if p.norm_eps is None else F.layer_norm(p.x, (int(p.channels),), norm_weight, norm_bias, p.norm_eps)
    k = F.linear(x, k_weight, k_bias).view(p.batch, p.keys, p.heads, p.dim_qk).transpose(1, 2)
    v = F.linear(x, v_weight, v_bias).view(p.batch, p.keys, p.heads, p.dim_v).transpose(1, 2)
    return AttentionProblem(q=p.q, k=k, v=v, key_mask=p.key_mask, causal=p.causal, scale=p.scale,
                            kind=attention_kind(p.queries, p.keys, p.key_mask), shards=p.shards, dropout_p=p.dropout_p)
