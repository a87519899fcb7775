"""FLOP counts of the ops, in closed form: the scored query-key pairs of a problem (causal-aware),
and the cost of each fused input-attention method, which decides the method "auto" picks."""

from __future__ import annotations

INPUT_METHODS = ("shortcut", "projection")


def visible_pairs(queries: int, keys: int, causal: bool) -> int:
    """Query-key pairs that are scored: N * M, or under bottom-right causal masking those with j <= i + M - N.

    Query i sees min(M, max(0, i + M - N + 1)) keys, so the causal count is the sum of the integers
    from max(1, M - N + 1) to M.
    """
    if not causal:
        return queries * keys
    first = max(1, keys - queries + 1)
    return keys * (keys + 1) // 2 - (first - 1) * first // 2


def method_flops(queries: int, keys: int, channels: int, dim_qk: int, dim_v: int, causal: bool = False
                 ) -> dict[str, int]:
    """Multiply-add FLOPs per head and batch item of each input-attention method (key-mask savings not counted).

    shortcut: scores and weighted sum over C channels, 4 P C (P scored pairs), plus folding the
    queries through Wk and the result through Wv, 2 N C (Dqk + Dv).
    projection: K and V of every key, 2 M C (Dqk + Dv), plus the attention, 2 P (Dqk + Dv).
    """
    pairs = visible_pairs(queries, keys, causal)
    return {"shortcut": 4 * pairs * channels + 2 * queries * channels * (dim_qk + dim_v),
            "projection": 2 * keys * channels * (dim_qk + dim_v) + 2 * pairs * (dim_qk + dim_v)}


def choose_method(queries: int, keys: int, channels: int, dim_qk: int, dim_v: int, causal: bool = False) -> str:
    """The input-attention method with fewer FLOPs (the shortcut on a tie)."""
    flops = method_flops(queries, keys, channels, dim_qk, dim_v, causal)
    return "shortcut" if flops["shortcut"] <= flops["projection"] else "projection"
