"""The public attention functions (contract: docs/design.md)."""

from __future__ import annotations

import torch

from .dispatch import run_sharded, select_backend
from .validation import check_flag, validate_attention


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    causal: bool = False, scale: float | None = None, return_lse: bool = False,
                    backend: str | None = None, process_group=None):
    """Attention of N queries over M keys, fused (no N x M matrix) on the fast backends.

    q (B, H, N, Dqk), k (B, H, M, Dqk), v (B, H, M, Dv) -> out (B, H, N, Dv) in q's dtype.
    key_mask: optional bool (B, M), True = key may be attended. causal: bottom-right
    aligned, query i sees key j iff j <= i + M - N. A query with no key gets output 0
    and lse -inf. scale defaults to 1/sqrt(Dqk). return_lse=True returns (out, lse) with
    lse (B, H, N) float32 (not differentiable). backend: None/"auto", "triton", "cuda", "cpu" or
    "reference".

    process_group: a torch.distributed ProcessGroup over which the key axis is sharded (None: not
    sharded). k, v and key_mask are then this rank's contiguous shard of the keys (shards in rank
    order, of any length, 0 included), q is the same on every rank, and out and lse are those of
    the attention over every rank's keys, on every rank; causal is bottom-right aligned on global
    positions. q's gradient is the full one on every rank, k's and v's this shard's. Every rank of
    the group must make the call (it is a collective: two all-reduces forward, one backward); ranks
    whose calls disagree (dims, flags, or q itself) all raise ValueError. See docs/distributed.md.
    """
    return_lse = check_flag("return_lse", return_lse)
    if process_group is not None:
        out, lse = run_sharded(validate_attention, backend, q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                               kind="cross", process_group=process_group)
        return (out, lse) if return_lse else out
    problem = validate_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, kind="cross")
    out, lse = select_backend(problem, backend).run(problem)
    return (out, lse) if return_lse else out


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Self-attention over the latent array (N == M), with tile choices for small square problems.

    Same layout, causal rule, scale and backends as `cross_attention`.
    """
    problem = validate_attention(q, k, v, causal=causal, scale=scale, kind="latent")
    out, _ = select_backend(problem, backend).run(problem)
    return out
