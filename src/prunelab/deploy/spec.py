"""The one resolved deploy spec: ``latency.*`` with every ``auto`` decided for this hardware.

``resolve_spec`` is the only place the ``latency`` group is read and its hardware-dependent
``auto`` values resolved (by ``prunelab.hardware``'s pure rules); every runtime, the timing and the
report read the frozen :class:`DeploySpec` it returns. The group's checks are here too (``rules``,
``check``: the config check calls it before any work), beside the keys they check. Keys a partial config leaves out take the
values of ``conf/latency/default.yaml`` (read from the package, so there is no second copy of the
defaults). ``latency.runtime=auto`` stays ``auto`` here: which runtime is fastest is measured, not
a hardware rule, and :func:`prunelab.deploy.auto.pick` returns the spec with the winner in it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import torch

from prunelab import hardware
from prunelab.deploy import registry
from prunelab.errors import ConfigError
from prunelab.hardware import Hardware
from prunelab.value_specs import BOOL, BOOL_AUTO, Spec, check_rules, choice, integer, list_of

GROUP = "latency"
_KERNELS_GONE = ("is no longer a setting: prunelab's own float32 kernels were removed because library runtimes "
                 "serve faster; use latency.runtime=auto (or openvino/inductor)")
# Keys the group once had: setting one is refused with what to use instead.
RETIRED = {"onnx": "latency.onnx is no longer a setting: time in ONNX Runtime with latency.runtime=onnxruntime "
                   "(and write the ONNX files with python -m prunelab.export RUN_DIR)",
           "winograd": f"latency.winograd {_KERNELS_GONE}",
           "pack": f"latency.pack {_KERNELS_GONE}"}


def rules() -> list[tuple[str, Spec]]:
    """The group's keys and what each must be (built per call: runtimes registered at run time count)."""
    runtimes = registry.names()
    return [
        *((k, BOOL) for k in ("include_transfer", "compile", "cuda_graph")),
        *((k, BOOL_AUTO) for k in ("channels_last", "fuse")),
        ("batch_size", integer(1)),
        ("batch_sizes", list_of(integer(1), "latency.batch_sizes=[1,32]")),
        ("warmup", integer(0)),
        ("iters", integer(1)),
        ("agreement_images", integer(0)),
        ("runtime", choice(registry.AUTO, *runtimes)),
        ("auto_runtimes", list_of(choice(*runtimes), "latency.auto_runtimes=[deploy,openvino]")),
        ("auto_iters", integer(1)),
        ("dtype", choice("auto", *hardware.DTYPES)),
    ]


def check_retired(cfg) -> None:
    """A retired ``latency`` key in the composed config ``cfg`` is one ConfigError saying what to use."""
    node = cfg.get(GROUP) if hasattr(cfg, "get") else None
    for key, message in RETIRED.items():
        if node is not None and key in node:
            raise ConfigError(message)


def retired_override(override: str) -> str | None:
    """The advice for a command-line override of a retired key (``latency.onnx=true``, with or
    without ``+``/``++``/``~``), else None: Hydra would refuse it before any check could run."""
    key = override.lstrip("+~").split("=", 1)[0]
    group, _, name = key.partition(".")
    return RETIRED.get(name) if group == GROUP else None


def check(cfg) -> None:
    """Every ``latency.*`` value the composed config ``cfg`` holds is valid (a retired key is
    refused), or one ConfigError naming the key."""
    check_retired(cfg)
    check_rules(cfg, rules(), GROUP)


@functools.cache
def yaml_defaults() -> dict[str, Any]:
    """``conf/latency/default.yaml`` as a dict: the values of keys a partial config leaves out."""
    import yaml

    return yaml.safe_load(files("prunelab").joinpath("conf/latency/default.yaml").read_text())


@dataclass(frozen=True)
class DeploySpec:
    """How models are served and timed, every value concrete except ``runtime="auto"`` before the pick."""

    runtime: str  # a name in registry.RUNTIMES, or "auto" until auto.pick has chosen
    auto_runtimes: tuple[str, ...]  # what auto chooses among (those installed and usable here)
    dtype: torch.dtype  # the reduced-precision runtimes' dtype (deploy, openvino, inductor)
    channels_last: bool  # the deploy layout (eager keeps the training layout unless told)
    batch_size: int
    batch_sizes: tuple[int, ...]
    warmup: int
    iters: int
    auto_iters: int
    agreement_images: int
    include_transfer: bool
    cuda_graph: bool
    compile: bool
    fuse: bool
    hardware: Hardware
    precision: str | None = None  # the trainer's (Lightning) precision, for the eager runtime's autocast
    reasons: Mapping[str, str] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)  # explicit choices that will be slow here

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def with_runtime(self, name: str) -> DeploySpec:
        """This spec with ``runtime`` set to ``name`` (what auto chose), checked to be usable here."""
        registry.require(name, self.hardware)
        return dataclasses.replace(self, runtime=name)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(dtype=self.dtype_name, hardware=self.hardware.to_dict(), batch_sizes=list(self.batch_sizes),
                 auto_runtimes=list(self.auto_runtimes), reasons=dict(self.reasons),
                 warnings=list(self.warnings))
        return d


def _get(cfg, key: str):
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return yaml_defaults()[key] if value is None and key in yaml_defaults() else value


def resolve_spec(latency_cfg, hw: Hardware, precision: str | None = None) -> tuple[DeploySpec, dict]:
    """(the spec, {key: {"requested", "value", "reason"[, "warning"]}} for the keys resolved here).

    Raises ConfigError for an unknown runtime, or one asked for by name whose extra is missing."""
    runtime = str(_get(latency_cfg, "runtime"))
    if runtime != registry.AUTO:
        registry.require(runtime, hw)  # one line naming the extra, before any work
    auto_runtimes = tuple(str(r) for r in (_get(latency_cfg, "auto_runtimes") or registry.names()))
    for name in auto_runtimes:
        registry.get(name)  # an unknown name fails here, not mid-run
    compile_ = bool(_get(latency_cfg, "compile"))
    record: dict[str, dict] = {}

    def rule(key, fn, *args, **kw):
        requested = _get(latency_cfg, key)
        res = fn(requested, hw, *args, **kw)
        value = str(res.value).removeprefix("torch.") if isinstance(res.value, torch.dtype) else res.value
        record[key] = {"requested": requested, "value": value, "reason": res.reason}
        if res.warning:
            record[key]["warning"] = res.warning
        return res.value

    # fuse is the deploy runtime's; under auto it is what deploy would use.
    as_runtime = "deploy" if runtime == registry.AUTO else runtime
    dtype = rule("dtype", hardware.resolve_dtype)
    layout = rule("channels_last", hardware.resolve_deploy_layout)
    fuse = rule("fuse", hardware.resolve_fuse, compile=compile_, runtime=as_runtime)
    head = int(_get(latency_cfg, "batch_size"))
    sizes = tuple(sorted({int(b) for b in (_get(latency_cfg, "batch_sizes") or [])} | {head}))
    if head < 1:
        raise ConfigError(f"latency.batch_size={head} must be >= 1")
    spec = DeploySpec(
        runtime=runtime, auto_runtimes=auto_runtimes, dtype=dtype, channels_last=bool(layout), batch_size=head,
        batch_sizes=sizes, warmup=int(_get(latency_cfg, "warmup")), iters=int(_get(latency_cfg, "iters")),
        auto_iters=int(_get(latency_cfg, "auto_iters")), agreement_images=int(_get(latency_cfg, "agreement_images")),
        include_transfer=bool(_get(latency_cfg, "include_transfer")), cuda_graph=bool(_get(latency_cfg, "cuda_graph")),
        compile=compile_, fuse=bool(fuse), hardware=hw, precision=precision,
        reasons={k: r["reason"] for k, r in record.items()},
        warnings=tuple(r["warning"] for r in record.values() if r.get("warning")))
    return spec, record


def as_spec(latency_cfg, hw: Hardware, precision: str | None = None) -> DeploySpec:
    """``latency_cfg`` itself when it is a spec, else resolved (callers passing a plain config)."""
    if isinstance(latency_cfg, DeploySpec):
        return latency_cfg
    return resolve_spec(latency_cfg, hw, precision)[0]
