"""Training on an input sharded along M across processes (pf.patch(model, process_group=) and the
pf.nn modules' process_group): under DistributedDataParallel over 2 and 3 gloo processes, each rank
passing its own shard of the input and padding mask, the parameters after a few SGD steps equal
those of one process training on the whole input (float32, relative error <= 1e-5), for a pf.nn
encoder behind an input embedding (whose gradients come from every shard; also composed, and
with a norm that runs unfused), a patched HF model,
lucidrains PerceiverIO and krasserm PerceiverIO (a batch item fully padded on one rank)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.distributed as dist
from ranks import requires_gloo, run_ranks

import perceiver_fast as pf

pytestmark = requires_gloo
STEPS = 3
TOLERANCE = 1e-5


class EmbeddedEncoder(torch.nn.Module):
    """A linear embedding of the raw input, applied to each rank's shard, then a pf.nn encoder."""

    def __init__(self, process_group=None, backend=None, rms_norm=False):
        super().__init__()
        self.embed = torch.nn.Linear(6, 12)
        self.encoder = pf.nn.PerceiverEncoder(12, num_latents=8, latent_dim=32, cross_heads=2, self_heads=4,
                                              self_layers=1, backend=backend, process_group=process_group)
        if rms_norm:  # not a LayerNorm: the input's norm and projections run unfused, then the sharded attention
            self.encoder.cross.attention.kv_norm = torch.nn.RMSNorm(12)

    def forward(self, x, key_mask):
        return self.encoder(self.embed(x), key_mask)


def _nn_case(group, **variant):
    base = EmbeddedEncoder(**variant)
    sharded = EmbeddedEncoder(group, **variant)
    sharded.load_state_dict(base.state_dict())

    def batch(generator):
        mask = torch.rand(2, 40, generator=generator) > 0.2
        mask[1, :30] = False  # batch item 1: nothing on rank 0
        return torch.randn(2, 40, 6, generator=generator), mask

    return base, None, sharded, batch, lambda m, d: m(*d).square().mean()


def _hf_case(group):
    from test_ddp import hf_case

    model, batch, loss = hf_case()
    return model, None, None, batch, loss


def _lucidrains_case(group):
    from test_ddp import lucidrains_case

    model, batch, loss = lucidrains_case()
    return model, None, None, batch, loss


def _krasserm_case(group):
    from test_ddp import krasserm_case

    model, batch, loss = krasserm_case()
    return model, None, None, batch, loss


CASES = {"pf.nn": _nn_case, "pf.nn composed": lambda group: _nn_case(group, backend="reference"),
         "pf.nn unfused norm": lambda group: _nn_case(group, rms_norm=True), "hf": _hf_case,
         "lucidrains": _lucidrains_case, "krasserm": _krasserm_case}
# Each batch tensor's axis along the input (None: replicated), by case.
INPUT_AXES = {"pf.nn": (1, 1), "pf.nn composed": (1, 1), "pf.nn unfused norm": (1, 1), "hf": (1, 1), "lucidrains": (1, 1, None), "krasserm": (1, 1)}


def _lengths(total: int, world: int) -> list[int]:
    """Uneven shards: rank r holds about (r + 2) parts."""
    weights = [r + 2 for r in range(world)]
    lengths = [total * w // sum(weights) for w in weights]
    lengths[-1] += total - sum(lengths)
    return lengths


def _train(model, data, loss_of) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        loss = loss_of(model, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def training_checks(rank: int, world: int, names: list[str]) -> dict:
    group = dist.group.WORLD
    results = {}
    for name in names:
        torch.manual_seed(0)
        base, _, sharded, batch, loss_of = CASES[name](group)
        data = batch(torch.Generator().manual_seed(1))
        whole = copy.deepcopy(base).train()
        if sharded is None:
            pf.patch(whole)
            sharded = copy.deepcopy(base)
            pf.patch(sharded, process_group=group)
        expected = _train(whole, data, loss_of)
        total = data[0].shape[1]
        lengths, start = _lengths(total, world), sum(_lengths(total, world)[:rank])
        shard = [t if axis is None else t.narrow(axis, start, lengths[rank]) for t, axis in
                 zip(data, INPUT_AXES[name])]
        got = _train(torch.nn.parallel.DistributedDataParallel(sharded.train()), shard, loss_of)
        scale = torch.sqrt(sum(p.norm() ** 2 for p in expected))
        moved = max(float((a - b.detach()).norm()) for a, b in zip(expected, base.parameters()))
        results[name] = {"error": max(float((a - b).norm() / max(float(b.norm()), 1e-3 * float(scale)))
                                      for a, b in zip(got, expected)), "moved": moved, "lengths": lengths}
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_under_ddp_equals_one_process_on_the_whole_input(tmp_path, world):
    names = ["pf.nn", "pf.nn composed", "pf.nn unfused norm", "hf", "krasserm"]
    names += ["lucidrains"] if importlib.util.find_spec("perceiver_pytorch") else []
    for rank, results in enumerate(run_ranks(training_checks, world, tmp_path, names)):
        for name, r in results.items():
            assert r["moved"] > 1e-4, f"{name}: training did not move the parameters"
            assert r["error"] <= TOLERANCE, f"rank {rank}, {name} (shards {r['lengths']}): error {r['error']:.2e}"
