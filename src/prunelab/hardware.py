"""The one place where every ``auto`` precision/dtype/fast-path choice is resolved from the hardware.

bf16 is only fast where the hardware computes it natively: CUDA sm80+ (Ampere and newer) and CPUs
with AVX512_BF16 or AMX-BF16. Elsewhere it is emulated; on an AVX2-only AMD EPYC, VGG16 under
bf16 autocast ran 21x slower than fp32. So ``auto`` asks the machine, and explicit choices are
honoured but warned about when they will be slow. Everything here is pure except ``detect``,
so tests fake a ``Hardware`` instead of needing the machine. Lightning is not imported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import ConfigError

# CPU flags that decide anything here, named as in /proc/cpuinfo.
RELEVANT_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16"})
# amx_tile alone (AMX-INT8 only) has no bf16 tiles, so only these two mean native bf16.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# Lightning 2.x's accepted strings (lightning.fabric.connector._PRECISION_INPUT_STR and
# _PRECISION_INPUT_STR_ALIAS), hard-coded so this module does not import Lightning;
# tests/test_hardware.py checks the list against the installed Lightning.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
              "bf16-true", "bf16-mixed", "32-true", "64-true")
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ChoiceError(ConfigError, ValueError):
    """An unknown value for a hardware-dependent key (a ValueError and a one-line ConfigError)."""


@dataclass(frozen=True)
class Hardware:
    kind: str  # torch device type: "cpu", "cuda", ...
    name: str  # CPU model name or GPU name
    cpu_capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # subset of RELEVANT_FLAGS
    cuda_capability: tuple[int, int] | None = None

    @property
    def native_bf16(self) -> bool:
        if self.kind == "cuda":
            return self.cuda_capability is not None and self.cuda_capability >= (8, 0)
        # oneDNN picks its own kernels from the CPU flags, whatever ATen's capability is capped to.
        return self.kind == "cpu" and bool(self.cpu_flags & BF16_FLAGS)

    @property
    def wide_simd(self) -> bool:
        """AVX512 or AMX: oneDNN's blocked/NHWC convolutions pay off; AVX2-only they mostly do not."""
        return self.cpu_capability == "AVX512" or bool(self.cpu_flags & {"avx512f", "amx_tile"})

    def describe(self) -> str:
        if self.kind == "cuda":
            major, minor = self.cuda_capability or (0, 0)
            return f"CUDA device {self.name} (sm{major}{minor})"
        if self.kind == "cpu":
            have = sorted(self.cpu_flags & BF16_FLAGS)
            bf16 = "/".join(have) if have else "no avx512_bf16/amx_bf16"
            return f"CPU capability {self.cpu_capability} ({bf16})"
        return f"{self.kind} device {self.name}"

    def to_dict(self) -> dict[str, Any]:
        cc = self.cuda_capability
        return {"kind": self.kind, "name": self.name, "cpu_capability": self.cpu_capability,
                "cpu_flags": sorted(self.cpu_flags), "cuda_capability": f"{cc[0]}.{cc[1]}" if cc else None,
                "native_bf16": self.native_bf16}


@dataclass(frozen=True)
class Resolution:
    value: Any  # what to use: a Lightning precision string, a torch.dtype or a bool
    reason: str  # one sentence for logs and reports
    warning: str | None = None  # one line when an explicit choice will be slow or badly supported
    ran: Any = None  # what actually runs, where a library substitutes another value for ``value``


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, relevant flags) from /proc/cpuinfo, else from torch's cpuinfo (e.g. macOS)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    name, flags = "", set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name" and not name:
            name = val.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(val.split())
    if not text:
        try:  # private but shipped torch API: the cpuinfo library's view, flags spelled avx512_f
            info = torch._C._cpu._get_cpu_capability()
            name = str(info.get("cpu_name", ""))
            flags = {"avx512f" if k == "avx512_f" else k for k, v in info.items() if v is True}
        except Exception:
            pass
    return name or "unknown CPU", frozenset(flags) & RELEVANT_FLAGS


@functools.cache
def _detect(key: str) -> Hardware:
    dev = torch.device(key)
    name, flags = _cpuinfo()
    cap = torch.backends.cpu.get_cpu_capability()
    if dev.type == "cuda":
        return Hardware("cuda", torch.cuda.get_device_name(dev), cap, flags, tuple(torch.cuda.get_device_capability(dev)))
    return Hardware(dev.type, name if dev.type == "cpu" else dev.type, cap, flags)


def detect(device: str | torch.device = "cpu") -> Hardware:
    """What ``device`` really has, cached per device since it is called often."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r} was asked for, but this machine has no usable CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return _detect(str(dev))


def _auto(hw: Hardware) -> tuple[str, str]:
    """('bf16'|'fp16'|'fp32', why) for an ``auto`` choice."""
    if hw.native_bf16:
        return "bf16", f"{hw.describe()} has native bf16"
    if hw.kind == "cuda":
        return "fp16", f"{hw.describe()} is older than sm80, so bf16 is not native but fp16 is"
    if hw.kind == "cpu":
        return "fp32", f"{hw.describe()} has no native bf16, bf16 would be emulated"
    return "fp32", f"{hw.describe()} has no known fast reduced precision"


def _slow_warning(key: str, value: str, kind: str, hw: Hardware) -> str | None:
    if kind == "bf16" and hw.kind in ("cpu", "cuda") and not hw.native_bf16:
        return f"{key}={value} on {hw.describe()}: bf16 is emulated there and can be many times slower than fp32"
    if kind == "fp16" and hw.kind == "cpu":
        return f"{key}={value} on CPU: fp16 is poorly supported there (slow, some ops missing); prefer fp32"
    return None


def resolve_precision(requested: str | int, hw: Hardware) -> Resolution:
    """A Lightning ``trainer.precision`` string for ``requested`` ("auto" or any Lightning value)."""
    req = str(requested).strip().lower()
    if req == "auto":
        kind, why = _auto(hw)
        value = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[kind]
        return Resolution(value, f"auto: {why}; using {value}")
    value = PRECISION_ALIASES.get(req, req)
    if value not in PRECISIONS:
        allowed = ", ".join(("auto", *PRECISIONS, *PRECISION_ALIASES))
        raise ChoiceError(f"trainer.precision={requested!r} is not one of: {allowed}")
    kind = "bf16" if value.startswith("bf16") else "fp16" if value.startswith("16") else "other"
    warning = _slow_warning("trainer.precision", value, kind, hw)
    if value.startswith("transformer-engine") and hw.kind != "cuda":
        warning = f"trainer.precision={value} needs a CUDA GPU with Transformer Engine; {hw.describe()} has none"
    if value == "16-mixed" and hw.kind == "cpu":
        # Lightning has no fp16 AMP on a CPU and trains in bf16-mixed instead; the value itself is
        # kept (it names the training, and so the fine-tune cache entry) but the report says what ran.
        ran = "bf16-mixed"
        return Resolution(value, f"explicit trainer.precision={value} on {hw.describe()}: Lightning has no fp16 AMP on "
                                 f"a CPU, so training ran {ran} (evaluation float32)",
                          f"trainer.precision={value} on CPU runs {ran} (Lightning's substitute for fp16 AMP there); "
                          f"set trainer.precision={ran} or 32-true to ask for what runs", ran)
    return Resolution(value, f"explicit trainer.precision={value} honoured on {hw.describe()}", warning)


def resolve_dtype(requested: str | torch.dtype, hw: Hardware) -> Resolution:
    """A torch dtype for the deploy runtime's ``latency.dtype``."""
    req = str(requested).removeprefix("torch.").strip().lower()
    if req == "auto":
        kind, why = _auto(hw)
        value = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
        return Resolution(value, f"auto: {why}; using {value}")
    if req not in DTYPES:
        raise ChoiceError(f"latency.dtype={requested!r} is not one of: auto, {', '.join(DTYPES)}")
    value = DTYPES[req]
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(value, "other")
    warning = _slow_warning("latency.dtype", req, kind, hw)
    return Resolution(value, f"explicit latency.dtype={req} honoured on {hw.describe()}", warning)


def _bool_auto(requested: bool | str, key: str) -> bool | None:
    """True/False for an explicit value, None for "auto"; Hydra may pass bools or strings."""
    if isinstance(requested, bool):
        return requested
    req = str(requested).strip().lower()
    choices = {"auto": None, "true": True, "false": False}
    if req not in choices:
        raise ChoiceError(f"{key}={requested!r} is not one of: auto, true, false")
    return choices[req]


def resolve_channels_last(requested: bool | str, hw: Hardware) -> Resolution:
    """``model.channels_last``: auto is on for CUDA and AVX512/AMX CPUs, off on AVX2-only CPUs."""
    explicit = _bool_auto(requested, "model.channels_last")
    if explicit is not None:
        return Resolution(explicit, f"explicit model.channels_last={explicit} honoured")
    value = hw.kind == "cuda" or (hw.kind == "cpu" and hw.wide_simd)
    why = "NHWC convolutions are faster there" if value else "NHWC brings no reliable gain there"
    return Resolution(value, f"auto: {hw.describe()}: {why}; channels_last={value}")


def resolve_deploy_layout(requested: bool | str, hw: Hardware) -> Resolution:
    """``latency.channels_last``, the deploy runtime's layout: auto is on for CUDA and for CPUs with
    AVX2 or wider. Inference differs from training here: oneDNN's NHWC forward convolutions beat
    NCHW even on an AVX2-only EPYC (VGG16 deploy form: 1.48x at batch 128, 0.97x at batch 1, where
    little is left to gain), while its NHWC backward lost (fine-tuning 0.85x), which is why
    ``model.channels_last`` stays off there."""
    explicit = _bool_auto(requested, "latency.channels_last")
    if explicit is not None:
        return Resolution(explicit, f"explicit latency.channels_last={explicit} honoured")
    value = hw.kind == "cuda" or (hw.kind == "cpu" and (hw.wide_simd or hw.cpu_capability == "AVX2"))
    why = ("NHWC inference convolutions are faster there" if value
           else "no vector unit known to run NHWC inference faster")
    return Resolution(value, f"auto: {hw.describe()}: {why}; deploy channels_last={value}")


def resolve_fuse(requested: bool | str, hw: Hardware, compile: bool = False, runtime: str = "deploy") -> Resolution:
    """``latency.fuse``: each Conv2d+ReLU as one cuDNN call in the deploy form. auto is on for CUDA
    unless ``latency.compile`` (whose compiler does its own fusing); an H100 ran VGG16's bf16 graph
    1.41x faster fused at batch 128 (2026-11-27). true off CUDA is refused: cuDNN is CUDA's. The
    eager runtime times the model as trained: nothing is fused there, and true says so."""
    explicit = _bool_auto(requested, "latency.fuse")
    if runtime == "eager":
        warning = "latency.fuse=true has no effect with latency.runtime=eager (the model runs as trained)"
        return Resolution(False, "latency.runtime=eager runs the model as trained; fuse=False",
                          warning if explicit else None)
    if explicit and hw.kind != "cuda":
        raise ConfigError(f"latency.fuse=true fuses Conv2d+ReLU in cuDNN, which needs a CUDA device (this run is on "
                          f"{hw.kind}): use latency.fuse=auto or latency.fuse=false")
    if explicit and compile:
        raise ConfigError("latency.fuse=true and latency.compile=true: the compiler fuses on its own and does not "
                          "trace the fused cuDNN call; use latency.fuse=auto with latency.compile=true")
    if explicit is not None:
        return Resolution(explicit, f"explicit latency.fuse={explicit} honoured")
    value = hw.kind == "cuda" and not compile
    why = ("cuDNN applies the ReLU as the convolution writes its output" if value
           else "latency.compile fuses on its own" if hw.kind == "cuda" else "the fused call is cuDNN's (CUDA only)")
    return Resolution(value, f"auto: {hw.describe()}: {why}; fuse={value}")


# torch.compile's modes (model.compile_mode); the graph modes record CUDA graphs of each step on CUDA
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def resolve_compile(requested: bool | str, hw: Hardware) -> Resolution:
    """``model.compile``: auto is on for CUDA only. On a CPU a compiled VGG16 training step measured
    no faster than eager, before its compile time (``benchmarks/recipe_cost``, compiled variant)."""
    explicit = _bool_auto(requested, "model.compile")
    if explicit is not None:
        return Resolution(explicit, f"explicit model.compile={explicit} honoured")
    value = hw.kind == "cuda"
    why = "compiled kernels repay the compile time" if value else "compiled CPU training steps are no faster than eager"
    return Resolution(value, f"auto: {hw.describe()}: {why}; compile={value}")
