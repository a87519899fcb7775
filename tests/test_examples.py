"""The examples the README names run as documented (shortened by their own arguments)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ranks import requires_gloo

ROOT = Path(__file__).resolve().parents[1]


@requires_gloo
def test_sharded_training_example_runs_under_torchrun():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found beside this Python"
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "examples/train_sharded_encoder.py",
                           "--steps", "3", "--length", "4096", "--batch", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["0", "2"], proc.stdout
    assert "2 ranks x 2048 of 4096 points" in lines[-1]


def test_generation_example_runs():
    import pytest

    pytest.importorskip("perceiver.model.core")
    proc = subprocess.run([sys.executable, "examples/generate_perceiver_ar.py", "--prompt", "64", "--new-tokens", "5",
                           "--latents", "8", "--channels", "32", "--layers", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 new tokens for 2 prompts of 64 tokens" in proc.stdout, proc.stdout
