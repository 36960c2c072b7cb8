"""ARCHITECTURE.md stays true to the code: every module under src/prunelab is listed once (and nothing
else), every import keeps to the layers it declares, the result readers import no stage, and the
pure modules import no Lightning."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import REPO

SRC = REPO / "src" / "prunelab"
DOC = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")


def modules() -> set[str]:
    return {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}


def block(name: str) -> list[str]:
    """The lines of the fenced block ```NAME in ARCHITECTURE.md."""
    m = re.search(rf"^```{name}\n(.*?)^```", DOC, re.S | re.M)
    assert m, f"ARCHITECTURE.md has no ```{name} block"
    return [line.split() for line in m.group(1).splitlines() if line.strip()]


def layers() -> dict[str, int]:
    """{file or folder/: layer}."""
    return {entry: int(words[0]) for words in block("layers") for entry in words[1:]}


def layer_of(module: str, table: dict[str, int]) -> int:
    """A file's own entry, else its deepest listed folder's."""
    if module in table:
        return table[module]
    folders = [f for f in table if f.endswith("/") and module.startswith(f)]
    assert folders, f"{module} has no layer in ARCHITECTURE.md"
    return table[max(folders, key=len)]


def _module_file(dotted: str) -> str | None:
    """``prunelab.a.b`` as a file under src/prunelab (a package as its __init__.py), or None."""
    parts = dotted.split(".")[1:]
    for candidate in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
        if (SRC / candidate).is_file():
            return candidate
    return None


def imports(module: str) -> set[str]:
    """The prunelab files ``module`` imports, inside functions too, ``if TYPE_CHECKING:`` aside."""
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prunelab":
            names = [f"{node.module}.{a.name}" if _module_file(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "prunelab"]
        found |= {f for f in map(_module_file, names) if f and f != module}
    return found


def test_every_module_is_listed_once_and_every_listed_one_exists():
    listed = re.findall(r"^\| `([\w/]+\.py)` \|", DOC, re.M)
    repeated = sorted({m for m in listed if listed.count(m) > 1})
    assert not repeated, f"listed more than once in ARCHITECTURE.md: {repeated}"
    assert not modules() - set(listed), f"not in ARCHITECTURE.md's module table: {sorted(modules() - set(listed))}"
    assert not set(listed) - modules(), f"listed in ARCHITECTURE.md but absent: {sorted(set(listed) - modules())}"


def test_every_import_keeps_to_the_declared_layers():
    table = layers()
    for entry in table:
        assert (SRC / entry).exists(), f"the layers name {entry}, which does not exist"
    upward = [f"{m} (layer {layer_of(m, table)}) imports {d} (layer {layer_of(d, table)})"
              for m in sorted(modules()) for d in sorted(imports(m)) if layer_of(d, table) > layer_of(m, table)]
    assert not upward, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_result_readers_import_no_stage():
    table = layers()
    readers = [e for words in block("result-readers") for e in words]
    ours = [m for m in modules() if any(m == r or (r.endswith("/") and m.startswith(r)) for r in readers)]
    assert ours
    bad = [f"{m} imports {d}" for m in sorted(ours) for d in sorted(imports(m))
           if layer_of(d, table) > 1 and not any(d == r or (r.endswith("/") and d.startswith(r)) for r in readers)]
    assert not bad, bad


def test_the_import_reader_sees_imports_in_functions_and_packages():
    """What the layer check stands on: a function-level import (train.py imports the pipeline inside
    a function) and ``from package import module`` both count; TYPE_CHECKING imports do not."""
    assert "pipeline.py" in imports("train.py")
    assert "pruning/registry.py" in imports("search/spec.py")
    assert "deploy/spec.py" not in imports("deploy/registry.py")


def test_pure_modules_import_no_lightning():
    names = ["prunelab." + m.removesuffix(".py").replace("/", ".") for words in block("pure") for m in words]
    assert all(_module_file(n) for n in names), names
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'lightning_fabric')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "[]", f"a pure module pulled in Lightning: {out.stdout.strip()}"
