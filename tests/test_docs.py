"""The documentation stays a how-to that matches the project: no dates or commit hashes in README.md
or docs/, a README short enough to read, links that resolve, a section in benchmarks/README.md for
every benchmark, and commands, config keys and imports that exist. Pure text checks: no torch.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCH_README = ROOT / "benchmarks" / "README.md"
CONF = ROOT / "src" / "prunelab" / "conf"
MAX_README_LINES = 220

DATE = re.compile(r"20\d\d-[01]\d-")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.I)
# A word of 7-40 hex digits standing alone (not inside a file name or path): a commit hash's shape.
HEX_WORD = re.compile(r"(?<![\w./-])[0-9a-fA-F]{7,40}(?![\w/-]|\.\w)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)>\s]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def dates(text: str) -> list[str]:
    return [line for line in text.splitlines() if DATE.search(line)]


def hash_like(text: str) -> list[str]:
    """Tokens shaped like a commit hash (hex digits with at least one digit and one letter),
    outside URLs and file names."""
    text = URL.sub(" ", text)
    return [w for w in HEX_WORD.findall(text) if re.search(r"\d", w) and re.search(r"[a-fA-F]", w)]


def relative_links(text: str) -> list[str]:
    """Link targets of a markdown text that point into the repository (no scheme, not only an anchor),
    without their anchors; links inside code are not links."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0].split("?", 1)[0])
    return out


def broken_links(path: Path) -> list[str]:
    return [t for t in relative_links(path.read_text()) if not (path.parent / t).exists()]


def headings(text: str) -> list[str]:
    return [line for line in FENCE.sub("", text).splitlines() if line.startswith("#")]


def benchmark_entry_points() -> list[Path]:
    bench = ROOT / "benchmarks"
    scripts = [p for p in sorted(bench.glob("*.py")) if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)]
    return scripts + sorted(bench.glob("*.sh"))


def missing_sections(text: str, scripts: list[Path]) -> list[str]:
    """Scripts that no heading of ``text`` names (by file name or, for modules, ``benchmarks.<name>``)."""
    heads = "\n".join(headings(text))
    return [p.name for p in scripts
            if p.name not in heads and not (p.suffix == ".py" and f"benchmarks.{p.stem}" in heads)]


def runs_make_test(text: str) -> bool:
    """A line of the text is the command `make test` (perhaps with a comment), not make test-all."""
    return any(re.fullmatch(r"\s*make test(\s+#.*)?\s*", line) for line in text.splitlines())


# ---------------------------------------------------------------- config keys and options

def _yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _has(tree, keys: list[str]) -> bool:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def config_sources() -> tuple[dict[str, list[dict]], dict[str, set[str]], dict]:
    """Per config group: every option's tree (and the experiments' subtrees of that group); per group:
    its options; and the top-level config."""
    groups = [d.name for d in CONF.iterdir() if d.is_dir() and d.name != "hydra"]
    experiments = [_yaml(p) for p in (CONF / "experiment").glob("*.yaml")]
    # a group's option files and the files they include from its subfolders (prune/options/)
    trees = {g: [_yaml(p) for p in (CONF / g).rglob("*.yaml")] + [e.get(g, {}) for e in experiments] for g in groups}
    options = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in groups}
    return trees, options, _yaml(CONF / "train.yaml")


def config_tokens(text: str) -> list[str]:
    """Words inside inline code, and in code lines that run the train command: where keys and
    group=option choices are written."""
    spans = [s.strip("`") for s in INLINE_CODE.findall(FENCE.sub("", text))]
    lines = [line for block in FENCE.findall(text) for line in block.splitlines() if "prunelab.train" in line]
    return [w for chunk in spans + lines for w in chunk.split()]


def unknown_config(text: str) -> list[str]:
    trees, options, top = config_sources()
    bad = []
    for word in config_tokens(text):
        word = word.lstrip("+").rstrip(",.;:")
        m = re.fullmatch(r"([a-z_]+)((?:\.[a-z_0-9]+)*)(?:=(.*))?", word)
        if not m:
            continue
        group, path, value = m.group(1), m.group(2), m.group(3)
        if group in trees and path:  # group.key[.key]: the key exists in some option or experiment
            if not any(_has(t, path[1:].split(".")) for t in trees[group]):
                bad.append(word)
        elif group in trees and value and not re.fullmatch(r"[A-Z_]+|\$.*", value):  # group=option[,option]
            chosen = [v for v in re.split(r"[\[\],]", value) if v]
            if any(v not in options[group] and v != "null" for v in chosen):
                bad.append(word)
        elif path and group in top and not _has(top, (group + path).split(".")):
            bad.append(word)
    return bad


def unknown_imports(text: str) -> list[str]:
    """``from prunelab.X import a, b`` lines of the text whose module file or names do not exist."""
    bad = []
    for module, names in re.findall(r"^from (prunelab[\w.]*) import ([\w, ]+)$", text, re.M):
        base = ROOT / "src" / Path(*module.split("."))
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not source.is_file():
            bad.append(module)
            continue
        try:  # the names as Python finds them (a package may load them lazily)
            found = importlib.import_module(module)
        except ImportError:
            bad.append(module)
            continue
        bad += [f"{module}.{n}" for n in (x.strip() for x in names.split(",")) if n and not hasattr(found, n)]
    return bad


# ---------------------------------------------------------------- the checks can fail

def test_each_check_catches_what_it_is_for(tmp_path):
    assert dates("run on 2026-11-28 at noon") and not dates("a 20-26 range, 2.69x")
    assert hash_like("CI passed at aa93e36 in 772 s") == ["aa93e36"]
    assert hash_like("(commit 4e1019c).") == ["4e1019c"]
    assert not hash_like("https://github.com/o/r/commit/aa93e36 and vgg16-397923af.pth, 134301514, deadbeef")
    (tmp_path / "there.md").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md#part) [gone](nowhere.md) [web](https://example.org/x) [anchor](#top)\n"
                   "```\n[not a link](nowhere-either.md)\n```\n")
    assert broken_links(doc) == ["nowhere.md"]
    scripts = [tmp_path / "alpha.py", tmp_path / "beta.py", tmp_path / "run.sh"]
    assert missing_sections("## `alpha.py`: x\n## benchmarks.beta\nrun.sh is mentioned only here\n", scripts) == ["run.sh"]
    assert runs_make_test("```bash\nmake test    # the suite\n```") and not runs_make_test("make test-all\nrun `make test`")
    assert unknown_config("`search.tolerance=2` `data=imagefolder` `model.weights=null` `stages.prune`") == []
    assert unknown_config("`search.tolerence=2`") == ["search.tolerence=2"]
    assert unknown_config("`data=imagefolders`") == ["data=imagefolders"]
    assert unknown_imports("from prunelab.models import ImageClassifier\n") == []
    assert unknown_imports("from prunelab.models import ImageClassifyer\nfrom prunelab.nothing import x\n") == [
        "prunelab.models.ImageClassifyer", "prunelab.nothing"]


# ---------------------------------------------------------------- the documents

@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dates_or_commit_hashes(path):
    text = path.read_text()
    assert dates(text) == [], f"{path.name}: dates belong in benchmarks/results/*.md, not here"
    assert hash_like(text) == [], f"{path.name}: commit hashes belong in git log and result notes, not here"


def test_readme_is_short_and_runs_the_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert runs_make_test(README.read_text()), "README.md must show `make test`, the command CI runs"
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.M)


@pytest.mark.parametrize("path", [README, BENCH_README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_benchmark_has_a_section():
    scripts = benchmark_entry_points()
    assert {"compare.py", "results_table.py", "gpu_check.sh"} <= {p.name for p in scripts}
    assert missing_sections(BENCH_README.read_text(), scripts) == []


@pytest.mark.parametrize("path", [README, ROOT / "docs" / "configuration.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_and_options_exist(path):
    assert unknown_config(path.read_text()) == []


def test_readme_imports_exist():
    text = README.read_text()
    assert "from prunelab." in text
    assert unknown_imports(text) == []
