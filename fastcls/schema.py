"""Typed dataclass configs from YAML-like trees: the generic part of fastcls.config.

A field is declared with `knob(default, help, gt=/ge=/lt=/le=, ordered=, nonempty=)` (its
range and help text live in the field's metadata) and typed with bool/int/float/str,
`Literal[...]` (its valid names), Optional, tuple or list of those. `build` coerces a tree
by those types (YAML reads `5e-5` as a string; a bare `off` as false) and refuses unknown
keys with a close match; `check_fields` is the one pass that checks every field's choices
and range. Nothing here knows fastcls's keys: that is config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the key and what is valid."""


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, gt=None, ge=None,
         lt=None, le=None, ordered: bool | str = False, nonempty: bool = False) -> Any:
    """A schema field with its help text and range, checked by `check_fields`: bounds apply
    to the value, or to each element of a tuple/list; `ordered` (True: non-decreasing,
    "strict": increasing) to the elements' order; `nonempty` to a list."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "ordered": ordered,
            "nonempty": nonempty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str = "") -> Any:
    return field(default_factory=cls, metadata={"help": help})


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if origin is Literal:  # the base type here; membership in check_fields
        return coerce(value, type(args[0]), key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f == int(f):
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as false/true
            return "on" if value else "off"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not a user error


def build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"'{prefix}'" if prefix else "the top level"
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix + '.' if prefix else ''}{k}'.{hint} "
                          f"Valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else coerce(value, tp, key)
    return cls(**kwargs)


def choices(tp: Any) -> Optional[tuple]:
    """The valid values of a `Literal[...]` (or Optional[Literal]) field type, else None."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def range_text(meta: dict, pair: bool = False) -> str:
    """'> 0', 'in [0, 1]', or for an ordered pair '0 < min <= max <= 1'; '' when unbounded."""
    lo = (f"{meta['gt']:g}", "<") if meta.get("gt") is not None else \
        (f"{meta['ge']:g}", "<=") if meta.get("ge") is not None else None
    hi = (f"{meta['lt']:g}", "<") if meta.get("lt") is not None else \
        (f"{meta['le']:g}", "<=") if meta.get("le") is not None else None
    if pair:
        mid = "<" if meta.get("ordered") == "strict" else "<="
        return (f"{lo[0]} {lo[1]} " if lo else "") + f"min {mid} max" + (f" {hi[1]} {hi[0]}" if hi else "")
    if lo and hi:
        return f"in {'[' if lo[1] == '<=' else '('}{lo[0]}, {hi[0]}{']' if hi[1] == '<=' else ')'}"
    if lo:
        return f"{'>' if lo[1] == '<' else '>='} {lo[0]}"
    if hi:
        return f"{hi[1]} {hi[0]}"
    return ""


def _within(v: float, m: dict) -> bool:
    return not ((m["gt"] is not None and not v > m["gt"]) or (m["ge"] is not None and not v >= m["ge"])
                or (m["lt"] is not None and not v < m["lt"]) or (m["le"] is not None and not v <= m["le"]))


def check_fields(obj: Any, prefix: str = "") -> None:
    """The one generic pass: every field's choices (Literal) and range (knob metadata)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, key, m = getattr(obj, f.name), f"{prefix}{f.name}", f.metadata
        if dataclasses.is_dataclass(v):
            check_fields(v, key + ".")
            continue
        valid = choices(hints[f.name])
        if valid is not None and v not in valid:
            raise ConfigError(f"{key}: unknown name {v!r}; valid choices: {', '.join(map(str, valid))}")
        if v is None or "gt" not in m:
            continue
        if isinstance(v, (tuple, list)):
            pair = isinstance(v, tuple) and len(v) == 2 and bool(m["ordered"])
            if m["nonempty"] and not v:
                raise ConfigError(f"{key}: must be a non-empty list, each {range_text(m)}, got {v}")
            if pair:
                strict = m["ordered"] == "strict"
                if not (all(_within(x, m) for x in v) and (v[0] < v[1] or (not strict and v[0] == v[1]))):
                    raise ConfigError(f"{key}: must satisfy {range_text(m, pair=True)}, got {list(v)}")
                continue
            for i, x in enumerate(v):
                if not _within(x, m):
                    raise ConfigError(f"{key}[{i}]: must be {range_text(m)}, got {x}")
            if m["ordered"] and list(v) != sorted(v):
                raise ConfigError(f"{key}: must be increasing, got {list(v)}")
        elif not _within(v, m):
            raise ConfigError(f"{key}: must be {range_text(m)}, got {v}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value "
                          f"(e.g. optim.lr=0.2 or data.rrc.scale=[0.35,1.0])")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value
