"""The benchmark report of one case set: Markdown tables, PNG plots of how each provider scales
with the input length where the set has sweeps, and the raw results as JSON with the machine
recorded. Each set has its own file names, so that the reports of all sets sit side by side."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .cases import PASS_FLOP_FACTOR, Case
from ..peak_memory import CPU_METHOD, CUDA_METHOD
from .sets import CaseSet

OURS_PREFIXES = ("perceiver_fast[", "HF + pf.patch", "lucidrains + pf.patch")
LEVEL_TITLES = {"op": "Op level: `cross_attention` / `latent_attention`",
                "layer": "Layer level: a full attention layer (LayerNorms, projections, attention, output projection)",
                "model": "Model level: a whole model"}


def is_ours(provider: str) -> bool:
    return provider.startswith(OURS_PREFIXES)


def group_key(row: dict) -> tuple:
    """The rows that compare with each other: one case, dtype and pass."""
    return (row["case"]["level"], Case(**row["case"]).label(), row["dtype"], row["pass"])


def file_stem(set_name: str, device: str, isa: str | None = None) -> str:
    # The quick set keeps the names report-<device>.md and results-<device>.json that links point to; a
    # run with capped instruction sets (--isa) ends in its level.
    stem = device if set_name == "quick" else f"{set_name}-{device}"
    return stem if isa is None else f"{stem}-{isa}"


def format_ms(ms: float) -> str:
    """Two decimals, or four significant digits below a millisecond (the overhead set's calls)."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4g}"


def write_json(path: Path, set_name: str, info: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"set": set_name, "machine": info, "results": rows}, indent=1))


def load_json(path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "results" not in data or "machine" not in data:
        raise ValueError(f"{path} is not a perceiver-fast bench result file (no 'machine' and 'results')")
    if not all(isinstance(row.get("case"), dict) for row in data["results"]):
        # The former benchmarks/ scripts wrote the same top level with the case as a name.
        raise ValueError(f"{path} is not a perceiver-fast bench result file (rows without a case record)")
    return data["machine"], data["results"]


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']} (CUDA {info.get('cuda')})" if "gpu" in info else ""
    versions = ", ".join(f"{name} {info[name]}" for name in ("torch", "triton", "transformers") if info.get(name))
    line = (f"Machine: {info['cpu']} ({info['cpu_threads']} threads){gpu}; {versions}, Python {info['python']}; "
            f"device {info['device']}.")
    if info.get("cpu_kernel_paths"):
        line += f" cpu backend kernel paths: {info['cpu_kernel_paths']}."
    if info.get("isa_caps"):
        caps = ", ".join(f"{name}={value}" for name, value in info["isa_caps"].items())
        line += (f" Instruction sets capped (`--isa {info['isa_caps']['PERCEIVER_FAST_CPU_ISA']}`: a CPU with only "
                 f"these, emulated on this one) in every case process: {caps}.")
    if info.get("matmul_gflops"):
        uncapped = " (the reporting process, not capped)" if info.get("isa_caps") else ""
        line += f" One torch matmul (2048^3){uncapped}: " + ", ".join(
            f"{dtype} {rate:.0f} GFLOP/s" for dtype, rate in info["matmul_gflops"].items()) + "."
    if info.get("read_gbs"):
        line += f" Memory read rate (a sum over 1 GiB of float32): {info['read_gbs']:.1f} GB/s."
    return line


def markdown(case_set: CaseSet, info: dict, rows: list[dict], plots: list[str]) -> str:
    device = info["device"]
    lines = [
        f"# perceiver-fast benchmark report: the {case_set.name} set", "",
        f"`perceiver-fast bench --set {case_set.name}`: {case_set.about}.", "",
        machine_line(info), "",
        "Every (case, dtype, pass) runs in its own process, its providers one after another on the same "
        "inputs: ms is the median of the timed calls after one untimed call. GFLOP/s: the attention's "
        "matmul FLOPs over the time, forward 2 B H P (dqk + dv) with P the scored query-key pairs (causal-aware), "
        f"forward+backward {PASS_FLOP_FACTOR['forward+backward']}x that (FlashAttention's convention: the backward, "
        f"which recomputes the scores, counts {PASS_FLOP_FACTOR['forward+backward'] - 1}x the forward); the same "
        "count for every provider, layers "
        "included (their projections are not counted); model level: no GFLOP/s, the whole model's work is not "
        f"counted. Peak extra MiB: {CUDA_METHOD if device == 'cuda' else CPU_METHOD}; it includes the call's "
        "outputs (and gradients), whose size is outputs MiB: the rest is workspace. vs X: X's time over this "
        "row's (above 1: faster than X). A provider that cannot run a case is listed with the reason.", "",
    ]
    scaled = sorted({f"{r['case']['name']}: {r['case']['scaled']}" for r in rows if r["case"]["scaled"]})
    if scaled:
        lines += ["Scaled from the published shapes to fit this run: " + "; ".join(scaled) + ".", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    for level, title in LEVEL_TITLES.items():
        keys = [k for k in groups if k[0] == level]
        if not keys:
            continue
        rated = Case(**groups[keys[0]][0]["case"]).attention_flops("forward") is not None  # not at model level
        references = sorted({r["provider"] for k in keys for r in groups[k] if not is_ours(r["provider"])
                             and "ms" in r})
        # each inference row's largest logit error against the float32 model run by HF
        errors = any("max_logit_error" in r for k in keys for r in groups[k])
        lines += [f"## {title}", "",
                  "| case | dtype | pass | provider | ms | " + ("GFLOP/s | " if rated else "")
                  + "peak extra MiB | outputs MiB | " + ("max logit error | " if errors else "")
                  + " | ".join(f"vs {ref}" for ref in references) + " |",
                  "|---|---|---|---|---:|" + "---:|" * (2 + rated + errors + len(references))]
        for key in keys:
            found = groups[key]
            times = {r["provider"]: r["ms"] for r in found if "ms" in r}
            for r in found:
                if "ms" not in r:
                    continue
                case = Case(**r["case"])
                rate = f"{case.attention_flops(r['pass']) / 1e9 / (r['ms'] / 1e3):.1f} | " if rated else ""
                outputs = f"{r['outputs_mib']:.1f}" if "outputs_mib" in r else ""  # not in older result files
                ratios = [f"{times[ref] / r['ms']:.2f}x" if ref in times else "" for ref in references]
                # SDPA: the kernel it ran; OpenVINO: the precision it ran
                provider = r["provider"] + "".join(f" ({r[k]})" for k in ("kernel", "precision") if k in r)
                error = (f"{r['max_logit_error']:.3g} | " if "max_logit_error" in r else " | ") if errors else ""
                lines.append(f"| {case.label()} | {r['dtype']} | {r['pass']} | {provider} | {format_ms(r['ms'])} | "
                             f"{rate}{r['peak_extra_mib']:.1f} | {outputs} | {error}" + " | ".join(ratios) + " |")
        lines.append("")
    lines += sharded_section(rows)
    lines += generation_section(rows, info)
    lines += phases_section(rows)
    lines += op_profile_section(rows)
    lines += not_run_section(rows)
    if plots:
        lines += ["## Scaling with the input length", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def sharded_section(rows: list[dict]) -> list[str]:
    """The sharded level: each layout of processes x threads against one process with as many threads
    in all (same case, dtype and pass), with every rank's peak memory and the bytes one call sends
    into collectives (all-reduces and the all-gather that checks the ranks agree), per rank."""
    found = [r for r in rows if r["case"]["level"] == "sharded" and "ms" in r]
    if not found:
        return []

    def key(r):
        return r["case"]["name"], r["case"]["M"], r["dtype"], r["pass"]

    single = {(key(r), r["case"]["threads"]): r["ms"] for r in found if r["case"]["ranks"] == 1}
    lines = ["## Sharded level: one layer, its input split along M over processes (gloo)", "",
             "vs 1 process: the time of one process with as many threads in all over this row's (above 1: faster). "
             "Peak extra MiB per rank as above, each rank measured in its own process. Collective bytes: what one "
             "call sends into all-reduces and all-gathers, per rank.", "",
             "| case | dtype | pass | ms | vs 1 process | peak extra MiB per rank | collective bytes per call |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in found:
        case = Case(**r["case"])
        baseline = single.get((key(r), case.ranks * max(case.threads, 1)))
        ratio = f"{baseline / r['ms']:.2f}x" if baseline else ""
        peaks = " / ".join(f"{p:.0f}" for p in r.get("peak_extra_mib_per_rank", [r["peak_extra_mib"]]))
        moved = f"{r['collective_bytes']:,}" if "collective_bytes" in r else "0"
        lines.append(f"| {case.label()} | {r['dtype']} | {r['pass']} | {format_ms(r['ms'])} | {ratio} | {peaks} | "
                     f"{moved} |")
    return lines + [""]


def generation_section(rows: list[dict], info: dict) -> list[str]:
    """The generation level: ms per new token, each provider against krasserm's cached forward, and
    how close each comes to the memory floor: the bytes a decode step must read at least
    (generation_providers.decode_read_bytes) over its time, against the machine's read rate."""
    import torch

    from .generation_providers import cache_bytes, decode_read_bytes

    found = [r for r in rows if r["case"]["level"] == "generation" and "ms" in r]
    if not found:
        return []
    baseline = {(r["case"]["M"], r["dtype"]): r["ms"] for r in found if r["provider"] == "krasserm cached forward"}
    rate = info.get("read_gbs")
    lines = ["## Generation level: Perceiver AR decoding", "",
             "ms per new token: the median timed call's time over its new tokens, from the state right after the "
             "prompt's forward (not timed). Peak extra MiB: as above, over one call (all its tokens), beyond "
             "the cache as it was after the prompt. KV cache MiB: the cache after the call's tokens. MiB read "
             "per token: what a decode step must read at least (every weight matrix once, the cross-attention "
             "cache and the latent layers' caches); GB/s: that over the step's time"
             + (f"; % of read rate: of this machine's {rate:.1f} GB/s" if rate else "") + ".", "",
             "| case | dtype | provider | ms per token | vs krasserm cached forward | peak extra MiB | KV cache MiB | "
             "MiB read per token | GB/s | % of read rate |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in found:
        case, dtype = Case(**r["case"]), getattr(torch, r["dtype"])
        reference = baseline.get((case.M, r["dtype"]))
        read = decode_read_bytes(case, dtype)
        achieved = read / (r["ms"] / 1e3) / 1e9
        speedup = f"{reference / r['ms']:.2f}x" if reference else ""
        share = f"{100 * achieved / rate:.0f}%" if rate else ""
        lines.append(f"| {case.label()} | {r['dtype']} | {r['provider']} | {format_ms(r['ms'])} | {speedup} | "
                     f"{r['peak_extra_mib']:.1f} | {cache_bytes(case, dtype) / 2**20:.0f} | {read / 2**20:.0f} | "
                     f"{achieved:.1f} | {share} |")
    return lines + [""]


PHASES = ("load", "pack", "gemm", "softmax", "convert", "store", "merge", "key_rows")


def phases_section(rows: list[dict]) -> list[str]:
    """Where the cpu kernels' time went, by phase (csrc/cpu/phase_timer.h), for the rows that timed
    it: each phase's share of the threads' time in one more call (its wall time x threads); "rest"
    is what no phase covers (the Python layer, thread start-up, waiting at the end of the call)."""
    found = [r for r in rows if "phase_seconds" in r]
    if not found:
        return []
    lines = ["## Where the cpu kernels' time goes", "",
             "One more call per row, timed by phase: the share of the threads' time (the call's wall time x threads) "
             "in loading a head's query rows, packing K/V tiles, the GEMMs, the softmax steps (bf16: the P "
             "conversion too), converting P and dS for the backward GEMMs (bf16), storing results, merging split "
             "heads, and the few-query path's in-place rows; rest: outside every phase.", "",
             "| case | dtype | pass | provider | call ms | " + " | ".join(PHASES) + " | rest |",
             "|---|---|---|---|---:|" + "---:|" * (len(PHASES) + 1)]
    for r in found:
        thread_time = r["phase_wall_s"] * r["threads"]
        shares = [r["phase_seconds"].get(p, 0.0) / thread_time for p in PHASES]
        provider = r["provider"] + (f" ({r['kernel']})" if "kernel" in r else "")
        lines.append(f"| {Case(**r['case']).label()} | {r['dtype']} | {r['pass']} | {provider} | "
                     f"{r['phase_wall_s'] * 1e3:.1f} | " + " | ".join(f"{100 * x:.0f}%" for x in shares)
                     + f" | {100 * (1 - sum(shares)):.0f}% |")
    return lines + [""]


def op_profile_section(rows: list[dict]) -> list[str]:
    """Where a whole model's time goes, for the rows that profiled one more call (torch.profiler):
    each op's self time and its share of the profiled total, the largest first."""
    found = [r for r in rows if "op_ms" in r]
    if not found:
        return []
    lines = ["## Where the patched model's time goes", "",
             "One more call per row under torch.profiler: each op's own time (self CPU ms) and its share of the "
             "call; `perceiver_fast::linear` holds the oneDNN (or torch) GEMMs, `mkldnn::_linear_pointwise` "
             "is oneDNN's GEMM inside it.", ""]
    for r in found:
        total = sum(r["op_ms"].values())
        lines += [f"{Case(**r['case']).label()}, {r['dtype']}, {r['pass']}, {r['provider']}: {total:.0f} ms profiled", "",
                  "| op | ms | share |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |" for name, ms in r["op_ms"].items()]
        lines.append("")
    return lines


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


def plot_sweeps(rows: list[dict], out_dir: Path, device: str, stem: str) -> list[str]:
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
        path = out_dir / f"plot-{stem}-{level}-{name}-{dtype}-{pass_name.replace('+', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_report(out_dir, case_set: CaseSet, info: dict, rows: list[dict], plots: bool = True) -> dict[str, str]:
    """report-<set>-<device>.md, results-<set>-<device>.json and plot-<set>-<device>-*.png (the quick set:
    without "<set>-"; under --isa, each stem ends in "-<level>") in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = info["device"]
    stem = file_stem(case_set.name, device, (info.get("isa_caps") or {}).get("PERCEIVER_FAST_CPU_ISA"))
    plot_paths = plot_sweeps(rows, out, device, stem) if plots else []
    report, results = out / f"report-{stem}.md", out / f"results-{stem}.json"
    write_json(results, case_set.name, info, rows)
    report.write_text(markdown(case_set, info, rows, plot_paths))
    return {"report": str(report), "results": str(results), "plots": plot_paths}
