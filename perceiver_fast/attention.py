"""The public attention functions (contract: docs/design.md)."""

from __future__ import annotations

import torch

from .arguments import check_flag, check_int, type_name
from .backends.base import serves_device
from .dispatch import get_backend, run_sharded, select_backend
from .dropout import check_dropout_p, draw_seed
from .validation import validate_attention


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                    return_lse: bool = False, backend: str | None = None, process_group=None):
    """Attention of N queries over M keys, fused (no N x M matrix) on the fast backends.

    q (B, H, N, Dqk), k (B, H, M, Dqk), v (B, H, M, Dv) -> out (B, H, N, Dv) in q's dtype.
    key_mask: optional bool (B, M), True = key may be attended. causal: bottom-right
    aligned, query i sees key j iff j <= i + M - N. A query with no key gets output 0
    and lse -inf. scale defaults to 1/sqrt(Dqk). return_lse=True returns (out, lse) with
    lse (B, H, N) float32 (not differentiable). backend: None/"auto", "triton", "cuda", "cpu" or
    "reference".

    dropout_p: attention dropout, applied whenever it is > 0 (pass 0 in eval, as
    F.scaled_dot_product_attention): each probability is dropped with probability dropout_p, the
    kept ones scaled by 1 / (1 - dropout_p), inside the kernel; the mask is drawn from a seed taken
    from torch's default generator for q's device (so torch.manual_seed fixes it, on every backend
    and thread count) and regenerated in the backward, never stored. lse stays that of the
    undropped scores. `attention_dropout_mask` shows the mask. Not with a process_group.

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
                               kind="cross", dropout_p=dropout_p, process_group=process_group)
        return (out, lse) if return_lse else out
    problem = validate_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, kind="cross",
                                 dropout_p=dropout_p)
    out, lse = select_backend(problem, backend).run(problem)
    return (out, lse) if return_lse else out


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Self-attention over the latent array (N == M), with tile choices for small square problems.

    Same layout, causal rule, scale, dropout and backends as `cross_attention`.
    """
    problem = validate_attention(q, k, v, causal=causal, scale=scale, kind="latent", dropout_p=dropout_p)
    out, _ = select_backend(problem, backend).run(problem)
    return out


def attention_dropout_mask(batch: int, heads: int, queries: int, keys: int, dropout_p: float, *,
                           device: torch.device | str = "cpu", backend: str = "cpu") -> torch.Tensor:
    """The bool (B, H, N, M) keep mask (True = kept) that the next attention call with these sizes
    and dropout_p on `device` would draw, as `backend`'s kernels generate it: it takes the seed from
    the same generator, so after `torch.manual_seed(s)` it is the mask of the first call after
    another `torch.manual_seed(s)`. A debugging and testing aid: it materialises B H N M values."""
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p == 0:
        raise ValueError("dropout_p must be > 0 for a dropout mask (0 keeps every probability and draws no seed)")
    sizes = [check_int(name, size, minimum=0) for name, size in
             (("batch", batch), ("heads", heads), ("queries", queries), ("keys", keys))]
    chosen = get_backend(backend)
    if chosen.unavailable:
        raise ValueError(f"backend {backend!r} is unavailable: {chosen.unavailable}")
    if not chosen.capabilities.dropout:
        raise ValueError(f"backend {backend!r} has no attention dropout, so no dropout mask")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a device name such as 'cpu', got {type_name(device)}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a device, such as 'cpu' or 'cuda:0', got {device!r}") from None
    if not serves_device(chosen.capabilities.devices, device.type):
        raise ValueError(f"device must be one that backend {backend!r} runs on "
                         f"({', '.join(sorted(chosen.capabilities.devices))}), got {device}: the mask is drawn by "
                         f"that backend's kernels, on that device")
    return chosen.dropout_keep_mask(draw_seed(device), *sizes, dropout_p)
