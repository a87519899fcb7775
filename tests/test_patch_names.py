"""Patched classes keep the original's name: type(m).__name__, repr and HF's config.architectures are
those of the unpatched model; pickling (torch.save of the whole model), deepcopy and HF's
save_pretrained/from_pretrained round trips work and keep the model patched where it was."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

import perceiver_fast as pf
from model_checks import relative_error
from perceiver_fast.patching.registry import FastModule, original_class

hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
from transformers import PerceiverConfig  # noqa: E402


def hf_model():
    config = PerceiverConfig(num_latents=6, d_latents=16, d_model=8, num_self_attends_per_block=1,
                             attention_probs_dropout_prob=0.0)
    return hf.PerceiverModel(config).eval()


def lucidrains_model():
    from perceiver_pytorch import PerceiverIO

    return PerceiverIO(dim=12, queries_dim=8, depth=1, num_latents=6, latent_dim=16, cross_heads=1,
                       latent_heads=2, cross_dim_head=8, latent_dim_head=8).eval()


def krasserm_model():
    from test_patch_krasserm import causal_model

    return causal_model()


MODELS = {"hf": hf_model, "lucidrains": lucidrains_model, "krasserm": krasserm_model}


def patched_pair(name):
    pytest.importorskip({"hf": "transformers", "lucidrains": "perceiver_pytorch", "krasserm": "perceiver"}[name])
    model = MODELS[name]()
    fast = copy.deepcopy(model)
    pf.patch(fast)
    return model, fast


@pytest.mark.parametrize("name", MODELS)
def test_names_and_repr_are_the_originals(name):
    model, fast = patched_pair(name)
    patched = [m for m in fast.modules() if isinstance(m, FastModule)]
    assert patched
    for module in patched:
        original = original_class(type(module))
        assert type(module) is not original and isinstance(module, original)
        assert type(module).__name__ == original.__name__ and type(module).__qualname__ == original.__qualname__
    assert repr(fast) == repr(model)
    assert [type(m).__name__ for m in fast.modules()] == [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("name", MODELS)
def test_pickle_and_deepcopy_keep_the_patched_classes(name):
    _, fast = patched_pair(name)
    pf.patch(fast, backend="cpu")
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(fast)):
        assert [type(m) for m in copied.modules()] == [type(m) for m in fast.modules()]
        assert all(m.pf_backend == "cpu" for m in copied.modules() if isinstance(m, FastModule))
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), fast.state_dict().values()))
    assert pf.unpatch(copy.deepcopy(fast)).total == pf.unpatch(fast).total > 0


def test_a_patched_model_unpickles_in_a_fresh_process(tmp_path):
    _, fast = patched_pair("hf")
    torch.save(fast, tmp_path / "model.pt")
    inputs = torch.randn(2, 10, 8)
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = fast(inputs=inputs).last_hidden_state
    script = (f"import torch; m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False); "
              f"x = torch.load({str(tmp_path / 'inputs.pt')!r}); "
              "print(type(m).__module__, type(m).__name__); "
              f"torch.save(m(inputs=x).last_hidden_state, {str(tmp_path / 'out.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["perceiver_fast.patching.hf", "PerceiverModel"]
    assert relative_error(torch.load(tmp_path / "out.pt"), expected) == 0


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model, fast = patched_pair("hf")
    fast.save_pretrained(tmp_path)
    assert fast.config.architectures == ["PerceiverModel"]
    loaded = hf.PerceiverModel.from_pretrained(tmp_path).eval()
    assert loaded.config.architectures == ["PerceiverModel"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fast.state_dict().values()))
    pf.patch(loaded)
    inputs = torch.randn(2, 10, 8)
    assert relative_error(loaded(inputs=inputs).last_hidden_state, model(inputs=inputs).last_hidden_state) <= 1e-4
