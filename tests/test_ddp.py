"""Patched models train under DistributedDataParallel: 2 processes, gloo on the CPU, a file rendezvous
(no network), each rank its own data. After a few SGD steps the patched model's parameters equal the
unpatched model's in the same setup (float32, dropout 0, within 1e-5 relative), for HF, lucidrains
and krasserm models, with no fallback to the library's attention. With HF's default attention
dropout (0.1) the patched model trains fused, and the unpatched one, given the library's masks
(model_checks.SameMaskDropout), reaches the same parameters and losses. The processes run under a
deadline: a hang fails the test, naming where it stopped."""

from __future__ import annotations

import copy

import pytest
import torch
from ranks import requires_gloo, run_ranks

import perceiver_fast as pf

WORLD = 2
STEPS = 3
pytestmark = requires_gloo


def hf_case(dropout: float = 0.0):
    from transformers import PerceiverConfig
    from transformers.models.perceiver.modeling_perceiver import PerceiverModel

    config = PerceiverConfig(num_latents=8, d_latents=32, d_model=12, num_self_attends_per_block=2,
                             num_cross_attention_heads=1, num_self_attention_heads=4,
                             attention_probs_dropout_prob=dropout)

    def batch(generator):
        mask = torch.ones(2, 30)
        mask[1, 20:] = 0
        return torch.randn(2, 30, 12, generator=generator), mask

    def loss(model, data):
        x, mask = data
        return model(inputs=x, attention_mask=mask).last_hidden_state.square().mean()

    return PerceiverModel(config), batch, loss


def lucidrains_case():
    from perceiver_pytorch import PerceiverIO

    model = PerceiverIO(dim=12, queries_dim=8, depth=2, num_latents=8, latent_dim=32, cross_heads=1, latent_heads=4,
                        cross_dim_head=16, latent_dim_head=8)

    def batch(generator):
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[1, 22:] = False
        return torch.randn(2, 30, 12, generator=generator), mask, torch.randn(2, 5, 8, generator=generator)

    def loss(model, data):
        x, mask, queries = data
        return model(x, mask=mask, queries=queries).square().mean()

    return model, batch, loss


class WithPadMask(torch.nn.Module):
    """krasserm's PerceiverIO is a Sequential that passes no pad mask on: its encoder and decoder, called
    with one, under a module that DDP can wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, pad_mask):
        from test_patch_krasserm import run_io

        return run_io(self.model, x, pad_mask)


def krasserm_case():
    from test_patch_krasserm import pad_mask, perceiver_io

    def batch(generator):
        return torch.randn(3, 40, 20, generator=generator), pad_mask(3, 40)

    def loss(model, data):
        return model(*data).square().mean()

    return WithPadMask(perceiver_io()), batch, loss


CASES = {"hf": hf_case, "lucidrains": lucidrains_case, "krasserm": krasserm_case,
         "hf-dropout": lambda: hf_case(dropout=0.1)}


def train(base, batch, loss_of, rank: int, patched: bool):
    """STEPS steps of SGD on a DDP-wrapped copy of base: (parameters, losses, fallback reasons)."""
    from model_checks import FallbackLog, with_same_mask_dropout

    model = copy.deepcopy(base).train()
    if patched:
        pf.patch(model)
    else:
        with_same_mask_dropout(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    data_seed, dropout_seed = torch.Generator().manual_seed(1000 + rank), 2000 + rank
    torch.manual_seed(dropout_seed)  # the same dropout masks for the patched and unpatched runs
    losses = []
    with FallbackLog() as fallbacks:
        for _ in range(STEPS):
            loss = loss_of(ddp, batch(data_seed))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses, sorted(set(fallbacks.reasons))


def training_results(rank: int, world: int, names: list[str]) -> dict:
    """Each named case trained patched and unpatched on this rank: the largest relative parameter
    difference, how far training moved the parameters, both runs' losses and the fallbacks seen."""
    results = {}
    for name in names:
        torch.manual_seed(0)
        base, batch, loss_of = CASES[name]()
        (fast, fast_losses, fallbacks), (plain, plain_losses, _) = (train(base, batch, loss_of, rank, patched)
                                                                    for patched in (True, False))
        total = torch.sqrt(sum(p.norm() ** 2 for p in plain))
        errors = [float((a - b).norm() / max(float(b.norm()), 1e-3 * float(total))) for a, b in zip(fast, plain)]
        moved = max(float((a - b.detach()).norm()) for a, b in zip(plain, base.parameters()))
        results[name] = {"max_relative_error": max(errors), "moved": moved, "fast_losses": fast_losses,
                         "plain_losses": plain_losses, "fallbacks": fallbacks}
    return results


def test_patched_models_train_under_ddp_to_the_unpatched_parameters(tmp_path):
    names = ["hf"]
    names += ["lucidrains"] if pytest.importorskip("perceiver_pytorch") else []
    names += ["krasserm"] if pytest.importorskip("perceiver.model.core") else []
    results = run_ranks(training_results, WORLD, tmp_path, names + ["hf-dropout"])[0]
    for name in names + ["hf-dropout"]:
        r = results[name]
        assert r["moved"] > 1e-4, f"{name}: training did not move the parameters"
        assert r["max_relative_error"] <= 1e-5, f"{name}: patched parameters differ by {r['max_relative_error']:.2e}"
        assert not r["fallbacks"], f"{name}: the patched model fell back in training: {r['fallbacks']}"
    dropout = results["hf-dropout"]
    assert all(torch.isfinite(torch.tensor(dropout["fast_losses"] + dropout["plain_losses"])))
    assert torch.allclose(torch.tensor(dropout["fast_losses"]), torch.tensor(dropout["plain_losses"]), rtol=1e-4)
    assert dropout["fast_losses"] != results["hf"]["fast_losses"]  # the dropout did drop
