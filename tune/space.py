"""Search spaces written as text, on the command line or in a small JSON file.

Each entry maps a dotted config key to a spec:
    loguniform:LOW:HIGH    uniform:LOW:HIGH    grid:V1,V2,...    choice:V1,V2,...    a plain value
e.g. ``{"train.lr": "grid:1e-4,3e-4,1e-3", "train.lr_warmup": "choice:0,100"}``. Grid values multiply the
number of trials (every combination, each ``num_samples`` times); the others are sampled.
"""
from __future__ import annotations

import json
from pathlib import Path

from musiclm.config import ConfigError

SHORTCUTS = {"lr": "train.lr", "warmup": "train.lr_warmup", "batch_size": "train.batch_size", "wd": "train.wd",
             "zero_stage": "train.zero_stage"}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_spec(key: str, spec):
    """A Tune search-space object for one key."""
    from ray import tune

    if not isinstance(spec, str) or ":" not in spec:
        return spec
    kind, _, rest = spec.partition(":")
    try:
        if kind in ("loguniform", "uniform"):
            low, high = (float(x) for x in rest.split(":"))
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError
            return tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)
        if kind in ("grid", "choice"):
            values = [_value(v) for v in rest.split(",") if v]
            if not values:
                raise ValueError
            return tune.grid_search(values) if kind == "grid" else tune.choice(values)
    except ValueError:
        pass
    raise ConfigError(f"search space {key}: {spec!r} is not loguniform:LOW:HIGH, uniform:LOW:HIGH (LOW < HIGH), "
                      f"grid:V1,V2,... or choice:V1,V2,...")


def build_space(entries: dict) -> dict:
    """``{dotted key: spec}`` → Tune param_space (flat dict of dotted keys, as ``apply_overrides`` takes)."""
    return {key: parse_spec(key, spec) for key, spec in entries.items()}


def read_space_file(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"search space file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"search space file {path}: expected an object of dotted key -> spec")
    return data
