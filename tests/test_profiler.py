"""The profiler's logic (perceiver_fast.profiler): parts, the peak-memory formula against measured
peaks, the memory-budget search, size parsing and the `perceiver-fast profile` command."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from perceiver_fast.cli import main as cli
from perceiver_fast.profiler import ModelShape, find_parts, largest_input, predicted_peak_bytes, profile_model
from perceiver_fast.profiler.command import compare_patched, parse_size
from perceiver_fast.profiler.memory_model import WORKSPACE_BYTES, stage_bytes, with_inputs
from perceiver_fast.profiler.models import NAMED_MODELS, NamedModel

hf = pytest.importorskip("transformers")


def small_vision(side: int, latents: int = 128, width: int = 256):
    """HF vision-fourier's structure (C = 261, one cross head of 261) with a small latent stack."""
    config = hf.PerceiverConfig(num_latents=latents, d_latents=width, num_blocks=1, num_self_attends_per_block=2,
                                num_self_attention_heads=8, num_cross_attention_heads=1, image_size=side,
                                num_labels=10, self_attention_widening_factor=1, cross_attention_widening_factor=1)
    torch.manual_seed(0)
    return hf.PerceiverForImageClassificationFourier(config).eval()


def small_shape(batch: int, side: int, latents: int = 128, width: int = 256) -> ModelShape:
    return ModelShape(batch=batch, inputs=side * side, channels=261, raw_channels=3, latents=latents,
                      latent_dim=width, cross_heads=1, cross_qk=261, cross_v=261, self_heads=8, self_layers=2,
                      element_bytes=4)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    for bad in ("lots", "12 parsecs", "-1GiB", ""):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)


def test_parts_of_hf_and_lucidrains_models():
    parts = find_parts(small_vision(8))
    assert {k: len(v) for k, v in parts.items()} == {"input preprocessing": 1, "input cross-attention": 1,
                                                     "MLPs": 3, "latent self-attention": 2, "decoder": 1}
    lucidrains = pytest.importorskip("perceiver_pytorch")
    model = lucidrains.Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=2,
                                 num_latents=16, latent_dim=32, num_classes=5, weight_tie_layers=False)
    counts = {k: len(v) for k, v in find_parts(model).items()}
    assert counts["input cross-attention"] == 2 and counts["latent self-attention"] == 2 and counts["MLPs"] == 4


def test_stage_terms_follow_the_documented_formula():
    s = small_shape(2, 10)
    B, M, C, N, D, e = 2, 100, 261, 128, 256, 4
    x = B * M * C * e
    assert stage_bytes(s, patched=False) == {
        "preprocessing": 2 * x,
        "cross-attention": B * e * (2 * M * C + M * 1 * (261 + 261) + 2 * 1 * N * M),
        "latent self-attention": x + B * e * (2 * 8 * N * N + 7 * N * D)}
    assert stage_bytes(s, patched=True)["cross-attention"] == x + 2 * B * 1 * N * C * e
    assert predicted_peak_bytes(s, False) == max(stage_bytes(s, False).values()) + WORKSPACE_BYTES
    mlm = replace(s, decoder_queries=100, decoder_channels=64, decoder_heads=8, decoder_dim=262)
    assert stage_bytes(mlm, False)["decoder"] == x + B * e * 100 * (8 * 64 + 2 * 8 * N + 262)
    assert stage_bytes(mlm, True)["decoder"] == x + B * e * 100 * (8 * 64 + 262)
    assert with_inputs(mlm, 400).decoder_queries == 400 and with_inputs(s, 400).decoder_queries == 0


def test_largest_input_is_the_last_length_that_fits():
    shape = small_shape(2, 10)
    weights = 10 * 2**20
    budget = 400 * 2**20
    for patched in (False, True):
        square = largest_input(lambda m: with_inputs(shape, m), weights, budget, patched, length_of=lambda k: k * k)
        side = math.isqrt(square)
        assert side * side == square

        def total(m):
            s = with_inputs(shape, m)
            return weights + s.batch * m * s.raw_channels * s.element_bytes + predicted_peak_bytes(s, patched)

        assert total(square) <= budget < total((side + 1) ** 2)
    assert largest_input(lambda m: with_inputs(shape, m), weights, 2**20, True) is None


def test_predicted_peak_within_25_percent_of_measured():
    """B = 2, M = 36864 (192 x 192): the cross-attention dominates unpatched, preprocessing patched."""
    side, batch = 192, 2
    model = small_vision(side)
    pixels = torch.randn(batch, 3, side, side)
    unpatched, patched = compare_patched(model, lambda m: m(inputs=pixels).logits)
    shape = small_shape(batch, side)
    for profile, is_patched in ((unpatched, False), (patched, True)):
        predicted = predicted_peak_bytes(shape, is_patched) / 2**20
        assert abs(predicted - profile.peak_mib) <= 0.25 * profile.peak_mib, (is_patched, predicted, profile.peak_mib)
        assert set(profile.parts) == {"input preprocessing", "input cross-attention", "latent self-attention",
                                      "MLPs", "decoder"}
        assert all(p.calls >= 1 and p.ms > 0 for p in profile.parts.values())
        assert profile.total_ms >= sum(p.ms for p in profile.parts.values())
    assert unpatched.parts["input cross-attention"].peak_mib > 2 * patched.parts["input cross-attention"].peak_mib


def test_profile_with_backward_runs_the_backward():
    model = small_vision(16)
    pixels = torch.randn(1, 3, 16, 16)
    profile = profile_model(model, lambda m: m(inputs=pixels).logits, backward=True)
    assert profile.total_ms > 0 and all(p.grad is None for p in model.parameters())


@pytest.fixture
def small_named_model(monkeypatch):
    base = NAMED_MODELS["hf-vision-fourier"]
    small = NamedModel("hf-vision-fourier", "small test variant", base.valid_length,
                       lambda length, dtype: small_vision(math.isqrt(length)).to(dtype), base.inputs, base.run,
                       lambda batch, length, dtype: small_shape(batch, math.isqrt(length)))
    monkeypatch.setitem(NAMED_MODELS, "hf-vision-fourier", small)


def test_profile_command_prints_parts_prediction_and_budget(small_named_model, capsys):
    assert cli(["profile", "--model", "hf-vision-fourier", "--input-len", "1024", "--batch", "1",
                "--memory-budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    for expected in ("input cross-attention", "latent self-attention", "MLPs", "decoder", "whole model (measured)",
                     "whole model (predicted)", "longest input within 1GiB", "patched (predicted, weights included)"):
        assert expected in out, expected


def test_profile_command_rejects_bad_arguments(capsys):
    for argv, message in ((["--input-len", "1000"], "square"),
                          (["--input-len", "1024", "--memory-budget", "much"], "--memory-budget"),
                          (["--input-len", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            cli(["profile", "--model", "hf-vision-fourier", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["profile", "--model", "gpt", "--input-len", "4"])
    assert "--model: 'gpt' is no named model" in capsys.readouterr().err


USER_MODEL = """
import torch
from perceiver_pytorch import PerceiverIO


def make_model():
    model = PerceiverIO(dim=12, queries_dim=8, depth=1, num_latents=8, latent_dim=16, cross_heads=1,
                        latent_heads=2, cross_dim_head=8, latent_dim_head=8).eval()

    def make_inputs(batch, input_len, dtype, device):
        return {"data": torch.randn(batch, input_len, 12, dtype=dtype, device=device),
                "queries": torch.randn(batch, 3, 8, dtype=dtype, device=device)}

    return model, make_inputs


def not_a_pair():
    return 3
"""


@pytest.fixture
def user_model_file(tmp_path):
    pytest.importorskip("perceiver_pytorch")
    path = tmp_path / "my_perceiver.py"
    path.write_text(USER_MODEL)
    return path


def test_a_user_model_profiles_from_the_command_line_with_json(user_model_file, tmp_path, capfd):
    out_json = tmp_path / "profile.json"
    assert cli(["profile", "--model", f"{user_model_file}:make_model", "--input-len", "300", "--batch", "2",
                "--json", str(out_json)]) == 0
    out, err = capfd.readouterr()
    assert "input cross-attention" in out and "whole model (measured)" in out
    assert f"the memory formula does not cover {user_model_file}:make_model" in out
    assert "profiler_start" not in out + err and "USDT" not in out + err, "the profiler's own log lines leaked"
    figures = json.loads(out_json.read_text())
    assert figures["model"] == f"{user_model_file}:make_model" and figures["batch"] == 2
    assert figures["predicted_peak_mib"] is None and figures["longest_input"] is None
    for side in ("unpatched", "patched"):
        assert figures[side]["total_ms"] > 0 and "input cross-attention" in figures[side]["parts"]


def test_a_user_model_by_module_name(user_model_file, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(user_model_file.parent))
    assert cli(["profile", "--model", "my_perceiver:make_model", "--input-len", "100"]) == 0
    assert "PerceiverIO from my_perceiver:make_model" in capsys.readouterr().out


def test_user_model_errors_name_the_argument(user_model_file, capsys):
    for spec, message in ((f"{user_model_file}:missing", "has no function 'missing'"),
                          ("/no/such/file.py:make", "no file /no/such/file.py"),
                          ("no_such_module_here:make", "cannot import module 'no_such_module_here'"),
                          (f"{user_model_file}:not_a_pair", "must return (model, make_inputs)")):
        with pytest.raises(SystemExit):
            cli(["profile", "--model", spec, "--input-len", "10"])
        assert "--model: " in (err := capsys.readouterr().err) and message in err, err
    with pytest.raises(SystemExit):
        cli(["profile", "--model", f"{user_model_file}:make_model", "--input-len", "10", "--memory-budget", "1GiB"])
    assert "--memory-budget: the memory formula does not cover" in capsys.readouterr().err


def test_hf_optical_flow_profiles_at_a_reduced_size(capsys):
    """The published optical-flow configuration (2048 latents, 24 layers, a per-pixel decoder) on the
    smallest frame of its aspect ratio, 23 x 31 pixels."""
    pytest.importorskip("transformers")
    assert cli(["profile", "--model", "hf-optical-flow", "--input-len", "713", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for part in ("input preprocessing", "input cross-attention", "latent self-attention", "decoder"):
        assert part in out, part
    assert "the memory formula does not cover hf-optical-flow" in out
    with pytest.raises(SystemExit):
        cli(["profile", "--model", "hf-optical-flow", "--input-len", "1000"])
    assert "--input-len: hf-optical-flow takes 23:31 frames" in capsys.readouterr().err
