"""The benchmark report: Markdown tables, PNG plots of how each provider scales with the input
length, and the raw results as JSON with the machine recorded."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .cases import Case
from .memory import CPU_METHOD, CUDA_METHOD

OURS_PREFIXES = ("perceiver_fast[", "HF + pf.patch", "lucidrains + pf.patch")


def is_ours(provider: str) -> bool:
    return provider.startswith(OURS_PREFIXES)


def group_key(row: dict) -> tuple:
    c = row["case"]
    return (c["level"], c["name"], c["B"], c["M"], row["dtype"], row["pass"])


def row_gflop(row: dict) -> float:
    """The attention's matmul FLOPs (forward, x3 for forward+backward): the same count for every provider."""
    flops = Case(**row["case"]).attention_flops()
    return flops * (3 if row["pass"] == "forward+backward" else 1) / 1e9


def write_json(path: Path, info: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"machine": info, "results": rows}, indent=1))


def load_json(path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "results" not in data or "machine" not in data:
        raise ValueError(f"{path} is not a perceiver-fast bench result file (no 'machine' and 'results')")
    return data["machine"], data["results"]


def markdown(info: dict, rows: list[dict], plots: list[str]) -> str:
    device = info["device"]
    gpu = f", GPU {info['gpu']} (CUDA {info.get('cuda')})" if "gpu" in info else ""
    lines = [
        "# perceiver-fast benchmark report", "",
        f"Machine: {info['cpu']} ({info['cpu_threads']} threads){gpu}; torch {info['torch']}, triton "
        f"{info['triton']}, Python {info['python']}; device {device}.", "",
        "Every (case, dtype, pass) runs in its own process, its providers one after another on the same "
        "inputs: ms is the median of the timed calls after one untimed call. GFLOP/s: the attention's "
        "matmul FLOPs, 2 B H P (dqk + dv) with P the scored query-key pairs (x3 for forward+backward), over the "
        "time; the same count for every provider, layers included (their projections are not counted). "
        f"Peak extra MiB: {CUDA_METHOD if device == 'cuda' else CPU_METHOD}; it includes the call's outputs "
        "(and gradients). vs X: X's time over this row's (above 1: faster than X). A provider that cannot "
        "run a case is listed with the reason.", "",
    ]
    scaled = sorted({f"{r['case']['name']}: {r['case']['scaled']}" for r in rows if r["case"]["scaled"]})
    if scaled:
        lines += ["Scaled from the published shapes to fit this run: " + "; ".join(scaled) + ".", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    for level, title in (("op", "Op level: `cross_attention` / `latent_attention`"),
                         ("layer", "Layer level: a full attention layer (LayerNorms, projections, attention, "
                                   "output projection)")):
        keys = [k for k in groups if k[0] == level]
        if not keys:
            continue
        references = sorted({r["provider"] for k in keys for r in groups[k] if not is_ours(r["provider"])
                             and "ms" in r})
        lines += [f"## {title}", "",
                  "| case | dtype | pass | provider | ms | GFLOP/s | peak extra MiB | "
                  + " | ".join(f"vs {ref}" for ref in references) + " |",
                  "|---|---|---|---|---:|---:|---:|" + "---:|" * len(references)]
        for key in keys:
            found = groups[key]
            times = {r["provider"]: r["ms"] for r in found if "ms" in r}
            for r in found:
                if "ms" not in r:
                    continue
                head = f"| {Case(**r['case']).label()} | {r['dtype']} | {r['pass']} | {r['provider']} |"
                ratios = [f"{times[ref] / r['ms']:.2f}x" if ref in times else "" for ref in references]
                lines.append(f"{head} {r['ms']:.2f} | {row_gflop(r) / (r['ms'] / 1e3):.1f} | "
                             f"{r['peak_extra_mib']:.1f} | " + " | ".join(ratios) + " |")
        lines.append("")
    lines += not_run_section(rows)
    if plots:
        lines += ["## Scaling with the input length", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def not_run_section(rows: list[dict]) -> list[str]:
    """The providers that could not run, one line per (provider, reason) with the cases it concerns."""
    refused = defaultdict(list)
    for r in rows:
        if "not_run" in r:
            refused[(r["provider"], r["not_run"])].append(f"{r['case']['level']} {Case(**r['case']).label()} "
                                                          f"{r['dtype']} {r['pass']}")
    if not refused:
        return []
    lines = ["## Not run", "", "| provider | reason | cases |", "|---|---|---|"]
    for (provider, reason), cases in refused.items():
        listed = "; ".join(cases) if len(cases) <= 4 else f"all {len(cases)} of its cases in this run"
        lines.append(f"| {provider} | {reason} | {listed} |")
    return lines + [""]


def sweeps(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows of each (sweep, level, dtype, pass) that has more than one input length."""
    found = defaultdict(list)
    for r in rows:
        if r["case"].get("sweep"):
            found[(r["case"]["sweep"], r["case"]["level"], r["dtype"], r["pass"])].append(r)
    return {k: v for k, v in found.items() if len({r["case"]["M"] for r in v}) > 1}


def plot_sweeps(rows: list[dict], out_dir: Path, device: str) -> list[str]:
    """One PNG per sweep: time vs M and peak memory vs M, log axes, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    for (name, level, dtype, pass_name), found in sweeps(rows).items():
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in dict.fromkeys(r["provider"] for r in found):
            points = sorted((r["case"]["M"], r["ms"], max(r["peak_extra_mib"], 0.01))
                            for r in found if r["provider"] == provider and "ms" in r)
            if not points:
                continue
            m, ms, mib = zip(*points)
            style = "-" if is_ours(provider) else "--"
            ax_time.plot(m, ms, style, marker="o", label=provider)
            ax_mem.plot(m, mib, style, marker="o", label=provider)
        lengths = sorted({r["case"]["M"] for r in found})
        for ax, ylabel in ((ax_time, "time (ms)"), (ax_mem, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(lengths, [f"{m:,}" for m in lengths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("input length M")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
        fig.suptitle(f"{name} ({level}), {dtype}, {pass_name}, {device}")
        fig.tight_layout()
        path = out_dir / f"plot-{device}-{level}-{name}-{dtype}-{pass_name.replace('+', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_report(out_dir, info: dict, rows: list[dict], plots: bool = True) -> dict[str, str]:
    """report-<device>.md, results-<device>.json and the plots in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = info["device"]
    plot_paths = plot_sweeps(rows, out, device) if plots else []
    report, results = out / f"report-{device}.md", out / f"results-{device}.json"
    write_json(results, info, rows)
    report.write_text(markdown(info, rows, plot_paths))
    return {"report": str(report), "results": str(results), "plots": plot_paths}
