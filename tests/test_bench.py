"""The benchmark engine's logic (perceiver_fast.bench): cases and sets, refusals, the report, the comparison, the CLI.

Nothing here judges speed: measurements run on tiny cases only to check that rows and files come out.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch

from perceiver_fast.bench import providers
from perceiver_fast.bench.cases import PASS_FLOP_FACTOR, Case, case_from_shape, load_shapes, model_case, sweep
from perceiver_fast.bench.compare import compare, format_changes
from perceiver_fast.bench.model_providers import model_providers
from perceiver_fast.bench.levels import providers_for
from perceiver_fast.bench.providers import layer_providers, op_providers, why_not
from perceiver_fast.bench.report import load_json, markdown, sweeps, write_report
from perceiver_fast.bench.run import measure, run_cases
from perceiver_fast.bench.sets import SETS, full_cases, quick_cases
from perceiver_fast.cli import main as cli
from perceiver_fast.extension import compiled as _C

TINY = Case(name="tiny", level="op", kind="cross", B=1, H=2, N=8, M=32, dqk=16, dv=8, sweep="tiny")
INFO = {"cpu": "test CPU", "cpu_threads": 2, "torch": "x", "triton": "y", "python": "3", "device": "cpu"}
GiB = 2**30


def fake_rows(case: Case, times: dict[str, float], dtype="float32", pass_name="forward") -> list[dict]:
    rows = []
    for provider, ms in times.items():
        row = {"case": case.to_dict(), "dtype": dtype, "pass": pass_name, "provider": provider}
        rows.append({**row, "ms": ms, "peak_extra_mib": ms / 10, "outputs_mib": 0.5} if ms
                    else {**row, "not_run": "no reason"})
    return rows


def test_cases_follow_the_published_shapes():
    shapes = load_shapes()
    case = case_from_shape("krasserm-clm-ar", "op", batch=1)
    assert (case.B, case.H, case.N, case.M, case.dqk, case.causal) == (1, 8, 512, 4096, 64, True)
    assert case.scaled == "B 24 -> 1"
    latent = case_from_shape("hf-vision-self", "layer")
    assert latent.N == latent.M == 512 and latent.latent_dim == shapes["hf-vision-self"]["D_latent"]
    decoder = case_from_shape("hf-optical-flow-decoder", "op")
    assert (decoder.kind, decoder.N, decoder.M) == ("cross", 182528, 2048)
    with pytest.raises(ValueError, match="decoder shape: no layer-level case"):
        case_from_shape("hf-language-decoder", "layer")
    swept = sweep(case_from_shape("hf-vision-fourier-cross", "op"), [100, 50176])
    assert [c.M for c in swept] == [100, 50176] and swept[0].scaled == "M 50176 -> 100" and swept[1].scaled == ""
    for cases in (quick_cases("cpu"), full_cases("cpu")):
        assert {c.level for c in cases} == {"op", "layer"}
        assert any(c.causal for c in cases) and any(c.kind == "latent" for c in cases)
        assert len({c.M for c in cases if c.sweep == "hf-vision-fourier-cross" and c.level == "op"}) >= 3


def test_full_set_covers_every_published_shape():
    assert {c.name for c in full_cases("cpu")} == set(load_shapes())


def test_sets_are_named_and_quick_and_full_keep_their_cases():
    assert list(SETS) == ["quick", "full", "cpu-backend", "layer", "overhead", "gpu", "sharded", "model", "deployment",
                          "training", "generation"]
    assert SETS["quick"].cases("cpu") == quick_cases("cpu") and SETS["full"].cases("cuda") == full_cases("cuda")
    assert not SETS["quick"].providers and not SETS["full"].providers  # every provider of each level


def test_cpu_backend_set_is_the_old_scripts_cases_and_the_wide_latent_one():
    # The former benchmarks/cpu_backend.py's CASES: name -> (B, H, N, M, Dqk, Dv), the last a latent
    # self-attention; then the latent case of head dim 128 whose backward must be tight.
    old = {"b1-h1-m50k-d64": (1, 1, 512, 50176, 64, 64), "b1-h8-m50k-d64": (1, 8, 512, 50176, 64, 64),
           "b4-h1-m262k-d64": (4, 1, 256, 262144, 64, 64), "b1-h1-m50k-d261": (1, 1, 512, 50176, 261, 261),
           "latent-b8-h8-n512-d64": (8, 8, 512, 512, 64, 64), "latent-b4-h8-n512-d128": (4, 8, 512, 512, 128, 128)}
    cpu_backend = SETS["cpu-backend"]
    cases = cpu_backend.cases("cpu")
    assert {c.name: (c.B, c.H, c.N, c.M, c.dqk, c.dv) for c in cases} == old
    assert {c.level for c in cases} == {"op"} and not any(c.causal for c in cases)
    assert [c.name for c in cases if c.kind == "latent"] == ["latent-b8-h8-n512-d64", "latent-b4-h8-n512-d128"]
    assert set(cpu_backend.providers) == {"perceiver_fast[cpu]", "sdpa", "eager"} <= {p.name for p in op_providers()}
    assert cpu_backend.passes == ("forward", "forward+backward") and cpu_backend.devices == ("cpu",)


def test_layer_set_is_the_old_scripts_shapes_and_refuses_hf_at_a_million_inputs(monkeypatch):
    # The former benchmarks/cross_attention_layer.py's SHAPES: (B, M, C, N, latent dim, heads, qk = v channels).
    old = [(4, 50176, 261, 512, 1024, 1, 261), (1, 1048576, 64, 512, 512, 8, 512)]
    layer = SETS["layer"]
    cases = layer.cases("cpu")
    assert [(c.B, c.M, c.C, c.N, c.latent_dim, c.H, c.H * c.dqk) for c in cases] == old
    assert all(c.level == "layer" and c.kind == "cross" and c.dqk == c.dv for c in cases)
    # Its providers "HF", "SDPA layer" and "HF + pf.patch"; the SDPA layer is the engine's "HF on SDPA".
    by_name = {p.name: p for p in layer_providers()}
    assert set(layer.providers) == {"HF", "HF on SDPA", "HF + pf.patch"} <= set(by_name)
    assert layer.passes == ("forward", "forward+backward")
    # The script's predicted forward peak: LayerNorm(x), K and V (and HF's two score tensors); 0 for pf.patch.
    for case in cases:
        for dtype in (torch.float32, torch.bfloat16):
            size = torch.finfo(dtype).bits // 8
            stored = case.B * case.M * (case.C + 2 * case.H * case.dqk) * size
            scores = 2 * case.B * case.H * case.N * case.M * size
            assert by_name["HF on SDPA"].predicted_bytes(case, dtype, False) == stored
            assert by_name["HF"].predicted_bytes(case, dtype, False) == stored + scores
            assert by_name["HF"].predicted_bytes(case, dtype, True) == 2 * (stored + scores)
            assert by_name["HF + pf.patch"].predicted_bytes is None
    monkeypatch.setattr(providers, "free_bytes", lambda device: 24 * GiB)  # the 24 GiB machine of the results
    million = cases[1]
    for dtype in (torch.float32, torch.bfloat16):
        assert "out of memory predicted" in why_not(by_name["HF"], million, dtype, "cpu", False, False)
        assert why_not(by_name["HF on SDPA"], million, dtype, "cpu", True, False) is None
        assert why_not(by_name["HF + pf.patch"], million, dtype, "cpu", True, False) is None
    assert why_not(by_name["HF"], cases[0], torch.float32, "cpu", True, False) is None


def test_overhead_set_times_loops_of_a_tiny_call_below_and_through_the_python_layer():
    overhead = SETS["overhead"]
    (case,) = overhead.cases("cpu")
    assert case.calls > 1 and case.M * case.N <= 64
    rows = measure(case, "float32", "forward+backward", "cpu", repeats=1, only=list(overhead.providers))
    assert [r["provider"] for r in rows] == ["perceiver_fast[cpu]", "registered op[cpu]", "C++ kernel[cpu]"]
    assert all(0 < r["ms"] < 1 for r in rows), rows  # per call, not per loop
    # Outside the overhead set (one call per timing) the providers below the Python layer refuse.
    one_call = Case(name="one", level="op", kind="cross", B=1, H=1, N=4, M=8, dqk=16, dv=16)
    refused = measure(one_call, "float32", "forward", "cpu", repeats=1, only=["C++ kernel[cpu]"])
    assert "overhead set only" in refused[0]["not_run"]


def test_model_set_is_whole_models_against_the_deployment_runtimes():
    # HF vision-fourier at 224 x 224, batch 1, and HF language's MLM at batch 2 x 2048 (issue 27), inference forward,
    # HF, pf.patch (whole and attention only), ONNX Runtime and OpenVINO.
    model = SETS["model"]
    cases = model.cases("cpu")
    assert [(c.name, c.level, c.B, c.M, c.padded_inputs) for c in cases] == [
        ("hf-vision-fourier", "model", 1, 50176, 0), ("hf-language", "model", 2, 2048, 0)]
    assert (cases[0].N, cases[0].latent_dim, cases[0].H, cases[0].dqk, cases[0].C) == (512, 1024, 1, 261, 261)
    assert model.providers == ("HF", "HF + pf.patch", "HF + pf.patch (attention only)", "ONNX Runtime", "OpenVINO")
    assert set(model.providers) < {p.name for p in providers_for("model")}
    assert model.passes == ("forward",)


def test_deployment_set_is_every_route_on_one_model():
    deployment = SETS["deployment"]
    assert [(c.name, c.B, c.M) for c in deployment.cases("cpu")] == [("hf-vision-fourier", 1, 50176)]
    assert deployment.dtypes == ("float32",) and deployment.passes == ("forward",)
    assert set(deployment.providers) == {"HF", "HF + pf.patch", "AOTInductor (pf.patch)", "ONNX Runtime", "OpenVINO",
                                         "ONNX Runtime (pf.patch)", "OpenVINO (pf.patch)"}
    assert set(deployment.providers) <= {p.name for p in providers_for("model")}


def test_training_set_runs_hf_layer_and_model_steps_with_attention_dropout():
    training = SETS["training"]
    plain, layer, model, language = training.cases("cpu")
    assert (layer.name, layer.level, layer.B, layer.M, layer.dropout) == ("hf-vision-fourier-cross", "layer", 4, 50176,
                                                                          0.1)
    assert plain == replace(layer, dropout=0.0)
    assert (model.name, model.level, model.B, model.M, model.dropout) == ("hf-vision-fourier", "model", 1, 50176, 0.1)
    assert model.label() == "hf-vision-fourier (B=1 M=50176, training with attention dropout 0.1)"
    assert (language.name, language.B, language.M, language.dropout) == ("hf-language", 2, 2048, 0.1)
    assert training.providers == ("HF", "HF + pf.patch", "HF + pf.patch (attention only)")
    assert training.passes == ("forward+backward",)


def test_generation_set_is_issue_14s_prompts():
    generation = SETS["generation"]
    cases = generation.cases("cpu")
    assert [(c.level, c.B, c.M, c.N, c.H, c.C, c.new_tokens) for c in cases] == [
        ("generation", 1, m, 512, 8, 512, 16) for m in (4096, 16384, 65536)]
    assert cases[1].label() == ("krasserm-ar-prompt-16k (B=1, prompt of 16384 tokens, 512 latents, H=8 C=512, "
                                "16 new tokens)")
    assert generation.providers == ("pf.generation", "pf.generation + pf.patch", "krasserm cached forward")
    assert generation.passes == ("decode",)
    assert cases[0].attention_flops("decode") is None


@pytest.mark.skipif(providers.missing_module("perceiver"), reason="needs krasserm perceiver-io")
def test_generation_providers_time_tokens_and_the_report_reads_them_against_the_memory_floor():
    from perceiver_fast.bench.generation_providers import decode_read_bytes

    case = replace(SETS["generation"].cases("cpu")[0], M=40, N=8, H=2, C=16, dqk=8, dv=8, new_tokens=3)
    rows = measure(case, "float32", "decode", "cpu", repeats=1)
    assert [r["provider"] for r in rows] == ["pf.generation", "pf.generation + pf.patch", "krasserm cached forward"]
    assert all(r["ms"] > 0 and r["peak_extra_mib"] >= 0 for r in rows), rows
    text = markdown(SETS["generation"], {**INFO, "read_gbs": 10.0}, rows, [])
    assert "## Generation level: Perceiver AR decoding" in text
    line = next(line for line in text.splitlines() if "| pf.generation |" in line)
    ratio = rows[2]["ms"] / rows[0]["ms"]  # krasserm's own over ours
    assert f"| {ratio:.2f}x |" in line
    achieved = decode_read_bytes(case, torch.float32) / (rows[0]["ms"] / 1e3) / 1e9
    assert f"| {achieved:.1f} | {100 * achieved / 10:.0f}% |" in line


def test_layer_providers_train_with_the_cases_dropout():
    from model_checks import FallbackLog

    case = replace(SETS["training"].cases("cpu")[1], B=2, N=8, M=40, C=12, latent_dim=16, dqk=8, dv=8)
    by_name = {p.name: p for p in layer_providers()}
    layer = providers.hf_attention(case, torch.float32, "cpu")
    assert layer.training and layer.self.dropout.p == 0.1
    with FallbackLog() as fallbacks:
        torch.manual_seed(0)
        first = by_name["HF + pf.patch"].prepare(case, torch.float32, "cpu", True)()[0]
        torch.manual_seed(0)
        again = by_name["HF + pf.patch"].prepare(case, torch.float32, "cpu", True)()[0]
    assert not [r for r in fallbacks.reasons if "keeps the original" in r] and torch.equal(first, again)


@pytest.fixture
def tiny_model(monkeypatch):
    """A tiny HF vision-fourier model (4 x 4 pixels, 8 latents of 32) registered as "tiny-vision"."""
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier

    from perceiver_fast.profiler.models import NAMED_MODELS

    def build(length, dtype):
        torch.manual_seed(0)
        config = PerceiverConfig(num_latents=8, d_latents=32, num_blocks=1, num_self_attends_per_block=1,
                                 num_self_attention_heads=2, num_cross_attention_heads=1,
                                 self_attention_widening_factor=1, cross_attention_widening_factor=1,
                                 image_size=math.isqrt(length), num_labels=3)
        return PerceiverForImageClassificationFourier(config).eval().to(dtype)

    monkeypatch.setitem(NAMED_MODELS, "tiny-vision", replace(NAMED_MODELS["hf-vision-fourier"], build=build))
    return model_case("tiny-vision", 16, batch=2)


def test_model_providers_refuse_what_they_cannot_run(tiny_model, monkeypatch):
    by_name = {p.name: p for p in model_providers()}
    for provider in by_name.values():
        assert provider.level == "model"
        assert "square" in provider.refusal(replace(tiny_model, M=15), torch.float32, "cpu")
        assert "no named model 'nope'" in provider.refusal(replace(tiny_model, name="nope"), torch.float32, "cpu")
        assert why_not(provider, tiny_model, torch.float32, "cpu", False, False) is None
        forward = provider.predicted_bytes(tiny_model, torch.float32, False)
        assert provider.predicted_bytes(tiny_model, torch.float32, True) == 2 * forward
    # The profiler's peak model: HF stores the N x M scores, pf.patch does not.
    huge = model_case("hf-vision-fourier", 50176, batch=64)
    assert by_name["HF"].predicted_bytes(huge, torch.float32, False) > 3 * by_name["HF + pf.patch"].predicted_bytes(
        huge, torch.float32, False)
    monkeypatch.setattr(providers, "free_bytes", lambda device: 4 * GiB)
    assert "out of memory predicted" in why_not(by_name["HF"], huge, torch.float32, "cpu", False, False)


def test_model_providers_train_with_the_cases_dropout(tiny_model):
    from model_checks import FallbackLog

    by_name = {p.name: p for p in model_providers()}
    with FallbackLog() as fallbacks:
        out, _ = by_name["HF + pf.patch"].prepare(replace(tiny_model, dropout=0.5), torch.float32, "cpu", True)()
        plain, _ = by_name["HF + pf.patch"].prepare(tiny_model, torch.float32, "cpu", True)()
    assert not [r for r in fallbacks.reasons if "keeps the original" in r]
    assert not torch.equal(out, plain)  # the dropout drops, inside the kernels


def test_model_providers_run_the_model_with_its_padding_mask(tiny_model, monkeypatch):
    from perceiver_fast.backends import cpu_linear

    monkeypatch.setattr(cpu_linear, "SMALL_PROBLEM_MACS", 0)  # the tiny model's layers on the op, as a real one's
    by_name = {p.name: p for p in model_providers()}
    padded = replace(tiny_model, padded_inputs=8)
    logits = {(name, case.padded_inputs): by_name[name].prepare(case, torch.float32, "cpu", False)()
              for name in by_name for case in (tiny_model, padded)}
    assert logits[("HF", 0)].shape == (2, 3)
    assert not torch.equal(logits[("HF", 0)], logits[("HF", 8)])  # the mask reaches the model
    for padding in (0, 8):  # the same weights patched and unpatched
        torch.testing.assert_close(logits[("HF + pf.patch", padding)], logits[("HF", padding)])
    out, grads = by_name["HF + pf.patch"].prepare(padded, torch.float32, "cpu", True)()
    assert out.shape == (2, 3) and grads[0].shape == (2, 3, 4, 4)  # the pixels' gradient first
    rows = measure(tiny_model, "float32", "forward", "cpu", repeats=1,
                   only=["HF", "HF + pf.patch", "HF + pf.patch (attention only)"])
    assert {r["provider"] for r in rows} == {"HF", "HF + pf.patch", "HF + pf.patch (attention only)"}
    for row in rows:
        assert row["ms"] > 0 and row["outputs_mib"] == 2 * 3 * 4 / 2**20  # the logits
        assert row["max_logit_error"] <= 1e-5  # against the float32 model run by HF
    patched = next(r for r in rows if r["provider"] == "HF + pf.patch")
    assert "perceiver_fast::linear" in patched["op_ms"] and "other" in patched["op_ms"]


def test_model_training_step_takes_an_adamw_step(tiny_model):
    provider = {p.name: p for p in model_providers()}["HF + pf.patch"]
    call = provider.prepare(tiny_model, torch.float32, "cpu", True)
    first, _ = call()
    second, _ = call()
    assert not torch.equal(first, second)  # the weights moved between the calls


def test_model_level_runs_each_provider_in_its_own_process(tiny_model):
    from perceiver_fast.bench.run import MODEL_ROUNDS, _processes, merge_rounds

    names = [p.name for p in providers_for("model")]
    assert {"HF", "HF + pf.patch", "ONNX Runtime", "OpenVINO"} <= set(names)
    assert MODEL_ROUNDS == 2 and _processes(tiny_model, None) == [[name] for name in names] * 2
    assert _processes(tiny_model, ["HF", "OpenVINO"]) == [["HF"], ["OpenVINO"]] * 2
    assert _processes(TINY, ["sdpa"]) == [["sdpa"]]  # op level: one process for the case
    # the rounds' rows merged: the median of every time, the largest peak, the first round's extras
    row = {"case": tiny_model.to_dict(), "dtype": "float32", "pass": "forward"}
    rounds = [{**row, "provider": "HF", "ms": 2.0, "times_ms": [1.0, 2.0, 9.0], "peak_extra_mib": 1.0, "op_ms": {}},
              {**row, "provider": "OpenVINO", "not_run": "no openvino"},
              {**row, "provider": "HF", "ms": 5.0, "times_ms": [5.0, 6.0, 7.0], "peak_extra_mib": 3.0},
              {**row, "provider": "OpenVINO", "not_run": "no openvino"}]
    merged = merge_rounds(rounds)
    assert [r["provider"] for r in merged] == ["HF", "OpenVINO"]
    assert merged[0]["ms"] == 5.5 and merged[0]["peak_extra_mib"] == 3.0 and "op_ms" in merged[0]


def test_runtime_providers_run_the_exported_model(tiny_model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    runtimes = ["ONNX Runtime", "OpenVINO"]
    rows = {r["provider"]: r for r in measure(tiny_model, "float32", "forward", "cpu", repeats=1, only=runtimes)}
    for name in runtimes:
        assert rows[name]["ms"] > 0 and rows[name]["max_logit_error"] <= 1e-4, rows[name]
    assert rows["OpenVINO"]["precision"] == "f32"
    padded = replace(tiny_model, padded_inputs=8)  # the mask is an input of the exported model
    rows = {r["provider"]: r for r in measure(padded, "float32", "forward", "cpu", repeats=1, only=runtimes)}
    assert all(rows[name]["max_logit_error"] <= 1e-4 for name in runtimes)
    rows = {r["provider"]: r for r in measure(tiny_model, "bfloat16", "forward", "cpu", repeats=1, only=runtimes)}
    assert "no bfloat16 GEMMs" in rows["ONNX Runtime"]["not_run"]
    assert rows["OpenVINO"]["ms"] > 0 and rows["OpenVINO"]["precision"] in ("bf16", "f32")
    training = measure(tiny_model, "float32", "forward+backward", "cpu", repeats=1, only=runtimes)
    assert all("inference runtime" in r["not_run"] for r in training)


def test_deployment_routes_of_the_patched_model_run(tiny_model):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    routes = ["ONNX Runtime (pf.patch)", "OpenVINO (pf.patch)", "AOTInductor (pf.patch)"]
    padded = replace(tiny_model, padded_inputs=8)
    rows = {r["provider"]: r for r in measure(padded, "float32", "forward", "cpu", repeats=1, only=routes)}
    for name in routes:
        assert rows[name]["ms"] > 0 and rows[name]["max_logit_error"] <= 1e-4, rows[name]


def test_flops_are_the_attention_matmuls_and_the_backward_counts_two_and_a_half_forwards():
    forward = 2 * 1 * 2 * 8 * 32 * (16 + 8)
    assert TINY.attention_flops("forward") == forward
    assert TINY.attention_flops("forward+backward") == 3.5 * forward == PASS_FLOP_FACTOR["forward+backward"] * forward
    causal = replace(TINY, kind="causal", N=4, M=6)
    assert causal.attention_flops("forward") == 2 * 2 * (3 + 4 + 5 + 6) * 24
    assert replace(TINY, level="layer").attention_flops("forward") == forward  # layers: the attention only
    assert model_case("hf-vision-fourier", 50176).attention_flops("forward") is None
    with pytest.raises(KeyError):
        TINY.attention_flops("sideways")


def test_providers_say_why_they_cannot_run(monkeypatch):
    names = {p.name: p for p in op_providers()}
    assert {"perceiver_fast[cpu]", "perceiver_fast[triton]", "eager", "sdpa", "flex_attention",
            "flash_attn"} <= set(names)
    assert "CUDA" in names["flash_attn"].refusal(TINY, torch.float32, "cpu")
    assert "--full" in names["flex_attention"].full_set_only_on_cpu
    assert "--full" in why_not(names["flex_attention"], TINY, torch.float32, "cpu", False, full=False)
    # Eager attention stores scores and probabilities; its backward twice that.
    scores = 1 * 2 * 8 * 32 * 4
    assert names["eager"].predicted_bytes(TINY, torch.float32, False) == 2 * scores
    assert names["eager"].predicted_bytes(TINY, torch.float32, True) == 4 * scores
    monkeypatch.setattr(providers, "free_bytes", lambda device: 10 * GiB)
    huge = replace(TINY, N=2**16, M=2**16)  # 32 GiB of scores in float32
    assert "out of memory predicted: needs about 64.0 GiB, 10.0 GiB free" in why_not(
        names["eager"], huge, torch.float32, "cpu", False, False)
    assert why_not(names["sdpa"], huge, torch.float32, "cpu", True, False) is None
    lucidrains = {p.name: p for p in layer_providers()}["lucidrains"]
    assert "one head dim" in lucidrains.refusal(replace(TINY, level="layer", C=12, latent_dim=16), torch.float32, "cpu")


def test_measure_gives_a_row_per_provider_with_time_memory_or_reason():
    rows = measure(TINY, "float32", "forward+backward", "cpu", repeats=1, only=["sdpa", "perceiver_fast[cpu]",
                                                                                  "flash_attn"])
    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == {"sdpa", "perceiver_fast[cpu]", "flash_attn"}
    for name in ("sdpa", "perceiver_fast[cpu]"):
        assert by_name[name]["ms"] > 0 and by_name[name]["peak_extra_mib"] >= 0
        # out (1x2x8x8) and the gradients of q (1x2x8x16), k (1x2x32x16) and v (1x2x32x8), float32
        assert by_name[name]["outputs_mib"] == (128 + 256 + 1024 + 512) * 4 / 2**20
    assert "CUDA" in by_name["flash_attn"]["not_run"]
    # SDPA's rows say which of its kernels ran; the report shows it beside the provider.
    assert by_name["sdpa"]["kernel"] == providers.sdpa_kernel(TINY, torch.float32, "cpu", True)
    assert by_name["perceiver_fast[cpu]"]["kernel"] == "float32 products"  # the cpu kernels name their products
    assert f"| sdpa ({by_name['sdpa']['kernel']}) |" in markdown(SETS["quick"], INFO, rows, [])


def test_cpu_rows_carry_their_products_and_a_breakdown_by_phase():
    rows = measure(replace(TINY, M=600, N=40), "float32", "forward+backward", "cpu", repeats=1,
                   only=["perceiver_fast[cpu]", "sdpa"])
    ours, sdpa_row = rows
    assert ours["kernel"] == "float32 products" and "phase_seconds" not in sdpa_row
    assert ours["threads"] == torch.get_num_threads() and ours["phase_wall_s"] > 0
    assert ours["phase_seconds"]["gemm"] > 0 and ours["phase_seconds"]["softmax"] > 0
    assert sum(ours["phase_seconds"].values()) <= ours["phase_wall_s"] * ours["threads"] * 1.05
    text = markdown(SETS["cpu-backend"], INFO, rows, [])
    assert "## Where the cpu kernels' time goes" in text
    line = next(line for line in text.splitlines() if line.startswith("| tiny") and "float32 products" in line
                and "%" in line)
    assert line.count("%") == 9  # eight phases and the rest


def test_sdpa_kernel_is_the_one_sdpa_runs():
    """Checked against the kernels SDPA accepts when it is restricted to one (CPU: flash or math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    square = replace(TINY, dv=TINY.dqk)  # the CPU flash kernel takes one head dim for q, k and v
    causal_wide = replace(square, kind="causal")  # bottom-right causal, N != M: torch.nn.attention.bias
    assert providers.sdpa_kernel(square, torch.float32, "cpu", False) == "flash"
    assert providers.sdpa_kernel(TINY, torch.float32, "cpu", False) == "math"
    # On the CPU bias.py materializes the bottom-right mask, and SDPA runs its flash kernel with it.
    assert providers.sdpa_kernel(causal_wide, torch.float32, "cpu", False) == "flash"
    assert providers.sdpa_kernel(replace(TINY, kind="causal"), torch.float32, "cpu", False) == "math"
    for case in (square, causal_wide):
        q, k, v = providers.op_inputs(case, torch.float32, "cpu", False)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            providers.sdpa(q, k, v, causal=case.causal)  # raises if flash could not run it
    q, k, v = providers.op_inputs(TINY, torch.float32, "cpu", False)
    with pytest.raises(RuntimeError), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        providers.sdpa(q, k, v, causal=False)  # Dqk != Dv: not flash, so math ran


def test_full_set_only_providers_run_in_the_full_set():
    quick = measure(TINY, "float32", "forward", "cpu", repeats=1, only=["flex_attention"])
    assert "--full" in quick[0]["not_run"]
    full = measure(TINY, "float32", "forward", "cpu", repeats=1, only=["flex_attention"], full=True)
    assert full[0]["ms"] > 0, full


def test_run_cases_runs_each_case_in_a_subprocess_and_reports_progress():
    lines = []
    layer = Case(name="tiny-layer", level="layer", kind="cross", B=1, H=1, N=4, M=16, dqk=8, dv=8, C=6, latent_dim=8)
    rows = run_cases([TINY, layer], ["float32"], ["forward"], "cpu", 1, progress=lines.append,
                     only=["sdpa", "HF", "HF + pf.patch"])
    assert len(lines) == 2 and lines[0].startswith("[1/2")
    assert {(r["case"]["level"], r["provider"]) for r in rows} == {("op", "sdpa"), ("layer", "HF"),
                                                                  ("layer", "HF + pf.patch")}
    assert all("ms" in r for r in rows), rows


def test_run_cases_keeps_to_its_budget():
    from perceiver_fast.bench.run import run_job_in_subprocess

    spent = run_cases([TINY], ["float32"], ["forward", "forward+backward"], "cpu", 1, progress=lambda line: None,
                      only=["sdpa"], budget_s=1e-9)
    assert [(r["pass"], r["not_run"]) for r in spent] == [
        (p, "not started: the run's --budget-s 1e-09 was spent") for p in ("forward", "forward+backward")]
    # A case process still running when the budget runs out is stopped (importing torch alone outlasts 0.2 s).
    job = {"case": asdict(TINY), "dtype_name": "float32", "pass_name": "forward", "device": "cpu", "repeats": 1,
           "only": ["sdpa"], "full": False}
    start = time.monotonic()
    stopped = run_job_in_subprocess(job, deadline=start + 0.2)
    assert time.monotonic() - start < 5
    assert [r["not_run"] for r in stopped] == ["the run's --budget-s ran out while it measured"]


def test_a_stopped_case_process_keeps_the_rows_it_made():
    from perceiver_fast.bench.run import ROW_MARK, rows_of

    job = {"case": asdict(TINY), "dtype_name": "float32", "pass_name": "forward", "only": ["sdpa", "eager"]}
    made = {"case": asdict(TINY), "dtype": "float32", "pass": "forward", "provider": "sdpa", "ms": 1.5}
    out = f"some library's own print\n{ROW_MARK}{json.dumps(made)}\n"
    assert rows_of(job, (out, "", 0), False) == [made]
    stopped = rows_of(job, (out, "", -9), True)
    assert stopped[0] == made and stopped[1]["provider"] == "eager"
    assert stopped[1]["not_run"] == "the run's --budget-s ran out while it measured"
    crashed = rows_of({**job, "only": None}, ("", "Traceback ...\nRuntimeError: CUDA error", 1), False)
    assert {r["not_run"] for r in crashed} == {"the measuring process failed: RuntimeError: CUDA error"}
    assert len(crashed) == len(providers_for("op"))


def test_a_model_round_cut_by_the_budget_keeps_the_other_rounds_numbers():
    from perceiver_fast.bench.run import BUDGET_CUT, merge_rounds

    case = asdict(TINY)
    measured = {"case": case, "dtype": "float32", "pass": "forward", "provider": "HF", "ms": 2.0, "times_ms": [2.0],
                "peak_extra_mib": 1.0}
    cut = {"case": case, "dtype": "float32", "pass": "forward", "provider": "HF", "not_run": BUDGET_CUT}
    failed = {**cut, "not_run": "the measuring process failed: RuntimeError: x"}
    assert merge_rounds([dict(measured), cut]) == [measured]
    assert merge_rounds([cut, dict(measured)]) == [measured]
    assert merge_rounds([dict(measured), failed]) == [failed], "a failure is reported over a measurement"
    assert merge_rounds([cut, dict(cut)]) == [cut]


def test_bench_budget_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "perceiver_fast.cli", "bench", "--set", "overhead", "--budget-s", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget-s must be a number of seconds above 0, got 0" in proc.stderr


def test_sharded_cases_run_on_their_ranks_and_report_collective_bytes():
    from perceiver_fast.bench.report import sharded_section

    cases = [replace(c, M=300, N=16, H=2, dqk=8, dv=8, C=12, latent_dim=32) for c in SETS["sharded"].cases("cpu")]
    assert [(c.ranks, c.threads) for c in cases] == [(1, 2), (1, 1), (2, 1)] and cases[0].level == "sharded"
    rows = run_cases(cases, ["float32"], ["forward", "forward+backward"], "cpu", 1, progress=lambda line: None)
    assert all("ms" in r for r in rows), rows
    single, sharded = rows[0], rows[4]
    assert "collective_bytes" not in single and len(sharded["peak_extra_mib_per_rank"]) == 2
    # The layer runs the shortcut method (fewer FLOPs here), which attends over x's C channels per
    # head: one all-reduce of B H N lse maxima, one of B H N (C + 1) sums, and the ranks' agreement
    # checks (docs/distributed.md: for the call and for the backend, an all-gather of a 6-int64
    # header, then of 27 and 6 int64 values); the backward adds the folded queries' gradient (B H N C).
    forward = 4 * 2 * 16 + 4 * 2 * 16 * (12 + 1) + 8 * (6 + 27 + 6 + 6)
    assert sharded["collective_bytes"] == forward
    assert rows[5]["collective_bytes"] == forward + 4 * 2 * 16 * 12
    table = "\n".join(sharded_section(rows))
    assert "2 processes x 1 thread" in table and "| 2,152 |" in table


def test_report_tables_plots_and_json(tmp_path):
    rows = []
    for m, scale in ((1000, 1.0), (4000, 4.0)):
        case = replace(TINY, M=m)
        rows += fake_rows(case, {"perceiver_fast[cpu]": 2 * scale, "sdpa": 4 * scale, "eager": 0})
    written = write_report(tmp_path, SETS["quick"], INFO, rows)
    text = (tmp_path / "report-cpu.md").read_text()
    assert text.startswith("# perceiver-fast benchmark report: the quick set")
    assert "| vs sdpa |" in text and "| 2.00x |" in text  # sdpa's time over ours
    assert "| eager | no reason |" in text
    assert len(written["plots"]) == 1 and (tmp_path / written["plots"][0].split("/")[-1]).stat().st_size > 1000
    assert "![plot-cpu-op-tiny-float32-forward](plot-cpu-op-tiny-float32-forward.png)" in text
    machine, loaded = load_json(tmp_path / "results-cpu.json")
    assert machine == INFO and loaded == rows
    assert json.loads((tmp_path / "results-cpu.json").read_text())["set"] == "quick"
    assert list(sweeps(rows)) == [("tiny", "op", "float32", "forward")]
    scaled = replace(TINY, scaled="B 8 -> 1")
    assert "tiny: B 8 -> 1" in markdown(SETS["quick"], INFO, fake_rows(scaled, {"sdpa": 1.0}), [])


def test_report_rates_by_the_one_flop_convention_and_not_the_whole_model():
    fused = fake_rows(TINY, {"sdpa": 1.0}, pass_name="forward+backward")
    model = fake_rows(replace(model_case("hf-vision-fourier", 50176), padded_inputs=25088), {"HF": 2.0})
    text = markdown(SETS["quick"], INFO, fused + model, [])
    assert "forward+backward 3.5x that (FlashAttention's convention" in text
    assert "model level: no GFLOP/s" in text
    rate = 3.5 * 2 * 1 * 2 * 8 * 32 * (16 + 8) / 1e9 / 1e-3
    assert f"| sdpa | 1.00 | {rate:.1f} | 0.1 | 0.5 |" in text
    model_table = text[text.index("## Model level"):]
    assert "| case | dtype | pass | provider | ms | peak extra MiB | outputs MiB | vs HF |" in model_table
    assert "| hf-vision-fourier (B=1 M=50176, last 25088 inputs masked as padding) | float32 | forward | HF | 2.00 " \
           "| 0.2 | 0.5 | 1.00x |" in model_table
    errors = [{**row, "max_logit_error": 0.125} for row in model]  # a model row's logit error gets its column
    assert "| outputs MiB | max logit error | vs HF |" in markdown(SETS["model"], INFO, errors, [])
    assert "| 0.2 | 0.5 | 0.125 | 1.00x |" in markdown(SETS["model"], INFO, errors, [])


def test_each_set_writes_its_own_files(tmp_path):
    rows = fake_rows(TINY, {"sdpa": 1.0}) + fake_rows(replace(TINY, M=64), {"sdpa": 2.0})
    names = {}
    for name in ("quick", "full", "layer", "model", "cpu-backend"):
        written = write_report(tmp_path, SETS[name], INFO, rows)
        names[name] = (written["report"].split("/")[-1], written["results"].split("/")[-1],
                       [p.split("/")[-1] for p in written["plots"]])
    assert names["quick"] == ("report-cpu.md", "results-cpu.json", ["plot-cpu-op-tiny-float32-forward.png"])
    assert names["full"] == ("report-full-cpu.md", "results-full-cpu.json",
                             ["plot-full-cpu-op-tiny-float32-forward.png"])
    assert names["cpu-backend"][:2] == ("report-cpu-backend-cpu.md", "results-cpu-backend-cpu.json")
    assert len({file for written in names.values() for file in written[:2]}) == 10  # none overwrites another
    assert json.loads((tmp_path / "results-layer-cpu.json").read_text())["set"] == "layer"


def test_compare_matches_rows_and_reports_changes():
    old = fake_rows(TINY, {"perceiver_fast[cpu]": 4.0, "sdpa": 8.0, "eager": 10.0})
    new = fake_rows(TINY, {"perceiver_fast[cpu]": 2.0, "sdpa": 8.0, "eager": 0}) + fake_rows(replace(TINY, M=64),
                                                                                             {"sdpa": 1.0})
    changes = {(c["key"][-1], c["key"][1]): c for c in compare(old, new)}
    label, longer = TINY.label(), replace(TINY, M=64).label()
    assert changes[("perceiver_fast[cpu]", label)]["speedup"] == 2.0
    assert changes[("sdpa", label)]["speedup"] == 1.0
    assert changes[("eager", label)]["status"].startswith("ran before, not now")
    assert changes[("sdpa", longer)]["status"] == "only in the new run"
    masked = fake_rows(replace(TINY, padded_inputs=4), {"sdpa": 8.0})
    assert [c["status"] for c in compare(masked, old[1:2])] == ["only in the old run", "only in the new run"]
    text = format_changes(compare(old, new))
    assert "2.00x" in text and "geometric mean of the speed ratios old/new 1.41x" in text


def test_cli_compares_two_files_and_rejects_bad_arguments(tmp_path, capsys):
    info = {"device": "cpu"}
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"machine": info, "results": fake_rows(TINY, {"sdpa": 3.0})}))
    new.write_text(json.dumps({"machine": info, "results": fake_rows(TINY, {"sdpa": 1.0})}))
    assert cli(["bench", "--compare", str(old), "--against", str(new)]) == 0
    assert "3.00x" in capsys.readouterr().out
    bad, script = tmp_path / "bad.json", tmp_path / "script.json"
    bad.write_text("[]")
    script.write_text(json.dumps({"machine": info, "results": [{"case": "b1-h1-m50k-d64", "ms": 1.0}]}))
    for argv, message in ((["--compare", str(bad), "--against", str(new)], "not a perceiver-fast bench result"),
                          (["--compare", str(script), "--against", str(new)], "rows without a case record"),
                          (["--against", str(new)], "--against needs --compare"),
                          (["--set", "nope"], "argument --set: invalid choice: 'nope'"),
                          (["--full", "--set", "layer"], "--full is --set full: it cannot go with --set layer"),
                          (["--set", "cpu-backend", "--device", "cuda"], "--device cuda: the cpu-backend set runs on "
                                                                         "cpu only"),
                          (["--set", "model", "--levels", "op"], "--levels op: the model set has no case"),
                          (["--dtypes", "float8"], "--dtypes: float8"),
                          (["--passes", "sideways"], "--passes: sideways"),
                          (["--repeats", "0"], "--repeats must be at least 1"),
                          (["--isa", "avx3"], "--isa avx3: expected one of portable"),
                          (["--set", "cpu-backend", "--providers", "eager,nope"], "--providers: nope"),
                          (["--providers", "sdpa"], "--providers: the quick set runs every provider")):
        with pytest.raises(SystemExit):
            cli(["bench", *argv])
        assert message in capsys.readouterr().err


class RunStarted(Exception):
    """Stands for the benchmark run, which these tests stop at its start."""


def test_cli_out_folder_is_made_or_refused_before_the_run(tmp_path, monkeypatch, capsys):
    made = tmp_path / "new" / "results"

    def run_cases(*args, **kwargs):
        assert made.is_dir(), "the --out folder is made before the run"
        raise RunStarted

    monkeypatch.setattr("perceiver_fast.bench.run.run_cases", run_cases)
    with pytest.raises(RunStarted):
        cli(["bench", "--device", "cpu", "--out", str(made)])
    monkeypatch.setattr("perceiver_fast.bench.run.run_cases", lambda *a, **kw: pytest.fail("ran before refusing --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, message in ((a_file, "is a file, not a folder"),
                         (a_file / "results", "cannot make the folder: Not a directory")):
        with pytest.raises(SystemExit) as exit_:
            cli(["bench", "--device", "cpu", "--out", str(out)])
        assert exit_.value.code == 2
        assert f"error: --out {out}: {message}" in capsys.readouterr().err


def test_cli_full_is_the_full_set_and_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(SETS, "full", replace(SETS["full"], cases=lambda device: [TINY], providers=("sdpa",)))
    assert cli(["bench", "--full", "--device", "cpu", "--dtypes", "float32", "--passes", "forward", "--repeats", "1",
                "--no-plots", "--out", str(tmp_path)]) == 0
    assert "1 cases x 1 dtypes x 1 passes on cpu, full set" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-full-cpu.md", "results-full-cpu.json"]
    machine, rows = load_json(tmp_path / "results-full-cpu.json")
    assert [r["provider"] for r in rows] == ["sdpa"] and rows[0]["ms"] > 0
    assert set(machine["matmul_gflops"]) == {"float32"} and machine["transformers"]


def test_cli_isa_caps_every_case_process_and_names_the_caps(tmp_path, monkeypatch, capsys):
    """--isa emulates a CPU with less: this library's level and torch's, oneDNN's and MKL's caps, set in
    the environment the case processes inherit, and named in the report's header."""
    level = "avx2" if "avx2" in _C.cpu_features()["isa_levels"] else "portable"
    before = os.environ.get("PERCEIVER_FAST_CPU_ISA") or "none"
    for name in ("PERCEIVER_FAST_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the caps stay in this test
    monkeypatch.setitem(SETS, "full", replace(SETS["full"], cases=lambda device: [TINY],
                                              providers=("perceiver_fast[cpu]",)))
    try:
        assert cli(["bench", "--full", "--isa", level, "--device", "cpu", "--dtypes", "float32", "--passes",
                    "forward", "--repeats", "1", "--no-plots", "--out", str(tmp_path)]) == 0
    finally:
        _C.set_cpu_isa(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"report-full-cpu-{level}.md", f"results-full-cpu-{level}.json"]
    machine, rows = load_json(tmp_path / f"results-full-cpu-{level}.json")
    assert machine["isa_caps"]["PERCEIVER_FAST_CPU_ISA"] == level and machine["cpu_kernel_paths"]["isa"] == level
    assert set(machine["isa_caps"]) == {"PERCEIVER_FAST_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                        "MKL_ENABLE_INSTRUCTIONS"}
    assert rows[0]["ms"] > 0
    report = (tmp_path / f"report-full-cpu-{level}.md").read_text()
    assert f"Instruction sets capped (`--isa {level}`" in report and "ONEDNN_MAX_CPU_ISA=" in report
