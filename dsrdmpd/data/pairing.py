"""Pairing hazy and ground-truth files by a name key, never by sort order.

A key rule is a regular expression with one group, matched against the file stem
(name without extension): RSID uses the whole stem on both sides, SateHaze1k extracts
``<id>`` from ``<id>-inputs`` / ``<id>-targets``. Files whose stem does not match the rule,
keys present on one side only, and two files with the same key all raise
:class:`PairingError`, naming the files.

Presets (the datasets' layouts as distributed; ``{split}`` is the split name):

============  =====================================================================
rsid          ``{split}/hazy/<n>.png`` + ``{split}/GT/<n>.png`` (train, test)
satehaze1k    ``{split}/input/<n>-inputs.png`` + ``{split}/target/<n>-targets.png``
              (train, valid, test; root ``Haze1k_<level>/dataset``; .jpg copies too)
raindrop      ``{split}/data/<n>_rain.png`` + ``{split}/gt/<n>_clean.png`` (train, test_a, test_b)
realblur      pairs listed in ``RealBlur_<J|R>_{split}_list.txt`` at the root, one
              ``<gt path> <blurred path>`` per line (train, test); set ``list_file``
paired        any layout: ``hazy_dir``, ``gt_dir`` (may contain ``{split}``), ``hazy_key``, ``gt_key``
============  =====================================================================
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from pathlib import Path
from typing import Dict, List, Union

from ..choices import is_image_file


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
    "raindrop": PairLayout("{split}/data", "{split}/gt", r"(.+)_rain", r"(.+)_clean"),
}
LIST_PRESETS = {"realblur": "RealBlur_J_{split}_list.txt"}   # default list file; RealBlur-R: set list_file
PRESET_NAMES = (*PRESETS, *LIST_PRESETS, "paired")


def natural_key(key: str):
    """Sort key that orders digit runs by value and ignores case: 'img2' before 'img10',
    'a1' before 'B1' (names equal but for case then sort by their exact text). Every second
    piece of the split is a digit run, so a lone non-ASCII digit such as '²' is text."""
    pieces = re.split(r"(\d+)", key)
    folded = [int(t) if i % 2 else t.casefold() for i, t in enumerate(pieces)]
    return folded, pieces


def files_by_key(folder: Path, rule: str, role: str) -> Dict[str, Path]:
    """The image files of ``folder`` by the key that regex ``rule`` (one group) takes from
    each name; ``role`` names the folder in errors (PairingError: missing folder, bad rule,
    names the rule does not match, a key taken twice)."""
    if not folder.is_dir():
        raise PairingError(f"{role} folder not found: {folder}")
    pattern = re.compile(rule)
    if pattern.groups != 1:
        raise PairingError(f"key rule {rule!r} for {role} must have exactly one group")
    out: Dict[str, Path] = {}
    unmatched = []
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
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
    hazy = files_by_key(Path(hazy_dir), hazy_key, "hazy")
    gt = files_by_key(Path(gt_dir), gt_key, "ground-truth")
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
    return [ImagePair(k, hazy[k], gt[k]) for k in sorted(hazy, key=natural_key)]


def layout_from_config(data_cfg: dict) -> PairLayout:
    """The folder layout of a config's ``data`` section: a preset's, or for 'paired' the
    section's own hazy_dir, gt_dir, hazy_key and gt_key (folders may contain '{split}')."""
    preset = data_cfg.get("preset", "rsid")
    if preset in PRESETS:
        base = PRESETS[preset]
    elif preset == "paired":
        base = PairLayout("{split}/hazy", "{split}/GT")
    else:
        raise PairingError(f"unknown data preset {preset!r} (choose {', '.join(PRESET_NAMES)})")
    fields = {f: data_cfg.get(f) or getattr(base, f) for f in ("hazy_dir", "gt_dir", "hazy_key", "gt_key")}
    return PairLayout(**fields)


def _listed_path(root: Path, text: str, where: str) -> Path:
    """A list file's path, relative to ``root`` and confined to it (no absolute paths, no '..',
    no symlink leading out)."""
    rel = PurePosixPath(text.replace("\\", "/"))
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", text) or ".." in rel.parts:
        raise PairingError(f"{where}: {text!r} is not a path inside the dataset root {root}")
    path = root / Path(*rel.parts)
    real_root = root.resolve()
    if path.exists() and real_root not in path.resolve().parents:
        raise PairingError(f"{where}: {text!r} leads outside the dataset root {root} (to {path.resolve()})")
    return path


def listed_pairs(root: Union[str, Path], list_file: Union[str, Path]) -> List[ImagePair]:
    """Pairs from a list file (RealBlur style): each line ``<gt path> <degraded path>``
    (exactly two paths), relative to ``root`` and inside it. The key is the degraded path
    with '/' turned into '_' (file names repeat across scenes); where two different paths
    give the same key, both keys get a short hash of their path. Missing files, paths outside
    the root, malformed lines and a path listed twice are named (file:line)."""
    root, list_path = Path(root), Path(root) / list_file
    if not list_path.is_file():
        raise PairingError(f"list file not found: {list_path}")
    entries, missing, seen = [], [], {}
    for n, line in enumerate(list_path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{list_path}:{n}"
        if len(parts) != 2:
            raise PairingError(f"{where}: expected '<gt path> <degraded path>' (two paths without spaces), got "
                               f"{line.strip()!r}")
        gt, hazy = (_listed_path(root, p, where) for p in parts)
        missing += [str(p) for p in (gt, hazy) if not p.is_file()]
        norm = PurePosixPath(parts[1].replace("\\", "/")).as_posix()
        if norm in seen:
            raise PairingError(f"{where}: {parts[1]} is listed twice (first on line {seen[norm]})")
        seen[norm] = n
        entries.append((norm, hazy, gt))
    if missing:
        raise PairingError(f"{list_path}: listed files not found: {', '.join(missing[:10])}"
                           f"{' ...' if len(missing) > 10 else ''}")
    if not entries:
        raise PairingError(f"{list_path}: no pairs listed")
    keys = [str(PurePosixPath(norm).with_suffix("")).replace("/", "_") for norm, _, _ in entries]
    clash = {k for k in keys if keys.count(k) > 1}
    keys = [f"{k}-{hashlib.sha256(e[0].encode()).hexdigest()[:8]}" if k in clash else k for k, e in zip(keys, entries)]
    return [ImagePair(k, hazy, gt) for k, (_, hazy, gt) in zip(keys, entries)]


def split_pairs(data_cfg: dict, split: str) -> List[ImagePair]:
    """Pairs of one split (e.g. 'train', 'test') of the dataset a config's ``data`` section names."""
    if not data_cfg.get("root"):
        raise PairingError("data.root is not set (the dataset folder)")
    root = Path(data_cfg["root"])
    preset = data_cfg.get("preset", "rsid")
    if preset in LIST_PRESETS:
        return listed_pairs(root, str(data_cfg.get("list_file") or LIST_PRESETS[preset]).format(split=split))
    layout = layout_from_config(data_cfg)
    return find_pairs(root / layout.hazy_dir.format(split=split), root / layout.gt_dir.format(split=split),
                      layout.hazy_key, layout.gt_key)
