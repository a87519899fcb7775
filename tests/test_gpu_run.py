"""`make gpu` (tools/gpu_run.py) on a machine without CUDA: a dry run that lists every step's command,
writes its summary and exits 0; and its argument errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = [sys.executable, str(ROOT / "tools" / "gpu_run.py")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run happens only where there is no CUDA")
def test_make_gpu_without_cuda_is_a_dry_run_of_every_step(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout
    for step, command in (("build", "setup.py build_ext --inplace"), ("tests", "-m gpu"),
                          ("memcheck", "compute-sanitizer --tool memcheck"),
                          ("racecheck", "compute-sanitizer --tool racecheck"), ("bench", "bench --set gpu")):
        line = next(line for line in proc.stdout.splitlines() if line.strip().startswith(step))
        assert command in line, line
    summary = (tmp_path / "summary.md").read_text()
    assert "Dry run: no CUDA device here" in summary and "| racecheck |" in summary
    assert not (tmp_path / "build.log").exists(), "a dry run runs nothing"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run happens only where there is no CUDA")
def test_make_gpu_runs_the_steps_it_is_given(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), "--steps", "bench,table"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["bench"]


def test_make_gpu_names_a_bad_step(tmp_path):
    proc = subprocess.run(GPU_RUN + ["--out", str(tmp_path), "--steps", "build,flash"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--steps: flash; choose from build, tests" in proc.stderr


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
