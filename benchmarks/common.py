"""What the benchmark scripts share. Providers, timing, memory and the machine record live in the
package (perceiver_fast.bench), where `perceiver-fast bench` uses them too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from perceiver_fast.bench.memory import peak_extra_mib  # noqa: F401
from perceiver_fast.bench.providers import eager, sdpa  # noqa: F401
from perceiver_fast.bench.timing import machine, median_seconds  # noqa: F401


def run_in_subprocess(script: str, job: dict) -> dict:
    """Runs `script --job <json>` (one measurement in a fresh process) and returns the JSON it prints last;
    on failure the job with an "error" entry."""
    proc = subprocess.run([sys.executable, script, "--job", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()
        return {**job, "error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(out_dir: str, name: str, info: dict, rows: list[dict], write_markdown) -> None:
    """<out_dir>/<name>.json (machine and rows) and <name>.md (by write_markdown(path, info, rows))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=1))
    write_markdown(out / f"{name}.md", info, rows)
    print(f"wrote {out / name}.md and {out / name}.json")
