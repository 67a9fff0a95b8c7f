"""Scoring results that already exist: a folder of restored images (any method's) against
ground truth, under one or more metric protocols (:data:`dsrdmpd.metrics.PROTOCOLS`),
with the mean CIEDE2000 colour difference as an extra column.

Restored files are matched to ground truth by name key, never by order: a restored
file's key (its stem, or the group of ``restored_key``) must equal one of a reference
pair's names: its key, its hazy file's stem or its GT file's stem (so outputs named like
the inputs, like the GT or by the bare key all pair up); a key that equals no name exactly
pairs with the one name it equals ignoring case, if there is exactly one. Unmatched files
on either side, and a file matching two references, raise :class:`ScoringError`, naming the
files (with the key rule that would pair them, where one prefix / suffix explains them all).

A pair that cannot be scored (unreadable file, sizes that differ) fails alone: it is
listed with its reason in ``summary.md`` and left out of the means.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .atomicfile import write_text_atomic
from .choices import is_image_file
from .data import DataError, ImagePair, PairingError
from .data.pairing import files_by_key, natural_key
from .evaluation import cell, failed_lines, resize_image, write_rows_csv
from .messages import one_line
from .imageio import read_image
from .metrics import PROTOCOLS, ciede2000, psnr_ssim

CIEDE_COLUMN = "ciede2000"


class ScoringError(PairingError):
    """Restored and ground-truth folders whose names do not match; the message names the files."""


def parse_protocols(text: str) -> List[str]:
    """'paper,y' -> ['paper', 'y']; an unknown or repeated name is an error."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in PROTOCOLS]
    if bad or not names or len(set(names)) < len(names):
        raise ValueError(f"--protocol {text!r}: give one or more of {', '.join(sorted(PROTOCOLS))}, "
                         "comma-separated, each once")
    return names


def metric_columns(protocols: Sequence[str]) -> List[str]:
    """psnr_<protocol>, ssim_<protocol> per protocol, then ciede2000."""
    return [f"{m}_{p}" for p in protocols for m in ("psnr", "ssim")] + [CIEDE_COLUMN]


def check_folder(folder: Path, role: str) -> None:
    """A ``role`` folder that is a file (or missing) is a :class:`ScoringError` saying which."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ScoringError(f"{role} folder {folder}: is a file, not a folder")
    if not folder.is_dir():
        raise ScoringError(f"{role} folder not found: {folder}")


def subfolder_hint(folder: Path) -> str:
    """' (it holds no image itself; its subfolders with images: restored/ (12 images))' for a
    folder whose images are one level down (e.g. a dsrdmpd-test output folder); '' otherwise."""
    try:
        subs = [(d.name, sum(1 for p in d.iterdir() if is_image_file(p))) for d in sorted(Path(folder).iterdir())
                if d.is_dir()]
    except OSError:
        return ""
    subs = [(n, k) for n, k in subs if k]
    if not subs:
        return ""
    return (" (it holds no image itself; its subfolders with images: "
            + ", ".join(f"{n}/ ({k} images)" for n, k in subs[:5]) + (" ..." if len(subs) > 5 else "") + ")")


def gt_references(gt_dir: Path, gt_key: str = r"(.+)") -> List[ImagePair]:
    """The GT folder as reference pairs (hazy = GT), keyed by ``gt_key`` as in pairing,
    in natural key order; an empty folder is an error."""
    check_folder(gt_dir, "ground-truth")
    keyed = files_by_key(Path(gt_dir), gt_key, "ground-truth")
    if not keyed:
        raise ScoringError(f"no images found in {gt_dir}{subfolder_hint(gt_dir)}")
    return [ImagePair(k, keyed[k], keyed[k]) for k in sorted(keyed, key=natural_key)]


def affix_rule(longer: Sequence[str], shorter: Sequence[str]) -> Optional[str]:
    """The key rule ``prefix(.+)suffix`` (regex, escaped) that takes from every name of
    ``longer`` one name of ``shorter``, with the same prefix and suffix for all (not both
    empty); None where there is no such rule. The shortest prefix + suffix wins."""
    names = set(shorter)
    common = None
    for stem in longer[:50]:
        cuts = {(stem[:i], stem[j:]) for i in range(len(stem)) for j in range(i + 1, len(stem) + 1)
                if (i or j < len(stem)) and stem[i:j] in names}
        common = cuts if common is None else common & cuts
        if not common:
            return None
    for pre, suf in sorted(common or (), key=lambda c: len(c[0]) + len(c[1])):
        rule = re.compile(f"{re.escape(pre)}(.+){re.escape(suf)}")
        if all((m := rule.fullmatch(s)) and m.group(1) in names for s in longer):
            return rule.pattern
    return None


def match_restored(restored_dir: Path, references: Sequence[ImagePair],
                   restored_key: str = r"(.+)") -> List[ImagePair]:
    """Pairs (key, restored file, GT file) in the references' order. Each restored key
    must name exactly one reference (its key, hazy stem or GT stem; failing that, the one
    such name it equals ignoring case) and every reference must have one restored file;
    otherwise :class:`ScoringError` lists what is unmatched."""
    check_folder(restored_dir, "restored")
    restored = files_by_key(Path(restored_dir), restored_key, "restored")
    by_name: Dict[str, List[int]] = {}
    by_folded: Dict[str, List[int]] = {}
    for i, ref in enumerate(references):
        for name in {ref.key, ref.hazy.stem, ref.gt.stem}:
            by_name.setdefault(name, []).append(i)
        for name in {ref.key.casefold(), ref.hazy.stem.casefold(), ref.gt.stem.casefold()}:
            by_folded.setdefault(name, []).append(i)
    found: Dict[int, List[Path]] = {}
    orphans = []
    for key, path in restored.items():
        refs = by_name.get(key) or by_folded.get(key.casefold(), [])
        if len(refs) > 1:
            raise ScoringError(f"{path}: matches more than one ground truth "
                               f"({', '.join(references[i].gt.name for i in refs)}); rename it or set --restored-key")
        if refs:
            found.setdefault(refs[0], []).append(path)
        else:
            orphans.append(path.name)
    twice = [paths for paths in found.values() if len(paths) > 1]
    if twice:
        raise ScoringError(f"{restored_dir}: {' and '.join(p.name for p in twice[0])} are restored versions of the "
                           "same ground truth")
    missing = [references[i].gt.name for i in range(len(references)) if i not in found]
    if orphans or missing:
        lines = [f"restored files in {restored_dir} do not match the ground truth by name"
                 + ("" if restored else subfolder_hint(restored_dir))]
        if orphans:
            lines.append(f"  restored without ground truth ({len(orphans)}): {', '.join(orphans[:10])}"
                         f"{' ...' if len(orphans) > 10 else ''}")
        if missing:
            lines.append(f"  ground truth without restored ({len(missing)}): {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
        hint = None
        if orphans and restored_key == r"(.+)":
            rule = affix_rule(list(restored), list(by_name))
            hint = rule and f"  --restored-key '{rule}' would pair them"
        if not hint and orphans and missing and all(r.hazy == r.gt and r.key == r.gt.stem for r in references):
            missing_stems = [references[i].gt.stem for i in range(len(references)) if i not in found]
            rule = affix_rule(missing_stems, [Path(o).stem for o in orphans])
            hint = rule and f"  --gt-key '{rule}' would pair them"
        if hint:
            lines.append(hint)
        raise ScoringError("\n".join(lines))
    return [ImagePair(references[i].key, found[i][0], references[i].gt) for i in sorted(found)]


def crop_border(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., H, W) without ``n`` pixels on each side (BasicSR's crop_border)."""
    if n <= 0:
        return x
    if min(x.shape[-2:]) <= 2 * n:
        raise DataError(f"--crop-border {n} leaves nothing of a {tuple(x.shape[-2:])} image")
    return x[..., n:-n, n:-n]


def score_pair(pair: ImagePair, protocols: Sequence[str], border: int = 0,
               resize: Optional[int] = None) -> Dict[str, object]:
    """One pair's row: name, gt, height, width, PSNR / SSIM per protocol, CIEDE2000, and
    ``converted``: what reading did to either file (grey or alpha to RGB, EXIF turn, ...)
    and differing bit depths ('' if nothing). ``resize`` resizes the GT to N x N first (as
    dsrdmpd-test --resize); sizes must then agree."""
    out, gt_img = read_image(pair.hazy, clip_float=True), read_image(pair.gt)
    notes = [f"restored: {out.conversion}" if out.conversion else "",
             f"ground truth: {gt_img.conversion}" if gt_img.conversion else "",
             f"restored {out.bit_depth}-bit, ground truth {gt_img.bit_depth}-bit"
             if out.bit_depth != gt_img.bit_depth else ""]
    converted = "; ".join(n for n in notes if n)
    a, b = out.tensor[None], gt_img.tensor[None]
    if resize:
        b = resize_image(b, resize, gt_img.bit_depth)
    if a.shape != b.shape:
        raise DataError(f"size mismatch: {pair.hazy} is {tuple(a.shape[-2:])} but {pair.gt} is "
                        f"{tuple(b.shape[-2:])}" + (f" (resized to {resize})" if resize else "")
                        + (f" ({converted})" if converted else ""))
    a, b = crop_border(a, border), crop_border(b, border)
    row: Dict[str, object] = {"name": pair.hazy.name, "gt": pair.gt.name, "height": a.shape[-2], "width": a.shape[-1],
                              "converted": converted}
    for p in protocols:
        m = psnr_ssim(a, b, p)
        row[f"psnr_{p}"], row[f"ssim_{p}"] = m["psnr"][0], m["ssim"][0]
    row[CIEDE_COLUMN] = ciede2000(a, b)[0]
    return row


def score_pairs(pairs: Sequence[ImagePair], protocols: Sequence[str], border: int = 0, resize: Optional[int] = None,
                progress: bool = True) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """Rows of the pairs that could be scored, and ``{'name', 'error'}`` of those that could not."""
    done, failed = [], []
    for pair in tqdm(pairs, desc="scoring", unit="img", disable=not progress):
        try:
            done.append(score_pair(pair, protocols, border, resize))
        except Exception as exc:           # one pair's failure (unreadable, wrong size, too large ...)
            failed.append({"name": pair.hazy.name, "error": one_line(exc)})
            tqdm.write(f"skipped: {failed[-1]['error']}")
    return done, failed


def mean_scores(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> Dict[str, float]:
    """Mean of each column over the rows (each image weighs the same); {} without rows."""
    return {c: sum(float(r[c]) for r in rows) / len(rows) for c in columns} if rows else {}


def protocol_notes(protocols: Sequence[str], border: int = 0, resize: Optional[int] = None) -> List[str]:
    """One line per protocol, plus what was done to every pair before scoring."""
    lines = [f"- `{p}`: {PROTOCOLS[p]}." for p in protocols]
    lines.append(f"- `{CIEDE_COLUMN}`: mean CIEDE2000 colour difference (scikit-image rgb2lab, D65; lower is better).")
    if border:
        lines.append(f"- {border} pixel(s) cropped from every border before scoring (all columns).")
    if resize:
        lines.append(f"- ground truth resized to {resize} x {resize} (PIL bilinear, as the authors' test scripts).")
    return lines


def infinite_psnr_lines(rows: Sequence[Dict[str, object]], protocols: Sequence[str]) -> List[str]:
    """Where some pairs are identical (PSNR inf, so the mean is inf): a line naming how many,
    with the mean PSNR of the others per protocol; [] when every PSNR is finite."""
    cols = [f"psnr_{p}" for p in protocols]
    same = [r for r in rows if any(math.isinf(float(r[c])) for c in cols)]
    if not same:
        return []
    rest = [r for r in rows if r not in same]
    means = mean_scores(rest, cols)
    tail = ("; mean PSNR of the other " + str(len(rest)) + ": "
            + ", ".join(f"{p} {means[c]:.3f} dB" for p, c in zip(protocols, cols))) if rest else ""
    return [f"PSNR is infinite (identical images) for {len(same)} of {len(rows)} pair(s), so its mean is "
            f"infinite{tail}.", ""]


def write_scores(rows: Sequence[Dict[str, object]], out_dir: Path, protocols: Sequence[str], title: str,
                 notes: Sequence[str] = (), failed: Sequence[Dict[str, object]] = ()) -> Dict[str, float]:
    """``metrics.csv`` (one row per scored pair) and ``summary.md`` (the protocols, the
    means, per image, what reading converted, and the pairs that failed with their
    reasons); returns the means."""
    out_dir = Path(out_dir)
    cols = metric_columns(protocols)
    write_rows_csv(out_dir / "metrics.csv", rows, ["name", "gt", "height", "width"] + cols)
    means = mean_scores(rows, cols)
    heads = [f"{m} {p}" for p in protocols for m in ("PSNR", "SSIM")] + ["CIEDE2000"]
    cells = lambda values: [f"{v:.3f}" if c.startswith("psnr") or c == CIEDE_COLUMN else f"{v:.4f}"
                            for c, v in zip(cols, values)]
    lines = [f"# {title}", "", "Metric protocols:", "", *notes, ""]
    if means:
        lines += ["| images | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|",
                  f"| {len(rows)} | " + " | ".join(cells([means[c] for c in cols])) + " |", "",
                  *infinite_psnr_lines(rows, protocols),
                  "Per image:", "", "| image | ground truth | " + " | ".join(heads) + " |",
                  "|---" * (len(heads) + 2) + "|"]
        lines += [f"| {cell(r['name'])} | {cell(r['gt'])} | " + " | ".join(cells([r[c] for c in cols])) + " |"
                  for r in rows]
    else:
        lines.append("No pair could be scored.")
    converted = [r for r in rows if r.get("converted")]
    if converted:
        lines += ["", "Converted on reading (the scores are of the converted images):", "",
                  "| image | conversion |", "|---|---|",
                  *[f"| {cell(r['name'])} | {cell(r['converted'])} |" for r in converted]]
    lines += failed_lines(failed, "pair")
    write_text_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    return means


def score_folder(restored_dir: Path, references: Sequence[ImagePair], out_dir: Path, protocols: Sequence[str],
                 border: int = 0, resize: Optional[int] = None, restored_key: str = r"(.+)",
                 title: str = "Scores", notes: Sequence[str] = (),
                 progress: bool = True) -> Tuple[Dict[str, float], List[Dict[str, object]]]:
    """Match, score and write ``out_dir``/metrics.csv + summary.md; returns (means, failed rows)."""
    pairs = match_restored(restored_dir, references, restored_key)
    rows, failed = score_pairs(pairs, protocols, border, resize, progress)
    notes = protocol_notes(protocols, border, resize) + (["", *notes] if notes else [])
    return write_scores(rows, out_dir, protocols, title, notes, failed), failed

