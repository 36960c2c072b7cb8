"""The index of benchmark results in benchmarks/README.md, generated from results/*.json so that it
cannot drift from the files: one row per result (date, benchmark, device, goals met), linking the
result's own ``.md``, where its figures and their story live.

    python -m benchmarks.results_table           # rewrite the index between its markers
    python -m benchmarks.results_table --check   # exit 1 when the index is not what the files give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from prunelab.io import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
# Benchmark names as their result files start (after the date); the longest match wins. The
# comparison of the notebook's procedure wrote bare "<date>-cpu-2threads" files before it was named.
NAMES = ("compare", "fast-paths", "pruning-pays", "deploy-call", "deploy", "fast-vs-default", "fastest",
         "finetune-scale", "step-overhead", "worthy", "recipe-cost", "runtimes")
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})-(.+)$")


def benchmark_of(stem: str) -> tuple[str, str]:
    """(benchmark, the rest of the name: device and variant) of a result's stem after its date."""
    for name in sorted(NAMES, key=len, reverse=True):
        if stem == name or stem.startswith(name + "-"):
            return name, stem[len(name) + 1:]
    return "compare", stem  # the unnamed early comparison files


def goals_met(result: dict) -> str:
    """"met/total" of a result's ``goals`` (each a dict with ``met`` or a bare bool); "-" without goals."""
    goals = result.get("goals")
    if not isinstance(goals, dict) or not goals:
        return "-"
    met = sum(bool(v.get("met")) if isinstance(v, dict) else bool(v) for v in goals.values())
    return f"{met}/{len(goals)}"


def rows(results: Path = RESULTS) -> list[tuple[str, ...]]:
    out = []
    for path in sorted(results.glob("*.json")):
        m = _DATE.match(path.stem)
        if not m:
            continue
        date, stem = m.groups()
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            result = {}
        name, where = benchmark_of(stem)
        md = path.with_suffix(".md")
        link = f"[{md.name}](results/{md.name})" if md.is_file() else f"[{path.name}](results/{path.name})"
        out.append((date, name, where or "-", goals_met(result if isinstance(result, dict) else {}), link))
    return out


def render(table_rows: list[tuple[str, ...]]) -> str:
    head = ["date", "benchmark", "device and variant", "goals met", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows]
    return "\n".join(lines)


def updated(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} markers: add them where the index belongs")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the README's index is stale")
    args = p.parse_args(argv)
    text = README.read_text()
    new = updated(text, render(rows()))
    if args.check:
        if new != text:
            print("benchmarks/README.md's results index is stale: run python -m benchmarks.results_table", file=sys.stderr)
            return 1
        return 0
    if new != text:
        write_text(README, new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
