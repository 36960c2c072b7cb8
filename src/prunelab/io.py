"""Atomic writes (a killed run never leaves a truncated result file behind), safe loading (every
unreadable or mismatched weights file is one ``WeightsFileError`` in words), and
the bytes a state_dict takes on disk, as saved and packed for unstructured sparsity.

Every result goes to a temporary file in the destination's folder and is renamed over the
destination only once complete; ``os.replace`` is atomic on POSIX within one file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunelab.errors import WeightsFileError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | os.PathLike, write: Callable[[Path], None], tmp: Path | None = None) -> Path:
    """Write ``path`` through ``write(tmp)`` then one rename; ``tmp`` (default: a fresh name beside
    ``path``) lets a caller name the temporary file so a later run can find and remove leftovers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
        tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short sha256 of a state_dict's names, dtypes, shapes and bytes: what ties a cached result
    (a search journal, a fine-tune) to the exact weights that made it, not to a count or a config."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_state_dict(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """Save tensors only (no pickled code), contiguous and on the CPU."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return _atomic(path, lambda p: torch.save(clean, p))


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Put the file ``src`` at ``dst`` stored once: a hard link where the file system allows one
    (same bytes, no second copy on disk; deleting either name leaves the other whole), else a copy.
    Atomic either way (a temporary name beside ``dst``, then one rename). Returns "link" or "copy".

    Both names are one file, so ``src`` is made read-only first (where its owner may): a write
    into either name would change the other. Every prunelab writer replaces files by rename,
    which makes a new file and leaves a linked one as it was."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with contextlib.suppress(OSError):
            os.chmod(src, 0o444 & ~_UMASK)
        os.link(src, tmp)
        how = "link"
    except OSError:  # another file system, no hard links here, or not allowed (protected_hardlinks)
        tmp.unlink(missing_ok=True)
        _atomic(dst, lambda p: shutil.copyfile(src, p))
        return "copy"
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how


def file_problem(path: str | os.PathLike, inside: tuple[str, ...] = ("models/dense.pt", "dense.pt")) -> str | None:
    """Why ``path`` cannot be read as a file, in words that follow the path; None if it can.
    ``inside``: files a user may have meant when giving their folder."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # exists() follows links: a dangling one reads as missing
            return f"is a link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    if path.is_dir():
        found = next((path / name for name in inside if (path / name).is_file()), None)
        return "is a directory, not a file" + (f"; did you mean {found}?" if found else "")
    if not path.is_file():
        return "is not a regular file"
    if path.stat().st_size == 0:
        return "is empty (0 bytes): it was never completely written"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _not_a_state_dict(obj: Any) -> str | None:
    if isinstance(obj, dict) and "state_dict" in obj and ("pytorch-lightning_version" in obj or "epoch" in obj):
        return ("is a Lightning checkpoint, not a state_dict: resume from it with ckpt_path=..., "
                "or give a run's models/dense.pt")
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not a state_dict (a dict of parameter name -> tensor)"
    if not obj:
        return "holds an empty dict, not a state_dict"
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        return (f"holds a dict whose entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor: "
                "not a state_dict")
    return None


def _load_failure(exc: Exception, is_zip: bool) -> str:
    """What a failed ``torch.load`` means, without torch's advice: for a refused pickle it suggests
    ``weights_only=False``, i.e. running whatever code the file carries. Never pass that on."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        what = text.split("Unsupported global:", 1)[1].split()[1] if "GLOBAL" in text else "Python object"
        return (f"holds a pickled {what}, which prunelab refuses to load (unpickling it could run code); "
                "give a plain state_dict such as a run's models/dense.pt")
    if not is_zip:  # neither torch.save's zip format nor, as it turned out, its legacy one
        return "is not a PyTorch weights file (truncated, or not written by torch.save)"
    first = " ".join(text.split(". ")[0].split())[:160]
    return f"is a damaged PyTorch weights file ({type(exc).__name__}: {first})"


def shape_mismatch(expected: Mapping[str, Any], state: Mapping[str, torch.Tensor], limit: int = 3) -> str | None:
    """Missing keys, unexpected keys and mismatched shapes of ``state`` against ``expected``
    (name -> shape), the first ``limit`` of each with counts; None when they fit."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k])]
    parts = []
    for label, items in (("missing key", missing), ("unexpected key", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f", ... {len(items) - limit} more" if len(items) > limit else ""
            plural = "es" if label.endswith("h") else "s"
            parts.append(f"{len(items)} {label}{plural if len(items) > 1 else ''} ({', '.join(items[:limit])}{more})")
    return "; ".join(parts) or None


def load_state_dict(path: str | os.PathLike, expected: Mapping[str, Any] | None = None,
                    mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict saved by ``torch.save``, loaded on the CPU with ``weights_only`` (no pickled code
    runs). ``expected`` (name -> shape): the keys and shapes it must have. ``mmap``: map the file
    instead of reading it (a cheap check of a large file). Any problem raises ``WeightsFileError``."""
    path = Path(path).expanduser()
    problem = file_problem(path)
    if problem:
        raise WeightsFileError(path, problem)
    is_zip = zipfile.is_zipfile(path)
    try:  # mmap needs torch.save's zip format; the legacy format is read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as exc:  # foreign bytes make torch.load raise nearly anything
        raise WeightsFileError(path, _load_failure(exc, is_zip)) from None
    problem = _not_a_state_dict(state)
    if problem:
        raise WeightsFileError(path, problem)
    if expected is not None and (problem := shape_mismatch(expected, state)):
        raise WeightsFileError(path, problem, mismatch=True)
    return state


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- bytes on disk: as saved, and packed for unstructured sparsity ---------------------------------


class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts, so measuring a 500 MB state_dict allocates nothing."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.count += n
        return n


def file_bytes(obj) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (a state_dict, or anything it can save)."""
    sink = _ByteCounter()
    torch.save(obj, sink)
    return sink.count


def pack_sparse(state_dict: dict[str, torch.Tensor]) -> dict:
    """Each floating tensor as (shape, packed nonzero bitmask, nonzero values) when that is smaller.

    A bitmask costs 1 bit per entry, so a tensor is packed once more than ~1/32 of its float32
    entries are zero; denser tensors and integer buffers are kept as they are.
    """
    dense, sparse = {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or t.numel() == 0:
            dense[name] = t
            continue
        nz = t.reshape(-1) != 0
        values = t.reshape(-1)[nz]
        bits = torch.from_numpy(np.packbits(nz.numpy()))
        if bits.numel() + values.numel() * values.element_size() < t.numel() * t.element_size():
            sparse[name] = (list(t.shape), bits, values.clone())
        else:
            dense[name] = t
    return {"order": list(state_dict), "dense": dense, "sparse": sparse}


def unpack_sparse(packed: dict) -> dict[str, torch.Tensor]:
    """The state_dict that ``pack_sparse`` packed, bit for bit."""
    out = {}
    for name in packed["order"]:
        if name in packed["dense"]:
            out[name] = packed["dense"][name]
            continue
        shape, bits, values = packed["sparse"][name]
        numel = int(np.prod(shape)) if shape else 1
        nz = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[nz] = values
        out[name] = flat.reshape(shape)
    return out


def compressed_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes ``torch.save`` writes for the sparse-packed state_dict (see ``pack_sparse``)."""
    return file_bytes(pack_sparse(state_dict))
