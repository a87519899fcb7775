"""`make gpu` (tools/gpu_run.py) and the extension prebuilt for the GPU machine (tools/gpu_prebuild.py),
without a GPU: the dry run that lists every step, the budget that steps share, a step stopped whole when
its time runs out, the records a stopped run keeps, when the prebuilt extension is taken, and the
argument errors. `make gpu-dry-run` (in `make test`) runs the prebuild and a dry run in the GPU machine's
Python and torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = [sys.executable, str(ROOT / "tools" / "gpu_run.py")]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_prebuild  # noqa: E402
import gpu_run  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run happens only where there is no CUDA")


@no_cuda
def test_make_gpu_without_cuda_is_a_dry_run_of_every_step_in_order(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["build", "smoke", "tests", "bench", "flex", "memcheck", "model"], "racecheck only when asked"
    prebuilt = gpu_prebuild.verdict(gpu_prebuild.read_manifest(), torch.__version__, None) is None
    build = "installs the prebuilt .gpu-prebuilt/_C" if prebuilt else "setup.py build_ext --inplace"
    for step, command in (("build", build), ("smoke", "gpu_smoke.py"), ("tests", "-m gpu"),
                          ("bench", "--levels op --providers perceiver_fast[triton],perceiver_fast[cuda],sdpa,flash_attn"),
                          ("flex", "--levels op --providers flex_attention"),
                          ("memcheck", "compute-sanitizer --tool memcheck"),
                          ("model", "--levels layer,model")):
        line = next(line for line in proc.stdout.splitlines() if line.strip().startswith(step))
        assert command in line, line
    summary = (tmp_path / "summary.md").read_text()
    assert "Dry run: no CUDA device here" in summary and "| model |" in summary and "- smoke (90 s)" in summary
    assert not (tmp_path / "build.log").exists(), "a dry run runs nothing"


@no_cuda
def test_make_gpu_runs_the_steps_it_is_given(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), "--steps", "memcheck,racecheck"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["memcheck", "racecheck"]


@no_cuda
@pytest.mark.parametrize("name", ["bench", "flex", "model"])
def test_the_benchmark_steps_arguments_are_accepted(tmp_path, name):
    step = next(s for s in gpu_run.steps(tmp_path) if s.name == name)
    proc = subprocess.run(step.command + ["--budget-s", "100"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    # Every argument parsed: what stops it here is the missing GPU, checked after them.
    assert proc.returncode == 2 and "--device cuda: no CUDA device here" in proc.stderr, proc.stderr


@pytest.mark.parametrize("arguments,message", [
    (["--steps", "build,flash"], "--steps: flash; choose from build, smoke, tests, bench, flex, memcheck, model, racecheck"),
    (["--budget-s", "5"], "--budget-s: at least 15, got 5"),
])
def test_make_gpu_names_a_bad_argument(tmp_path, arguments, message):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), *arguments], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(gpu_prebuild.verdict(gpu_prebuild.read_manifest(), torch.__version__, None) is None,
                    reason="the prebuilt extension matches this Python and torch")
def test_expect_prebuilt_fails_where_the_prebuilt_extension_would_not_be_taken(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), "--expect-prebuilt"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "the build step would not take the prebuilt extension: " in proc.stdout


def manifest_for_here(**changes) -> dict:
    import importlib.machinery

    return {"extension": "_C" + importlib.machinery.EXTENSION_SUFFIXES[0], "python": "3.12.1", "torch": "2.11.0+cu130",
            "cuda": "13.0", "arch": "sm_90a", "sources": gpu_prebuild.sources_digest(), "built": "2026-12-07", **changes}


def test_the_prebuilt_extension_is_taken_only_where_it_matches():
    here = manifest_for_here()
    assert gpu_prebuild.verdict(here, "2.11.0+cu130", (9, 0)) is None
    assert gpu_prebuild.verdict(here, "2.11.0+cu130", None) is None, "no GPU: a dry run's question"
    assert gpu_prebuild.verdict(None, "2.11.0+cu130", (9, 0)).startswith("no prebuilt extension in .gpu-prebuilt/")
    assert gpu_prebuild.verdict(here, "2.13.0+cpu", (9, 0)) == \
        "built against torch 2.11.0+cu130; this is torch 2.13.0+cpu"
    assert gpu_prebuild.verdict(here, "2.11.0+cu130", (8, 0)) == "built for sm_90a; this GPU is sm_80"
    other_python = manifest_for_here(extension="_C.cpython-399-x86_64-linux-gnu.so")
    assert gpu_prebuild.verdict(other_python, "2.11.0+cu130", None).startswith(
        "built for another Python (_C.cpython-399-x86_64-linux-gnu.so)")
    stale = manifest_for_here(sources="0" * 64)
    assert gpu_prebuild.verdict(stale, "2.11.0+cu130", None).startswith("built from other sources")


def test_the_sources_digest_follows_every_csrc_file_and_setup_py(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()")
    kernel = tmp_path / "csrc" / "cuda" / "tiles.cuh"
    kernel.write_text("// tiles")
    first = gpu_prebuild.sources_digest(tmp_path)
    (tmp_path / "csrc" / "cuda" / "notes.txt~").write_text("an editor's backup, which git ignores")
    assert gpu_prebuild.sources_digest(tmp_path) == first
    kernel.write_text("// tiles, changed")
    second = gpu_prebuild.sources_digest(tmp_path)
    (tmp_path / "setup.py").write_text("setup(name='x')")
    assert len({first, second, gpu_prebuild.sources_digest(tmp_path)}) == 3


def test_the_prebuild_checks_every_cuda_kernel():
    assert gpu_prebuild.kernel_names() == {"attention_forward_kernel", "merge_splits_kernel", "delta_kernel",
                                           "attention_backward_kernel"}


def test_a_step_out_of_time_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child-survived"
    # The child outlives its parent's kill unless the whole process group is stopped.
    step = gpu_run.Step("tests", "a step that runs too long",
                        ["bash", "-c", f"(sleep 3; touch {marker}) & echo started; sleep 60"], 1)
    start = time.monotonic()
    result = gpu_run.run_step(step, tmp_path, 1.0)
    assert time.monotonic() - start < 10
    assert result.result.startswith("stopped after 1 s") and result.last_line == "started"
    time.sleep(4)
    assert not marker.exists(), "the step's child ran on after the step was stopped"


def test_steps_share_the_budget_and_a_stopped_run_keeps_what_it_finished(tmp_path):
    given = []

    def runner(step, out, seconds):
        given.append((step.name, round(seconds)))
        (out / f"{step.name}.log").write_text(f"{step.name} done\n")
        return gpu_run.Result(step, "failed (exit 1)" if step.name == "smoke" else "ok", 10.0, f"{step.name} done")

    chosen = [s for s in gpu_run.steps(tmp_path) if s.name in ("build", "smoke", "tests", "bench")]
    copies = tmp_path / "copies"
    results = gpu_run.run_steps(chosen, tmp_path, 300, copies, runner)
    # Each takes its share plus what the steps before it left unused, within what is left.
    assert given == [("build", 150), ("smoke", 230), ("tests", 300), ("bench", 300)]
    assert [r.result for r in results] == ["ok", "failed (exit 1)", "ok", "ok"]
    summary = (copies / "summary.md").read_text()
    assert "| smoke | each kernel against float64, small shapes | failed (exit 1) | 10 | smoke done |" in summary
    assert "To rerun what did not pass: `make gpu GPU_STEPS=build,smoke GPU_BUDGET_S=300`" in summary
    with tarfile.open(copies / "gpu-run.tar.gz") as archive:
        assert {"gpu-run/summary.md", "gpu-run/bench.log"} <= set(archive.getnames())
    # A step left less than it can use is not started: a benchmark keeps 45 s to end its last case and
    # write its report, so it needs 60.
    given.clear()
    late = gpu_run.run_steps(chosen, tmp_path, 50, None, runner)
    assert [name for name, _ in given] == ["build", "smoke", "tests"]
    assert late[3].result == "not run: 50 s of the budget left"
    assert all(r.result == "not run: 14 s of the budget left" for r in gpu_run.run_steps(chosen, tmp_path, 14, None,
                                                                                          runner))


def test_the_build_step_installs_a_matching_prebuilt_extension(tmp_path, monkeypatch):
    prebuilt, package, out = tmp_path / "prebuilt", tmp_path / "package", tmp_path / "out"
    for folder in (prebuilt, package, out):
        folder.mkdir()
    manifest = manifest_for_here(torch=torch.__version__)
    (prebuilt / manifest["extension"]).write_bytes(b"an extension")
    (prebuilt / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(gpu_prebuild, "PREBUILT", prebuilt)
    monkeypatch.setattr(gpu_run, "cuda_kernels_missing", lambda root: None)
    build = next(s for s in gpu_run.steps(out) if s.name == "build")
    result = gpu_run.run_step(build, out, 60, package=package)
    assert result.result == "prebuilt" and result.passed
    assert (package / manifest["extension"]).read_bytes() == b"an extension"
    assert "installed " in (out / "build.log").read_text()
    # One that does not load there is taken out again, and the step builds instead.
    monkeypatch.setattr(gpu_run, "cuda_kernels_missing", lambda root: "the prebuilt extension does not load here: x")
    stand_in = gpu_run.Step("build", "a build", ["bash", "-c", "echo built"], 60)
    result = gpu_run.run_step(stand_in, out, 60, package=package)
    assert result.result == "ok" and result.last_line == "built"
    assert not (package / manifest["extension"]).exists()
    assert (out / "build.log").read_text().startswith(
        "not the prebuilt extension: the prebuilt extension does not load here: x")


def test_the_load_check_reads_the_package_itself(tmp_path):
    # The tree's package under .venv's Python: its extension loads, with or without CUDA kernels.
    from perceiver_fast import extension

    if Path(extension.__file__).parent == ROOT / "perceiver_fast":  # this Python imports the tree's package
        said = gpu_run.cuda_kernels_missing(ROOT)
        assert (said is None) == extension.HAS_CUDA_KERNELS
        if said is not None:
            assert said == "the prebuilt extension does not load here: the extension has no CUDA kernels"
    broken = tmp_path / "perceiver_fast"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('a package that does not import')")
    assert gpu_run.cuda_kernels_missing(tmp_path) == \
        "the prebuilt extension does not load here: ImportError: a package that does not import"


def test_a_step_that_raises_is_reported_and_the_others_run(tmp_path):
    def runner(step, out, seconds):
        if step.name == "smoke":
            raise OSError("disk full")
        return gpu_run.Result(step, "ok", 1.0)

    chosen = [s for s in gpu_run.steps(tmp_path) if s.name in ("build", "smoke", "tests")]
    again_as = "python3 tools/gpu_run.py --steps {steps} --budget-s {budget} --out /tmp/x --copy-to /out"
    results = gpu_run.run_steps(chosen, tmp_path, 300, None, runner, again_as=again_as)
    assert [r.result for r in results] == ["ok", "failed: OSError: disk full", "ok"]
    assert gpu_run.rerun_command(results, 300, again_as) == \
        "python3 tools/gpu_run.py --steps build,smoke --budget-s 300 --out /tmp/x --copy-to /out"


@no_cuda
def test_require_cuda_says_why_cuda_does_not_start(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), "--require-cuda"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "make gpu: CUDA does not start here: " in proc.stdout
    assert not (tmp_path / "summary.md").exists(), "no dry run"


def test_prebuild_check_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_prebuild, "PREBUILT", tmp_path)
    assert gpu_prebuild.problems(None) == ["no prebuilt extension in " + tmp_path.name + "/ (make gpu-prebuild "
                                           "makes one)"]


@pytest.mark.skipif(not (ROOT / ".gpu-prebuilt" / "manifest.json").exists(),
                    reason="no prebuilt extension here (make gpu-prebuild)")
def test_the_prebuilt_manifest_names_the_gpu_machine():
    manifest = json.loads((ROOT / ".gpu-prebuilt" / "manifest.json").read_text())
    assert manifest["torch"] == "2.11.0+cu130" and manifest["arch"] == "sm_90a"
    assert manifest["extension"] == "_C.cpython-312-x86_64-linux-gnu.so"
    assert os.path.getsize(ROOT / ".gpu-prebuilt" / manifest["extension"]) <= gpu_prebuild.MAX_BYTES


def test_the_gpu_benchmark_set_holds_the_gpu_targets():
    from perceiver_fast.bench.sets import SETS

    gpu = SETS["gpu"]
    assert gpu.devices == ("cuda",) and gpu.dtypes == ("bfloat16",)
    ops = [(c.B, c.H, c.N, c.M, c.dqk, c.kind) for c in gpu.cases("cuda") if c.level == "op"]
    assert ops == [(1, 8, 512, 262144, 64, "cross"), (1, 1, 512, 1048576, 128, "cross"),
                   (8, 1, 512, 50176, 261, "cross"), (1, 1, 2048, 182528, 322, "cross"),
                   (1, 16, 1024, 131072, 64, "causal"), (64, 8, 512, 512, 128, "latent")]
    layers = [(c.name, c.B) for c in gpu.cases("cuda") if c.level == "layer"]
    # One layer per input method: vision-fourier takes the shortcut, language the projection.
    assert layers == [("hf-vision-fourier-cross", 8), ("hf-language-cross", 32)]
    assert [c.name for c in gpu.cases("cuda") if c.level == "model"] == ["hf-vision-fourier"]
