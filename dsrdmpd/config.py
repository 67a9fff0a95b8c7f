"""YAML configuration with defaults and dotted command-line overrides.

A config is a nested dict. ``load_config(path, overrides)`` merges, in order: the
defaults below, the YAML file (and any file it names under ``base:``, relative to
itself), then ``key.sub=value`` overrides whose values are parsed as YAML scalars.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

DEFAULTS: Dict[str, Any] = {
    "stage1": {"dim": 64},
    "stage2": {"dim": 64, "dim_mults": [1, 2, 4, 8], "perceptual_decoder": True, "input_condition": True,
               "timesteps": 1000,
               "sampling_timesteps": 5, "objective": "pred_res", "loss_type": "l1", "sum_scale": 1.0},
    "sampling": {"seed": 0, "eta": 0.0, "fast": True},
}


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads '2e-4' (no dot) as a string; configs and overrides read it
    as the number it is, as YAML 1.2 does."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


class ConfigError(ValueError):
    """Bad config file or override; the message names the file or key."""


def did_you_mean(key: Any, known: Iterable[Any], prefix: str = "") -> str:
    """' (did you mean PREFIXclosest?)' for the known name closest to ``key``, or ''."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def check_keys(section: str, values: Dict[str, Any], known: Iterable[str], strict: bool = False) -> None:
    """Report keys of ``values`` not in ``known`` (a misspelt key would otherwise be ignored
    silently): ConfigError when ``strict``, else a warning; suggests the closest known key."""
    known = sorted(set(known))
    for key in sorted(set(values or {}) - set(known)):
        msg = f"unknown config key {section}.{key}{did_you_mean(key, known, section + '.')}; known keys: " \
              f"{', '.join(known)}"
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=3)


# Expected type of every known value: (kind, minimum, maximum, optional) with kind int /
# number / bool / str / a list of ints or numbers / a tuple of choices.
_INT, _NUM, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
SCHEMA: Dict[str, Tuple[Any, Optional[float], Optional[float], bool]] = {
    # key: (kind, minimum, maximum, optional)
    "stage1.dim": (_INT, 1, None, False),
    "stage2.dim": (_INT, 8, None, False),
    "stage2.dim_mults": ("a list of integers", 1, None, False),
    "stage2.perceptual_decoder": (_BOOL, None, None, False),
    "stage2.input_condition": (_BOOL, None, None, False),
    "stage2.timesteps": (_INT, 1, None, False),
    "stage2.sampling_timesteps": (_INT, 1, None, False),
    "stage2.sum_scale": (_NUM, 1e-12, None, False),
    "sampling.seed": (_INT, 0, 2**63 - 1, False),
    "sampling.eta": (_NUM, 0, None, False),
    "sampling.fast": (_BOOL, None, None, False),
    "train.lr": (_NUM, 0, None, False),
    "train.lr_min": (_NUM, 0, None, False),
    "train.betas": ("a list of numbers", 0, 1, False),
    "train.epochs": (_INT, 1, None, False),
    "train.steps": (_INT, 1, None, False),
    "train.batch_size": (_INT, 1, None, False),
    "train.grad_accum": (_INT, 1, None, False),
    "train.seed": (_INT, 0, 2**63 - 1, False),
    "train.sample_seed": (_INT, 0, 2**63 - 1, False),
    "train.log_every": (_INT, 1, None, False),
    "train.val_every": (_INT, 1, None, True),
    "train.save_every": (_INT, 1, None, True),
    "train.keep_every": (_INT, 1, None, True),
    "train.grad_clip": (_NUM, 0, None, True),
    "train.ema_decay": (_NUM, 0, 1, False),
    "train.ema_update_every": (_INT, 1, None, False),
    "train.ema_update_after_step": (_INT, 0, None, False),
    "train.mixed_precision": (("no", "fp16", "bf16"), None, None, False),
    "train.val_weights": (("model", "ema"), None, None, False),
    "train.val_protocol": (("paper", "standard"), None, None, False),
    "train.precompute_coarse": (_BOOL, None, None, False),
    "train.tf32": (_BOOL, None, None, False),
    "train.zero_init_residual_head": (_BOOL, None, None, False),
    "train.deterministic": (_BOOL, None, None, False),
    "train.precision": (("fp32", "tf32", "bf16"), None, None, True),
    "train.channels_last": (_BOOL, None, None, False),
    "train.fused_optimizer": (("auto", True, False), None, None, False),
    "train.cuda_graph": (_BOOL, None, None, False),
    "train.fast_norm": (_BOOL, None, None, False),
    "train.stage1_checkpoint": (_STR, None, None, True),
    "data.crop": (_INT, 16, None, True),
    "data.resize": (_INT, 16, None, True),
    "data.resize_mode": (("bilinear", "bicubic", "area"), None, None, False),
    "data.flip": (_BOOL, None, None, False),
    "data.num_workers": (_INT, 0, None, False),
    "data.val_limit": (_INT, 1, None, True),
    "data.val_holdout": (_INT, 1, None, True),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(key: str, value: Any, kind, lo, hi) -> Any:
    def fail(expected: str):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")

    if isinstance(kind, tuple):
        if value not in kind:
            fail("one of " + ", ".join(repr(k) for k in kind))
        return value
    if kind == _NUM and isinstance(value, str):
        try:
            value = float(value)        # a quoted number ("0.001") is accepted too
        except ValueError:
            fail(kind)
    checks = {_INT: _is_int, _NUM: _is_num, _BOOL: lambda v: isinstance(v, bool), _STR: lambda v: isinstance(v, str)}
    if kind in checks:
        if not checks[kind](value):
            fail(kind)
        items = [value] if kind in (_INT, _NUM) else []
    else:   # lists
        elem = _is_int if "integers" in kind else _is_num
        if not isinstance(value, (list, tuple)) or not value or not all(elem(v) for v in value):
            fail(kind)
        items = list(value)
    for v in items:
        if not math.isfinite(v):
            fail(f"a finite {kind.removeprefix('a ').removeprefix('an ')}")
        if lo is not None and v < lo:
            fail(f"{kind} >= {lo}")
        if hi is not None and v > hi:
            fail(f"{kind} <= {hi}")
    return value


# Network widths the architectures divide into groups (stage 1: grouped attention-gate
# convolutions; stage 2: GroupNorm(8)); the models check their own widths against it.
WIDTH_MULTIPLES = {"stage1.dim": 32, "stage2.dim": 8}

# Top-level entries that must be sections (key: value mappings) when present.
SECTIONS = ("stage1", "stage2", "sampling", "train", "data")


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check every known value's type and range in place (numbers written as strings are
    converted); the error names the key: ``train.lr: expected a number, got 'abc'``. NaN and
    infinite numbers are refused; sections must be mappings (``--set stage1=5`` is an error);
    widths must be multiples of :data:`WIDTH_MULTIPLES`; ``stage2.sampling_timesteps`` may not
    exceed ``stage2.timesteps``."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a mapping, not {type(cfg).__name__}")
    for section in SECTIONS:
        if section in cfg and cfg[section] is not None and not isinstance(cfg[section], dict):
            raise ConfigError(f"{section}: expected a section of key: value entries, got {cfg[section]!r}")
    for dotted, (kind, lo, hi, optional) in SCHEMA.items():
        section, key = dotted.split(".")
        node = cfg.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        if node[key] is None:
            if not optional:
                raise ConfigError(f"{dotted}: expected {kind if isinstance(kind, str) else 'a value'}, got null")
            continue
        node[key] = _check_value(dotted, node[key], kind, lo, hi)
    for dotted, multiple in WIDTH_MULTIPLES.items():
        section, key = dotted.split(".")
        width = (cfg.get(section) or {}).get(key)
        if _is_int(width) and width % multiple:
            raise ConfigError(f"{dotted}: expected a multiple of {multiple}, got {width}")
    s2 = cfg.get("stage2") or {}
    if _is_int(s2.get("sampling_timesteps")) and _is_int(s2.get("timesteps")) \
            and s2["sampling_timesteps"] > s2["timesteps"]:
        raise ConfigError(f"stage2.sampling_timesteps: {s2['sampling_timesteps']} is more than the "
                          f"{s2['timesteps']} diffusion steps (stage2.timesteps)")
    return cfg


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line with its place in the file: 'line 2, column 1: expected ...
    (while parsing a flow sequence at line 1, column 11)'; PyYAML's own text spreads over
    several lines with a copy of the offending line and a caret."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, where = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {where.line + 1}, column {where.column + 1})" if where else ")")
    return text


def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at top level, not {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        if not (path.parent / base).is_file():
            raise ConfigError(f"config {path}: its base {base!r} was not found (looked for {path.parent / base})")
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = deep_merge(parent, data)
    return data


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
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
    return validate_config(cfg)


def flatten(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}`` (lists are values)."""
    out: Dict[str, Any] = {}
    for k, v in (cfg or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Dict[str, Any], new: Dict[str, Any], ignore: Iterable[str] = ()) -> List[str]:
    """``['train.lr: 8.0e-05 -> 0.0001', 'data.flip: (unset) -> true', ...]``: the dotted
    keys whose values differ between two configs (unset and null alike), in key order,
    leaving out ``ignore``."""
    a, b, skip = flatten(old), flatten(new), set(ignore)
    return [f"{k}: {_shown(a.get(k))} -> {_shown(b.get(k))}" for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k) != b.get(k)]


def _shown(value: Any) -> str:
    """A config value as YAML writes it on one line ('(unset)' for None)."""
    if value is None:
        return "(unset)"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def dump_config(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
