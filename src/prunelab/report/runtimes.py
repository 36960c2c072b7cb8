"""The report's runtime sections: which runtime ``auto`` chose and why, and the shipped model with
the lines that load and run it. Reads the report dict only."""

from __future__ import annotations


def choice_section(report: dict) -> list[str]:
    """Every runtime's figure when ``latency.runtime=auto`` chose, and why the winner won."""
    c = report.get("runtime_choice")
    if not c:
        return []
    rows = [f"| {'**' + n + '**' if n == c['chosen'] else n} | {f['p50_ms']:.2f} | {f['p90_ms']:.2f} | {f['dtype']} "
            f"| {f.get('library', '')} |" for n, f in c["figures"].items()]
    rows += [f"| {n} | - | - | - | {why} |" for n, why in {**c.get("skipped", {}), **c.get("refused", {})}.items()]
    return ["## Runtime", "", f"`latency.runtime=auto` chose **{c['chosen']}**: {c['why']}. The dense model at batch "
            f"{c['batch_size']}, {c['timed_from']}:", "", "| runtime | p50 ms | p90 ms | dtype | |", "|---|---|---|---|---|",
            *rows, ""]


def shipped_section(report: dict) -> list[str]:
    """The model as timed, in its runtime's format, and the lines that load and run it."""
    s = (report.get("latency") or {}).get("shipped")
    if not s:
        return []
    where = (f"written as `{s['format']}` (`models/{s['file'].rsplit('/', 1)[-1]}`, {s['bytes']:,} bytes) beside "
             "its state_dict" if s.get("file") else "shipped as its state_dict (this runtime has no file format of its own)")
    return ["## Serving it", "", f"The model timed in `{s['runtime']}` is {where}. To load and run it:", "",
            "```python", s["load"], "```", ""]
