"""What a config value must be, written once per key: a ``Spec`` is (the words that finish
"KEY=VALUE must be ...", a test). Pure (OmegaConf, no torch).

The config check and each group's typed settings (``pruning.spec``, ``search.spec``,
``deploy.spec``) build their rules from these and report a bad value through ``check_rules``, so
every message has the same form: the key as typed, its value as typed, what it must be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from prunelab.errors import ConfigError

Spec = tuple[str, Callable[[Any], bool]]
Rules = Iterable[tuple[str, Spec]]
ABSENT = object()  # a key the config leaves out: skipped by the checks, defaulted by the builders


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Spec:
    words = "an integer" + (f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else "")
    return words, lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def number(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = True) -> Spec:
    if hi is None:
        words = f"a number {'>' if lo_open else '>='} {lo}"
    else:
        words = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def test(v) -> bool:
        if not is_number(v) or v < lo or (lo_open and v == lo):
            return False
        return hi is None or v < hi or (not hi_open and v == hi)

    return words, test


def choice(*options) -> Spec:
    return f"one of {', '.join(map(str, options))}", lambda v: isinstance(v, str | int) and v in options


def optional(spec: Spec) -> Spec:
    return f"null or {spec[0]}", lambda v: v is None or spec[1](v)


def either(*specs: Spec, words: str | None = None) -> Spec:
    return words or " or ".join(s[0] for s in specs), lambda v: any(s[1](v) for s in specs)


def list_of(spec: Spec, example: str) -> Spec:
    items = spec[0]
    for one, many in (("a number", "numbers"), ("an integer", "integers"), ("a pruning method", "pruning methods")):
        items = items.replace(one, many, 1)
    return (f"a non-empty list of {items}, like {example}",
            lambda v: isinstance(v, list) and len(v) > 0 and all(spec[1](x) for x in v))


BOOL: Spec = ("true or false", lambda v: isinstance(v, bool))
TEXT: Spec = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
BOOL_AUTO = either(BOOL, choice("auto"), words="true, false or auto")
FRACTION = number(0, 1)  # a pruning ratio: [0, 1)


def show(v) -> str:
    """A value as it would be typed on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(map(show, v)) + "]"
    return str(v)


def plain(cfg, key: str):
    """The resolved plain value of dotted ``key`` (lists as lists), or ``ABSENT``; a mandatory
    value left unset or an interpolation that cannot resolve is one line naming the key."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is not set; give it a value on the command line ({key}=...)") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key} cannot be resolved: {str(exc).splitlines()[0]}") from None
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def check_rules(cfg, rules: Rules, prefix: str = "") -> None:
    """Every ``(key, spec)`` of ``rules`` whose key is in ``cfg`` (under ``prefix``) holds, or one
    ConfigError: ``prefix.key=VALUE must be WORDS``."""
    for key, (words, test) in rules:
        name = f"{prefix}.{key}" if prefix else key
        value = plain(cfg, name)
        if value is not ABSENT and not test(value):
            raise ConfigError(f"{name}={show(value)} must be {words}")


def group_values(cfg, group: str, rules: Rules, defaults: dict[str, Any]) -> dict[str, Any]:
    """``group``'s values for the keys of ``rules``, checked, plain; a key the config leaves out
    takes its option file's default (``defaults``: an ``${a.b}`` there is read from ``cfg``), and
    is left out where it has none."""
    rules = list(rules)
    check_rules(cfg, rules, group)
    out = {}
    for key, _ in rules:
        value = plain(cfg, f"{group}.{key}")
        if value is ABSENT:
            if key not in defaults:
                continue
            value = defaults[key]
            if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
                value = plain(cfg, value[2:-1])
        out[key] = value
    return out
