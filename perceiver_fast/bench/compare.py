"""The change between two benchmark runs: rows matched by case, dtype, pass and provider."""

from __future__ import annotations

from .report import group_key


def row_key(row: dict) -> tuple:
    """(level, case label, dtype, pass, provider): the label names every dimension that tells cases apart."""
    return group_key(row) + (row["provider"],)


def compare(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """One entry per row present in both runs: times, memory, and the speed ratio old/new (> 1: faster now).

    Rows that ran in only one of the two, or that ran in one and not the other, are reported with a status.
    """
    old = {row_key(r): r for r in old_rows}
    new = {row_key(r): r for r in new_rows}
    changes = []
    for key in list(dict.fromkeys(list(old) + list(new))):
        before, after = old.get(key), new.get(key)
        entry = {"key": key}
        if before is None or after is None:
            entry["status"] = "only in the new run" if before is None else "only in the old run"
        elif "ms" not in before or "ms" not in after:
            entry["status"] = ("ran before, not now: " + after.get("not_run", "")) if "ms" in before else (
                "runs now, did not before" if "ms" in after else "not run in either")
        else:
            entry.update(status="both", old_ms=before["ms"], new_ms=after["ms"], speedup=before["ms"] / after["ms"],
                         old_mib=before["peak_extra_mib"], new_mib=after["peak_extra_mib"])
        changes.append(entry)
    return changes


def format_changes(changes: list[dict]) -> str:
    lines = [f"{'case':72s} {'dtype':8s} {'pass':16s} {'provider':24s} {'old ms':>9s} {'new ms':>9s} "
             f"{'speed':>7s} {'old MiB':>8s} {'new MiB':>8s}"]
    for e in changes:
        level, label, dtype, pass_name, provider = e["key"]
        case = f"{level} {label}"
        if e["status"] != "both":
            lines.append(f"{case:72s} {dtype:8s} {pass_name:16s} {provider:24s} {e['status']}")
            continue
        lines.append(f"{case:72s} {dtype:8s} {pass_name:16s} {provider:24s} {e['old_ms']:9.2f} {e['new_ms']:9.2f} "
                     f"{e['speedup']:6.2f}x {e['old_mib']:8.1f} {e['new_mib']:8.1f}")
    both = [e["speedup"] for e in changes if e["status"] == "both"]
    if both:
        import math

        geomean = math.exp(sum(math.log(x) for x in both) / len(both))
        lines.append(f"{len(both)} rows in both runs; geometric mean of the speed ratios old/new {geomean:.2f}x "
                     "(above 1: faster now)")
    return "\n".join(lines)
