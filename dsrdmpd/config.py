"""YAML configuration with defaults and dotted command-line overrides.

A config is a nested dict. ``load_config(path, overrides)`` merges, in order: the
defaults below, the YAML file (and any file it names under ``base:``, relative to
itself), then ``key.sub=value`` overrides whose values are parsed as YAML scalars.
"""
from __future__ import annotations

import copy
import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import yaml

DEFAULTS: Dict[str, Any] = {
    "stage1": {"dim": 64},
    "stage2": {"dim": 64, "dim_mults": [1, 2, 4, 8], "perceptual_decoder": True, "input_condition": True,
               "timesteps": 1000,
               "sampling_timesteps": 5, "objective": "pred_res", "loss_type": "l1", "sum_scale": 1.0},
    "sampling": {"seed": 0, "eta": 0.0, "fast": True},
}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


class ConfigError(ValueError):
    """Bad config file or override; the message names the file or key."""


def check_keys(section: str, values: Dict[str, Any], known: Iterable[str], strict: bool = False) -> None:
    """Report keys of ``values`` not in ``known`` (a misspelt key would otherwise be ignored
    silently): ConfigError when ``strict``, else a warning; suggests the closest known key."""
    known = sorted(set(known))
    for key in sorted(set(values or {}) - set(known)):
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        msg = f"unknown config key {section}.{key}{hint}; known keys: {', '.join(known)}"
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=3)


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at top level, not {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = deep_merge(parent, data)
    return data


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)       # YAML 1.1 reads '2e-4' (no dot) as a string
    node = cfg
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
                defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS if defaults is None else defaults)
    if path is not None:
        cfg = deep_merge(cfg, _read_yaml(Path(path)))
    for item in overrides or ():
        apply_override(cfg, item)
    return cfg


def dump_config(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
