"""The profiler's logic (perceiver_fast.profiler): parts, the peak-memory formula against measured
peaks, the memory-budget search, size parsing and the `perceiver-fast profile` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from perceiver_fast.cli import main as cli
from perceiver_fast.profiler import ModelShape, find_parts, largest_input, predicted_peak_bytes, profile_model
from perceiver_fast.profiler.command import compare_patched, parse_size
from perceiver_fast.profiler.memory_model import (WORKSPACE_BYTES, largest_batch, optimizer_state_bytes, saved_bytes,
                                                  stage_bytes, training_peak_bytes, training_stage_bytes, with_inputs)
from perceiver_fast.profiler.models import NAMED_MODELS, NamedModel
from perceiver_fast.profiler.parts import PartStats, Profile

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
                                                     "MLPs": 6, "latent self-attention": 2, "decoder": 1}
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
    assert stage_bytes(s, patched=True)["latent self-attention"] == x + B * e * 7 * N * D
    assert predicted_peak_bytes(s, False) == max(stage_bytes(s, False).values()) + WORKSPACE_BYTES
    mlm = replace(s, decoder_queries=100, decoder_channels=64, decoder_heads=8, decoder_qk=4, decoder_v=8,
                  decoder_dim=262)
    assert stage_bytes(mlm, False)["decoder"] == x + B * e * 100 * (8 * 64 + 2 * 8 * N + 262)
    assert stage_bytes(mlm, True)["decoder"] == x + B * e * 100 * (8 * 64 + 262)
    assert with_inputs(mlm, 400).decoder_queries == 400 and with_inputs(s, 400).decoder_queries == 0


def test_largest_input_and_batch_are_the_last_that_fit():
    shape = small_shape(2, 10)
    weights = 10 * 2**20
    budget = 400 * 2**20

    def total(s, patched):
        return weights + s.batch * s.inputs * s.raw_channels * s.element_bytes + predicted_peak_bytes(s, patched)

    for patched in (False, True):
        def peak(s, patched=patched):
            return predicted_peak_bytes(s, patched)

        square = largest_input(shape, weights, budget, peak, length_of=lambda k: k * k)
        side = math.isqrt(square)
        assert side * side == square
        assert total(with_inputs(shape, square), patched) <= budget < total(with_inputs(shape, (side + 1) ** 2), patched)
        batch = largest_batch(shape, weights, budget, peak)
        assert total(replace(shape, batch=batch), patched) <= budget < total(replace(shape, batch=batch + 1), patched)
    assert largest_input(shape, weights, 2**20, lambda s: predicted_peak_bytes(s, True)) is None
    assert largest_batch(shape, weights, 2**20, lambda s: predicted_peak_bytes(s, True)) is None
    # Weights that grow with the input (position embeddings) shorten the longest input.
    def peak(s):
        return predicted_peak_bytes(s, True)

    growing = largest_input(shape, lambda s: weights + 4096 * s.inputs, budget, peak)
    assert growing < largest_input(shape, weights, budget, peak)
    assert total(with_inputs(shape, growing), True) + 4096 * growing <= budget


def test_parameters_growing_with_the_input_length():
    from perceiver_fast.profiler.command import _parameter_bytes_per_input

    assert _parameter_bytes_per_input(NAMED_MODELS["hf-vision-fourier"], torch.float32) == 0  # Fourier features
    language = NamedModel("hf-language", "small", lambda length: None, lambda length, dtype: small_language(length),
                          None, None, None)
    # hf-language: its input position embeddings and its decoder's queries, 768 channels each per position
    assert _parameter_bytes_per_input(language, torch.float32) == 2 * 768 * 4


def small_language(length: int):
    """HF PerceiverForMaskedLM's structure (8 cross heads over C = 768, the MLM decoder) with a small latent stack."""
    config = hf.PerceiverConfig(num_latents=64, d_latents=128, num_self_attends_per_block=2,
                                max_position_embeddings=length)
    torch.manual_seed(0)
    return hf.PerceiverForMaskedLM(config).eval()


def small_language_shape(batch: int, length: int) -> ModelShape:
    return ModelShape(batch=batch, inputs=length, channels=768, raw_channels=768, latents=64, latent_dim=128,
                      cross_heads=8, cross_qk=96, cross_v=96, self_heads=8, self_layers=2, element_bytes=4,
                      decoder_queries=length, decoder_channels=768, decoder_heads=8, decoder_qk=32, decoder_v=96,
                      decoder_dim=262)


def measured_saved_bytes(model, run) -> dict[str, int]:
    """Bytes of the tensors the forward saves for the backward (each storage once, parameters left out),
    per part of find_parts (outside the parts: the part called last, as the formula counts a layer's tail)."""
    parts, current = find_parts(model), ["input cross-attention"]
    handles = [module.register_forward_pre_hook(lambda module, args, name=name: current.__setitem__(0, name))
               for name, modules in parts.items() for module in modules]
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved = set(), {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen | parameters:
            seen.add(storage.data_ptr())
            part = {"MLPs": "latent self-attention"}.get(current[0], current[0])  # MLPs: in their layer's tail
            saved[part] = saved.get(part, 0) + storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return saved


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", ["vision-fourier", "language"])
def test_saved_activations_follow_the_training_formula(family, patched):
    """The formula's saved bytes against the tensors autograd really keeps, in total within 5%."""
    import perceiver_fast as pf

    if family == "vision-fourier":
        model, shape = small_vision(48), small_shape(2, 48)
        inputs = torch.randn(2, 3, 48, 48)
    else:
        model, shape = small_language(256), small_language_shape(2, 256)
        inputs = torch.randint(0, 262, (2, 256))
    if patched:
        pf.patch(model)
    measured = sum(measured_saved_bytes(model, lambda m: m(inputs=inputs).logits).values())
    predicted = sum(saved_bytes(shape, patched).values())
    assert abs(predicted - measured) <= 0.05 * measured, (predicted / 2**20, measured / 2**20)


def test_training_stages_follow_the_documented_formula():
    s = replace(small_language_shape(2, 256), self_layers=3)
    parameters = {"input preprocessing": 7, "input cross-attention": 11, "latent self-attention": 13, "MLPs": 17,
                  "decoder": 19, "other": 23}
    B, M, C, N, D, e, Q = 2, 256, 768, 64, 128, 4, 256
    for patched in (False, True):
        saved = saved_bytes(s, patched)
        stages = training_stage_bytes(s, patched, parameters, "adamw")
        everything, G = sum(saved.values()), sum(parameters.values())
        logits = B * e * Q * 262
        assert stages["forward end"] == everything + logits
        assert stages["decoder backward"] == everything + 19 + 2 * logits + (0 if patched else B * e * 2 * 8 * Q * N)
        latent = B * e * ((0 if patched else 2 * 8 * N * N) + 4 * N * D)
        assert stages["latent backward, first layer"] == everything - saved["decoder"] + 19 + latent
        assert stages["latent backward, last layer"] == saved["input cross-attention"] + G - 7 - 11 + latent
        assert stages["cross-attention backward"] == (saved["input cross-attention"] + G + B * e * (
            (0 if patched else 8 * N * M) + M * C))
        assert stages["optimizer step"] == G
        assert training_peak_bytes(s, patched, parameters, "adamw") == max(stages.values()) + WORKSPACE_BYTES
        assert "optimizer step" not in training_stage_bytes(s, patched, parameters)
    assert saved_bytes(s, False)["latent self-attention"] == B * e * 3 * (8 * N * N + 6 * N * D + 4 * N * D)
    assert optimizer_state_bytes("adamw", 10) == 20 and optimizer_state_bytes("sgd", 10) == 10
    assert optimizer_state_bytes(None, 10) == 0


FRESH_PROFILE = """
import dataclasses, json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_profiler import small_vision
from perceiver_fast.profiler.command import compare_patched
from perceiver_fast.profiler.parts import find_parts, parameter_bytes_by_part
side, batch, backward, optimizer = json.loads(sys.argv[2])
model = small_vision(side)
pixels = torch.randn(batch, 3, side, side)
profiles = compare_patched(model, lambda m: m(inputs=pixels).logits, backward=backward, optimizer=optimizer)
print(json.dumps({"profiles": [dataclasses.asdict(p) for p in profiles],
                  "parameters": parameter_bytes_by_part(model, find_parts(model))}))
"""


def profiled_in_a_fresh_process(side: int, batch: int, backward: bool = False, optimizer: str | None = None):
    """compare_patched on small_vision(side) in a new interpreter: (unpatched, patched, parameter bytes by part).

    CPU peaks are resident-set figures, and in a process whose heap earlier tests fragmented, freed
    heap blocks come back into use and overstate a peak; the command runs in its own process too."""
    proc = subprocess.run([sys.executable, "-c", FRESH_PROFILE, str(Path(__file__).parent),
                           json.dumps([side, batch, backward, optimizer])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    profiles = [Profile(**{**p, "parts": {name: PartStats(**stats) for name, stats in p["parts"].items()}})
                for p in result["profiles"]]
    return profiles[0], profiles[1], result["parameters"]


@pytest.mark.parametrize("optimizer", [None, "adamw"])
def test_predicted_training_peak_within_25_percent_of_measured(optimizer):
    """A training step of a reduced vision-fourier model at B = 2, M = 36864 (192 x 192), patched and unpatched."""
    side, batch = 192, 2
    *profiles, parameters = profiled_in_a_fresh_process(side, batch, backward=True, optimizer=optimizer)
    for profile, is_patched in zip(profiles, (False, True)):
        predicted = training_peak_bytes(small_shape(batch, side), is_patched, parameters, optimizer) / 2**20
        assert abs(predicted - profile.peak_mib) <= 0.25 * profile.peak_mib, (is_patched, predicted, profile.peak_mib)
        assert profile.backward and profile.backward_ms > 0 and (profile.optimizer_ms > 0) == (optimizer is not None)


def test_backward_is_attributed_to_the_parts():
    """Every part that has a backward gets its time and memory; what stays outside the parts is small."""
    model = small_vision(96)
    pixels = torch.randn(2, 3, 96, 96)
    for profile in compare_patched(model, lambda m: m(inputs=pixels).logits, backward=True):
        for name in ("input cross-attention", "latent self-attention", "MLPs", "decoder"):
            part = profile.parts[name]
            assert part.backward_ms > 0 and part.backward_peak_mib > 0, name
        # Fourier preprocessing has no parameters and its input needs no gradient: no backward.
        assert profile.parts["input preprocessing"].backward_ms == 0
        assert profile.backward_ms >= sum(p.backward_ms for p in profile.parts.values())
        outside = profile.other_ms() + profile.other_backward_ms()
        assert outside < 0.15 * profile.total_ms, (outside, profile.total_ms)
    assert all(p.grad is None for p in model.parameters())


def test_profile_model_rejects_an_optimizer_without_backward():
    with pytest.raises(ValueError, match="optimizer: a step needs the backward"):
        profile_model(small_vision(8), lambda m: m(inputs=torch.randn(1, 3, 8, 8)).logits, optimizer="adamw")
    with pytest.raises(ValueError, match="optimizer: one of adamw, sgd"):
        profile_model(small_vision(8), lambda m: m(inputs=torch.randn(1, 3, 8, 8)).logits, backward=True,
                      optimizer="lamb")


def test_predicted_peak_within_25_percent_of_measured():
    """B = 2, M = 36864 (192 x 192): the cross-attention dominates unpatched, preprocessing patched."""
    side, batch = 192, 2
    unpatched, patched, _ = profiled_in_a_fresh_process(side, batch)
    shape = small_shape(batch, side)
    for profile, is_patched in ((unpatched, False), (patched, True)):
        predicted = predicted_peak_bytes(shape, is_patched) / 2**20
        assert abs(predicted - profile.peak_mib) <= 0.25 * profile.peak_mib, (is_patched, predicted, profile.peak_mib)
        assert set(profile.parts) == {"input preprocessing", "input cross-attention", "latent self-attention",
                                      "MLPs", "decoder"}
        assert all(p.calls >= 1 and p.ms > 0 for p in profile.parts.values())
        assert profile.total_ms >= sum(p.ms for p in profile.parts.values())
    assert unpatched.parts["input cross-attention"].peak_mib > 2 * patched.parts["input cross-attention"].peak_mib


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
                     "whole model (predicted)", "within 1GiB, inference, patched (predicted, weights included)",
                "largest batch at M=1024"):
        assert expected in out, expected


def test_profile_command_training_step(small_named_model, capsys, tmp_path):
    out_json = tmp_path / "train.json"
    assert cli(["profile", "--model", "hf-vision-fourier", "--input-len", "1024", "--batch", "2", "--backward",
                "--optimizer", "sgd", "--memory-budget", "2GiB", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for expected in ("fwd ms", "bwd ms", "bwd MiB", "optimizer step", "other (outside the parts)",
                     "whole model (predicted)", "training step (forward, backward, sgd step)",
                     "within 2GiB, training, optimizer sgd", "within 2GiB, inference, unpatched", "] patched: timed call"):
        assert expected in out, expected
    figures = json.loads(out_json.read_text())
    assert figures["optimizer"] == "sgd" and figures["unpatched"]["backward_ms"] > 0
    assert figures["patched"]["parts"]["input cross-attention"]["backward_ms"] > 0
    assert figures["fits_budget"]["training, patched"]["largest_batch"] >= 1
    assert set(figures["predicted_peak_mib"]) == {"unpatched", "patched"}


def test_profile_command_rejects_bad_arguments(capsys):
    for argv, message in ((["--input-len", "1000"], "square"),
                          (["--input-len", "1024", "--memory-budget", "much"], "--memory-budget"),
                          (["--input-len", "0"], "at least 1"),
                          (["--input-len", "1024", "--optimizer", "adamw"], "--optimizer: an optimizer steps")):
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
    assert figures["predicted_peak_mib"] is None and figures["fits_budget"] is None
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


def no_work(*args, **kwargs):
    raise AssertionError("the command started its work before rejecting its arguments")


def test_a_user_model_holding_no_perceiver_is_a_command_line_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "plain.py"
    path.write_text("import torch\n\n\ndef make_model():\n"
                    "    return torch.nn.Linear(4, 4), lambda batch, length, dtype, device: torch.randn(batch, 4)\n")
    monkeypatch.setattr("perceiver_fast.profiler.parts.profile_models", no_work)
    with pytest.raises(SystemExit) as exit_:
        cli(["profile", "--model", f"{path}:make_model", "--input-len", "8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert (f"error: --model: {path}:make_model gives no patched model to compare: patch found no attention module "
            f"it knows in Linear; it supports HF transformers Perceiver* models") in err, err


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_profile_output_paths_are_checked_before_any_work(option, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("perceiver_fast.profiler.command._model", no_work)
    monkeypatch.setattr("perceiver_fast.profiler.parts.profile_models", no_work)
    missing = tmp_path / "missing" / "out.json"
    for path, message in ((missing, f"{missing}: no folder {missing.parent} (it is not made: create it first)"),
                          (tmp_path, f"{tmp_path} is a folder; give a file name")):
        with pytest.raises(SystemExit) as exit_:
            cli(["profile", "--model", "hf-vision-fourier", "--input-len", "1024", option, str(path)])
        assert exit_.value.code == 2
        assert f"error: argument {option}: {message}" in capsys.readouterr().err


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
