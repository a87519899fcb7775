"""Sharded level: one cross-attention layer (`perceiver_fast.nn.CrossAttention`: LayerNorms,
projections, the fused input attention, output projection) on an input split along M over the
case's ranks, each rank one process of gloo on the CPU (the runner starts them: run.py). With one
rank it is the same layer unsharded, the baseline the sharded rows are read against."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .cases import Case
from .providers import Provider, make_call


def shard_length(case: Case, rank: int) -> int:
    """Rank r's share of M: M // ranks, the first M % ranks ranks one more."""
    return case.M // case.ranks + (rank < case.M % case.ranks)


def _refusal(case: Case, dtype, device) -> str | None:
    if device != "cpu":
        return "the sharded level runs gloo processes on the CPU"
    if case.ranks > 1 and not (dist.is_available() and dist.is_initialized()):
        return f"needs {case.ranks} processes in a torch.distributed group (the bench runner starts them)"
    return None


def _prepare(case: Case, dtype, device, backward):
    import perceiver_fast as pf

    group = dist.group.WORLD if case.ranks > 1 else None
    torch.manual_seed(0)  # the same weights and latents on every rank
    layer = pf.nn.CrossAttention(case.latent_dim, case.C, heads=case.H, qk_channels=case.H * case.dqk,
                                 v_channels=case.H * case.dv, process_group=group).to(device, dtype)
    latents = torch.randn(case.B, case.N, case.latent_dim, device=device, dtype=dtype, requires_grad=backward)
    rank = dist.get_rank() if group is not None else 0
    torch.manual_seed(1 + rank)
    inputs = torch.randn(case.B, shard_length(case, rank), case.C, device=device, dtype=dtype,
                         requires_grad=backward)
    return make_call(lambda: layer(latents, inputs), [latents, inputs, *layer.parameters()], backward)


def sharded_providers() -> list[Provider]:
    return [Provider("pf.nn.CrossAttention", "sharded", _refusal, _prepare)]
