"""Pairing hazy and ground-truth files by a name key, never by sort order.

A key rule is a regular expression with one group, matched against the file stem
(name without extension): RSID uses the whole stem on both sides, SateHaze1k extracts
``<id>`` from ``<id>-inputs`` / ``<id>-targets``. Files whose stem does not match the rule,
keys present on one side only, and two files with the same key all raise
:class:`PairingError`, naming the files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

from ..imageio import IMAGE_EXTENSIONS


class PairingError(ValueError):
    """Hazy / GT folders that cannot be paired; the message names the files."""


@dataclass(frozen=True)
class ImagePair:
    key: str
    hazy: Path
    gt: Path


@dataclass(frozen=True)
class PairLayout:
    """Where a split's pairs live, relative to a dataset root, and how names pair up."""

    hazy_dir: str
    gt_dir: str
    hazy_key: str = r"(.+)"
    gt_key: str = r"(.+)"


# Layouts of the datasets the paper uses, per split ('{split}' is replaced).
PRESETS: Dict[str, PairLayout] = {
    "rsid": PairLayout("{split}/hazy", "{split}/GT"),
    "satehaze1k": PairLayout("{split}/input", "{split}/target", r"(.+)-inputs", r"(.+)-targets"),
}


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _keyed(folder: Path, rule: str, role: str) -> Dict[str, Path]:
    if not folder.is_dir():
        raise PairingError(f"{role} folder not found: {folder}")
    pattern = re.compile(rule)
    if pattern.groups != 1:
        raise PairingError(f"key rule {rule!r} for {role} must have exactly one group")
    out: Dict[str, Path] = {}
    unmatched = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        m = pattern.fullmatch(p.stem)
        if not m:
            unmatched.append(p.name)
            continue
        key = m.group(1)
        if key in out:
            raise PairingError(f"{role} folder {folder}: {out[key].name} and {p.name} have the same key {key!r}")
        out[key] = p
    if unmatched:
        raise PairingError(f"{role} folder {folder}: file names not matching the key rule {rule!r}: "
                           f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}")
    return out


def find_pairs(hazy_dir: Union[str, Path], gt_dir: Union[str, Path], hazy_key: str = r"(.+)",
               gt_key: str = r"(.+)") -> List[ImagePair]:
    """Pairs of (hazy, GT) files sharing a key, in natural key order."""
    hazy = _keyed(Path(hazy_dir), hazy_key, "hazy")
    gt = _keyed(Path(gt_dir), gt_key, "ground-truth")
    only_hazy, only_gt = sorted(set(hazy) - set(gt)), sorted(set(gt) - set(hazy))
    if only_hazy or only_gt:
        lines = [f"unpaired files between {hazy_dir} and {gt_dir}:"]
        if only_hazy:
            lines.append("  hazy without ground truth: " + ", ".join(hazy[k].name for k in only_hazy[:10]))
        if only_gt:
            lines.append("  ground truth without hazy: " + ", ".join(gt[k].name for k in only_gt[:10]))
        raise PairingError("\n".join(lines))
    if not hazy:
        raise PairingError(f"no images found in {hazy_dir}")
    return [ImagePair(k, hazy[k], gt[k]) for k in sorted(hazy, key=_natural)]


def layout_from_config(data_cfg: dict) -> PairLayout:
    """``data.preset`` ('rsid', 'satehaze1k' or 'paired'); 'paired' reads hazy_dir, gt_dir,
    hazy_key and gt_key from the section (folders may contain '{split}')."""
    preset = data_cfg.get("preset", "rsid")
    if preset in PRESETS:
        base = PRESETS[preset]
    elif preset == "paired":
        base = PairLayout("{split}/hazy", "{split}/GT")
    else:
        raise PairingError(f"unknown data preset {preset!r} (choose rsid, satehaze1k or paired)")
    fields = {f: data_cfg.get(f) or getattr(base, f) for f in ("hazy_dir", "gt_dir", "hazy_key", "gt_key")}
    return PairLayout(**fields)


def split_pairs(data_cfg: dict, split: str) -> List[ImagePair]:
    """Pairs of one split (e.g. 'train', 'test') of the dataset a config's ``data`` section names."""
    if not data_cfg.get("root"):
        raise PairingError("data.root is not set (the dataset folder)")
    layout = layout_from_config(data_cfg)
    root = Path(data_cfg["root"])
    return find_pairs(root / layout.hazy_dir.format(split=split), root / layout.gt_dir.format(split=split),
                      layout.hazy_key, layout.gt_key)
