"""Strict conversion between nested dataclasses and plain dicts / JSON, plus dotted overrides.

Every config in this project is a dataclass. The same object is read from JSON, overridden on the command
line (``key.sub=value``) and by Tune (a dict of dotted keys). Any unknown key or ill-typed value is a
``ConfigError`` naming the full dotted key, never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is wrong. The message names the dotted key and what is expected."""


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_describe(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}.{e}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain JSON-able dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_json(cls: type[T], path: str | Path) -> T:
    from .infra import storage

    try:
        data = json.loads(storage.read_text(path))  # a file, or an object-store URI (a sweep's best.json)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def overlay(obj: T, data: dict[str, Any], source: str) -> T:
    """``obj`` (a dataclass) with the settings of the (nested) mapping ``data`` laid over it: a section or key that
    ``data`` leaves out keeps ``obj``'s value (a config file without ``train`` keeps the preset's training, not the
    library's 200,000 steps). Unknown keys and wrong types are refused as ``from_dict`` refuses them, prefixed
    with ``source``."""
    def merge(base: dict, new: Any) -> Any:
        if not isinstance(new, dict) or not isinstance(base, dict):
            return new
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in new.items()}}

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
    try:
        return from_dict(type(obj), merge(to_dict(obj), data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(obj), indent=2, sort_keys=False) + "\n")


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as semantic_cfg.relative_position_bias_type=none


def apply_overrides(obj: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of ``obj`` with dotted overrides applied.

    ``overrides`` is either ``["train.lr=1e-4", "semantic_cfg.depth=4"]`` (values parsed as JSON, else taken as
    strings) or ``{"train.lr": 1e-4}`` (as Ray Tune produces). The result is re-validated as a whole.
    """
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key.sub=value")
            key, text = item.split("=", 1)
            pairs.append((key.strip(), _parse_scalar(text.strip())))
    data = to_dict(obj)
    for key, value in pairs:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override {key!r}")
            node = node[part]
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node), n=1)
            hint = f" (did you mean '{'.'.join(parts[:-1] + [close[0]])}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        node[parts[-1]] = value
    return from_dict(type(obj), data)


def check(condition: bool, key: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError naming ``key``."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_finite(obj: Any) -> None:
    """Every number setting of dataclass ``obj`` (and every number in a list setting) must be finite: JSON's
    ``1e400`` is infinity, and an infinite or NaN setting passes every ``>`` or ``<`` check that follows. The first
    thing each config's ``__post_init__`` does; the ranges come after it."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}: {v!r} is not a finite number")


__all__ = ["ConfigError", "from_dict", "to_dict", "load_json", "save_json", "apply_overrides", "check",
           "check_finite", "overlay"]
