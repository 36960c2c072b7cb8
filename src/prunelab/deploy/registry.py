"""The latency runtimes: one module each in this package, one line each in ``RUNTIMES``.

A runtime turns a trained (possibly pruned) network into the form it is served in and timed in
(``build``), says whether it can run here (``missing``: an absent optional package; ``unusable``:
the device), writes what it serves in its own file format (``save``) and shows the few lines that
load and run that file (``load_snippet``). This module imports nothing heavy, so the config check
and ``--help`` can read the names.

Adding a runtime: write ``deploy/<name>.py`` with a :class:`Runtime` subclass named ``RUNTIME``,
and add one line to ``RUNTIMES`` below (or call :func:`register` from your own code).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from prunelab.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.deploy.spec import DeploySpec
    from prunelab.hardware import Hardware

# name -> module holding ``RUNTIME``. The order is the order ``auto`` lists them in.
RUNTIMES: dict[str, str] = {
    "eager": "prunelab.deploy.eager",
    "deploy": "prunelab.deploy.native",
    "onnxruntime": "prunelab.deploy.onnxrt",
    "openvino": "prunelab.deploy.openvino",
    "inductor": "prunelab.deploy.inductor",
}
AUTO = "auto"


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        return False


class Runtime:
    """What every runtime provides; subclasses override ``build`` and, where they have them,
    ``packages``/``extra`` (optional imports) and ``save``/``load_snippet`` (a file format)."""

    name = "runtime"
    packages: tuple[str, ...] = ()  # import names this runtime needs beyond the bare install
    extra: str | None = None  # the pip extra that installs them
    file_suffix: str | None = None  # its own file format, if it has one
    cpu_only = False  # served on the CPU alone (the ONNX-based runtimes as prunelab builds them)

    def missing(self) -> str | None:
        """One line naming the extra to install when a package is absent, else None."""
        absent = [p for p in self.packages if not _installed(p)]
        if not absent:
            return None
        return (f"latency.runtime={self.name} needs the {self.extra} extra ({', '.join(absent)} missing): "
                f"pip install prunelab[{self.extra}]")

    def unusable(self, hw: Hardware) -> str | None:
        """Why this runtime cannot run on ``hw`` (installed or not), else None."""
        if self.cpu_only and hw.kind != "cpu":
            return f"latency.runtime={self.name} runs on the CPU here, not on {hw.kind}"
        return None

    def build(self, net: nn.Module, spec: DeploySpec, *, device: torch.device, example_batch: torch.Tensor,
              two_four: bool = False, channels_last: bool | None = None) -> nn.Module:
        """The served form of ``net`` (a new module; ``net`` is left as it was)."""
        raise NotImplementedError

    def save(self, form, stem: Path) -> Path | None:
        """Write ``form`` in this runtime's own format at ``stem`` + suffix; None: it has none."""
        return None

    def load_snippet(self, path: Path, spec: DeploySpec) -> str | None:
        """The few lines of Python that load ``path`` and run it."""
        return None


_loaded: dict[str, Runtime] = {}


def register(name: str, runtime: str | Runtime) -> None:
    """Add a runtime from your own code: a module holding a ``RUNTIME`` instance, or the instance."""
    if isinstance(runtime, str):
        RUNTIMES[name] = runtime
        _loaded.pop(name, None)
    else:
        RUNTIMES[name] = type(runtime).__module__
        _loaded[name] = runtime


def names() -> tuple[str, ...]:
    return tuple(RUNTIMES)


def get(name: str) -> Runtime:
    """The runtime called ``name``; ConfigError for an unknown one."""
    if name not in RUNTIMES:
        raise ConfigError(f"latency.runtime={name!r} is not one of: {AUTO}, {', '.join(RUNTIMES)}")
    if name not in _loaded:
        runtime = importlib.import_module(RUNTIMES[name]).RUNTIME
        if runtime.name != name:
            raise ValueError(f"{RUNTIMES[name]}.RUNTIME is named {runtime.name!r}, registered as {name!r}")
        _loaded[name] = runtime
    return _loaded[name]


def require(name: str, hw: Hardware) -> Runtime:
    """The runtime, ready to run here, or a one-line ConfigError (exit 2) saying what is missing."""
    runtime = get(name)
    why = runtime.missing() or runtime.unusable(hw)
    if why:
        raise ConfigError(why)
    return runtime


def usable(hw: Hardware, among=None) -> tuple[dict[str, Runtime], dict[str, str]]:
    """({name: runtime} that can run on ``hw``, {name: why not} for the others), in ``RUNTIMES``'
    order, among ``among`` (default: all)."""
    ok, skipped = {}, {}
    for name in RUNTIMES if among is None else among:
        runtime = get(name)
        why = runtime.missing() or runtime.unusable(hw)
        if why:
            skipped[name] = why
        else:
            ok[name] = runtime
    return ok, skipped
