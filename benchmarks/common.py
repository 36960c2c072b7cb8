"""Where benchmark results go, shared by every benchmark: the repository's paths, a result's file
stem (date, what, where) and its atomic json + markdown write."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = "../shared/data/cifar10-subset"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "finetune"


def device_slug(device: torch.device, threads: int) -> str:
    """``cpu-2threads`` or the CUDA device's name, lower-case, non-alphanumerics as dashes."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{threads}threads"


def result_tag(what: str, device: str, quick: bool = False) -> str:
    """``<date>-<what>-<where>[-quick]``, the stem of a benchmark's result files: ``where`` is the
    GPU's name on CUDA (``nvidia-h200``), else the device type."""
    dev = torch.device(device)
    where = device_slug(dev, 0) if dev.type == "cuda" else dev.type
    return f"{_dt.date.today().isoformat()}-{what}-{where}{'-quick' if quick else ''}"


def write_result(out: str | Path, tag: str, res: dict, render: Callable[[dict], str]) -> str:
    """A benchmark's result as ``<out>/<tag>.json`` and ``.md`` (each written atomically), the
    markdown printed as well; returns the markdown."""
    from prunelab.io import write_json, write_text

    md = render(res)
    write_json(Path(out) / f"{tag}.json", res)
    write_text(Path(out) / f"{tag}.md", md)
    print(md)
    return md

