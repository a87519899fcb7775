"""The benchmark engine's logic (perceiver_fast.bench): cases, refusals, the report, the comparison, the CLI.

Nothing here judges speed: measurements run on tiny cases only to check that rows and files come out.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from perceiver_fast.bench.cases import Case, case_from_shape, full_cases, load_shapes, quick_cases, sweep
from perceiver_fast.bench.compare import compare, format_changes
from perceiver_fast.bench.providers import layer_providers, op_providers, score_matrix_refusal
from perceiver_fast.bench.report import load_json, markdown, sweeps, write_report
from perceiver_fast.bench.run import measure, run_cases
from perceiver_fast.cli import main as cli

TINY = Case(name="tiny", level="op", kind="cross", B=1, H=2, N=8, M=32, dqk=16, dv=8, sweep="tiny")


def fake_rows(case: Case, times: dict[str, float], dtype="float32", pass_name="forward") -> list[dict]:
    rows = []
    for provider, ms in times.items():
        row = {"case": case.to_dict(), "dtype": dtype, "pass": pass_name, "provider": provider}
        rows.append({**row, "ms": ms, "peak_extra_mib": ms / 10} if ms else {**row, "not_run": "no reason"})
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


def test_attention_flops_count_causal_pairs():
    assert TINY.attention_flops() == 2 * 1 * 2 * 8 * 32 * (16 + 8)
    causal = replace(TINY, kind="causal", N=4, M=6)
    assert causal.attention_flops() == 2 * 2 * (3 + 4 + 5 + 6) * 24


def test_providers_say_why_they_cannot_run():
    names = {p.name: p for p in op_providers()}
    assert {"perceiver_fast[cpu]", "perceiver_fast[triton]", "eager", "sdpa", "flex_attention",
            "flash_attn"} <= set(names)
    assert "CUDA" in names["flash_attn"].refusal(TINY, torch.float32, "cpu")
    assert "--full" in names["flex_attention"].full_set_only_on_cpu
    huge = replace(TINY, N=2**20, M=2**24)
    assert "out of memory" in score_matrix_refusal(huge, torch.float32, "cpu", 2)
    assert "out of memory" in names["eager"].refusal(huge, torch.float32, "cpu")
    assert names["sdpa"].refusal(TINY, torch.float32, "cpu") is None
    lucidrains = {p.name: p for p in layer_providers()}["lucidrains"]
    assert "one head dim" in lucidrains.refusal(replace(TINY, level="layer", C=12, latent_dim=16), torch.float32, "cpu")


def test_measure_gives_a_row_per_provider_with_time_memory_or_reason():
    rows = measure(TINY, "float32", "forward+backward", "cpu", repeats=1, only=["sdpa", "perceiver_fast[cpu]",
                                                                                  "flash_attn"])
    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == {"sdpa", "perceiver_fast[cpu]", "flash_attn"}
    for name in ("sdpa", "perceiver_fast[cpu]"):
        assert by_name[name]["ms"] > 0 and by_name[name]["peak_extra_mib"] >= 0
    assert "CUDA" in by_name["flash_attn"]["not_run"]


def test_full_set_only_providers_run_in_the_full_set():
    quick = measure(TINY, "float32", "forward", "cpu", repeats=1, only=["flex_attention"])
    assert "--full" in quick[0]["not_run"]
    full = measure(TINY, "float32", "forward", "cpu", repeats=1, only=["flex_attention"], full=True)
    assert full[0]["ms"] > 0, full


def test_run_cases_runs_each_case_in_a_subprocess_and_reports_progress():
    lines = []
    layer = Case(name="tiny-layer", level="layer", kind="cross", B=1, H=1, N=4, M=16, dqk=8, dv=8, C=6, latent_dim=8)
    rows = run_cases([TINY, layer], ["float32"], ["forward"], "cpu", 1, progress=lines.append)
    assert len(lines) == 2 and lines[0].startswith("[1/2")
    assert {r["case"]["level"] for r in rows} == {"op", "layer"}
    assert {r["provider"] for r in rows if r["case"]["level"] == "layer"} == {p.name for p in layer_providers()}
    assert all(("ms" in r) != ("not_run" in r) for r in rows)


def test_report_tables_plots_and_json(tmp_path):
    rows = []
    for m, scale in ((1000, 1.0), (4000, 4.0)):
        case = replace(TINY, M=m)
        rows += fake_rows(case, {"perceiver_fast[cpu]": 2 * scale, "sdpa": 4 * scale, "eager": 0})
    info = {"cpu": "test CPU", "cpu_threads": 2, "torch": "x", "triton": "y", "python": "3", "device": "cpu"}
    written = write_report(tmp_path, info, rows)
    text = (tmp_path / "report-cpu.md").read_text()
    assert "| vs sdpa |" in text and "| 2.00x |" in text  # sdpa's time over ours
    assert "| eager | no reason |" in text
    assert len(written["plots"]) == 1 and (tmp_path / written["plots"][0].split("/")[-1]).stat().st_size > 1000
    assert "![plot-cpu-op-tiny-float32-forward](plot-cpu-op-tiny-float32-forward.png)" in text
    machine, loaded = load_json(tmp_path / "results-cpu.json")
    assert machine == info and loaded == rows
    assert list(sweeps(rows)) == [("tiny", "op", "float32", "forward")]
    scaled = replace(TINY, scaled="B 8 -> 1")
    assert "tiny: B 8 -> 1" in markdown(info, fake_rows(scaled, {"sdpa": 1.0}), [])


def test_compare_matches_rows_and_reports_changes():
    old = fake_rows(TINY, {"perceiver_fast[cpu]": 4.0, "sdpa": 8.0, "eager": 10.0})
    new = fake_rows(TINY, {"perceiver_fast[cpu]": 2.0, "sdpa": 8.0, "eager": 0}) + fake_rows(replace(TINY, M=64),
                                                                                             {"sdpa": 1.0})
    changes = {c["key"][-1] + str(c["key"][5]): c for c in compare(old, new)}
    assert changes["perceiver_fast[cpu]32"]["speedup"] == 2.0
    assert changes["sdpa32"]["speedup"] == 1.0
    assert changes["eager32"]["status"].startswith("ran before, not now")
    assert changes["sdpa64"]["status"] == "only in the new run"
    text = format_changes(compare(old, new))
    assert "2.00x" in text and "geometric mean of the speed ratios old/new 1.41x" in text


def test_cli_compares_two_files_and_rejects_bad_arguments(tmp_path, capsys):
    info = {"device": "cpu"}
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"machine": info, "results": fake_rows(TINY, {"sdpa": 3.0})}))
    new.write_text(json.dumps({"machine": info, "results": fake_rows(TINY, {"sdpa": 1.0})}))
    assert cli(["bench", "--compare", str(old), "--against", str(new)]) == 0
    assert "3.00x" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    for argv, message in ((["--compare", str(bad), "--against", str(new)], "not a perceiver-fast bench result"),
                          (["--against", str(new)], "--against needs --compare"),
                          (["--dtypes", "float8"], "--dtypes: float8"),
                          (["--passes", "sideways"], "--passes: sideways"),
                          (["--repeats", "0"], "--repeats must be at least 1")):
        with pytest.raises(SystemExit):
            cli(["bench", *argv])
        assert message in capsys.readouterr().err
