"""Make DIR a site directory holding only torch, torchvision and what they require (as links into
this interpreter's site-packages), for a fresh virtual environment to see through a .pth file.

The bare-install check then reuses the machine's torch (copying it costs minutes) while every
other package, prunelab's own dependencies included, must come from installing the wheel: the
ONNX extra and everything else the dev install added stay invisible.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("torch", "torchvision")


def closure(names):
    """Installed distributions that ``names`` require, following only the extras they ask for."""
    seen, todo = {}, [(n, frozenset()) for n in names]
    while todo:
        req, _ = todo.pop()
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].strip()
        wanted = re.search(r"\[([^\]]*)\]", req.split(";")[0])
        extras = {e.strip() for e in wanted.group(1).split(",")} if wanted else set()
        key = name.lower().replace("_", "-")
        if not key or key in seen and extras <= seen[key][1]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        extras |= seen[key][1] if key in seen else set()
        seen[key] = (dist, extras)
        for r in dist.requires or []:
            marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", r)
            if marker is None or marker.group(1) in extras:
                todo.append((r, frozenset()))
    return [d for d, _ in seen.values()]


def main(target: str) -> None:
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    for dist in closure(ROOTS):
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = base / top, out / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
    print(f"torch-only site: {len(list(out.iterdir()))} entries in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
