"""Dehaze a list of images (with or without ground truth), save the results, score them,
and write a per-image CSV plus a markdown summary that names the metric protocol.

Scores are computed on the float outputs before saving (the paper's protocol). Saved
images keep the input's format where it can hold the result: PNG and TIFF keep their bit
depth (8 or 16), other formats become 8-bit PNG.

Batch runs survive bad items and kills: an item that fails (unreadable file, size
mismatch, ...) is recorded with its reason and skipped; every finished item leaves a
record (``.records/<name>.json``, its float metrics) beside its written image, so a
killed run resumed with ``resume=True`` skips what is done and ends with the same
``metrics.csv`` / ``summary.md`` as an uninterrupted one. Every file is written
atomically. Items can be split across processes (``rank``, ``world``); the records of
all processes are merged afterwards by :func:`collect_rows`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import DataError
from .imageio import TIFF_EXTENSIONS, ImageReadError, read_image, write_image, write_text_atomic
from .inference import Dehazer
from .metrics import PROTOCOLS, psnr_ssim
from .raster import RasterOptions, is_raster, dehaze_raster
from .visualize import error_map, save_panel

METRIC_COLUMNS = ["psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2"]
RECORDS = ".records"
PANEL_MIN_SIZE = 192        # small images are enlarged (nearest neighbour) in panels to stay legible
# What makes one item fail without ending the run: bad files and sizes, and bad values.
ITEM_ERRORS = (ImageReadError, DataError, ValueError, OSError)


@dataclass
class Item:
    name: str
    hazy: Path
    gt: Optional[Path] = None


KEPT_FORMATS = TIFF_EXTENSIONS + (".png",)     # written back in their own format and bit depth


def output_name(path: Path) -> str:
    """Same file name; TIFF and PNG stay as they are (bit depth kept), everything else becomes PNG."""
    return path.name if path.suffix.lower() in KEPT_FORMATS else path.stem + ".png"


def output_bit_depth(path: Path, bit_depth: int) -> int:
    return bit_depth if path.suffix.lower() in KEPT_FORMATS else 8


def items_from_pairs(pairs) -> List[Item]:
    """Items of image pairs, named by the hazy file's name, or by the pair key where file
    names repeat (RealBlur: blur_1.png in every scene folder)."""
    names = [p.hazy.name for p in pairs]
    if len(set(names)) < len(names):
        names = [f"{p.key}{p.hazy.suffix}" for p in pairs]
    return [Item(n, p.hazy, p.gt) for n, p in zip(names, pairs)]


def check_output_names(items: Sequence[Item]) -> None:
    """Two inputs that would write the same output file (e.g. a.jpg and a.png) are refused."""
    seen: Dict[str, Path] = {}
    for item in items:
        out = output_name(Path(item.name))
        if out in seen:
            raise DataError(f"{item.hazy} and {seen[out]} would both be written as {out}; rename one of them")
        seen[out] = item.hazy


def resize_image(x: torch.Tensor, size: int, bit_depth: int = 8) -> torch.Tensor:
    """The authors' test-time resize: ``transforms.Resize((size, size))`` on the PIL image,
    i.e. PIL's bilinear filter (which widens its support when shrinking), before ToTensor.
    (B, 3, H, W) in [0, 1] -> (B, 3, size, size). 8-bit images go through PIL's RGB path
    exactly (8-bit rounding included); deeper ones through PIL's float mode, channel by
    channel, with the same filter."""
    out = []
    for img in x:
        if bit_depth == 8:
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            small = np.asarray(Image.fromarray(arr, "RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
            out.append(torch.from_numpy(small / 255.0).permute(2, 0, 1))
        else:
            chans = [np.asarray(Image.fromarray(c.float().numpy(), "F").resize((size, size), Image.BILINEAR))
                     for c in img]
            out.append(torch.from_numpy(np.stack(chans)).clamp(0, 1))
    return torch.stack(out).to(x.dtype)


def _record_path(out_dir: Path, item: Item) -> Path:
    return out_dir / RECORDS / f"{item.name}.json"


def process_item(dehazer: Dehazer, item: Item, out_dir: Path, protocol: str = "paper", resize: Optional[int] = None,
                 save_coarse: bool = False, panel: bool = False,
                 raster: Optional["RasterOptions"] = None) -> Dict[str, object]:
    """Dehaze one item, write its outputs; return its row (metrics when it has GT). With
    ``raster`` options, a TIFF without GT goes through :func:`dsrdmpd.raster.dehaze_raster`
    (GeoTIFF out, streamed; no coarse output or panel)."""
    if raster is not None and item.gt is None and is_raster(item.hazy):
        if resize:
            raise DataError(f"{item.hazy}: --resize does not apply to satellite rasters")
        note = f"dehazed with DS-RDMPD (seed {dehazer.seed}, {dehazer.steps} sampling steps)"
        return dehaze_raster(dehazer, item.hazy, out_dir / "restored" / output_name(Path(item.name)), raster, note)
    img = read_image(item.hazy)
    gt_img = read_image(item.gt) if item.gt is not None else None
    hazy, gt = img.tensor[None], (gt_img.tensor[None] if gt_img is not None else None)
    if resize:
        hazy = resize_image(hazy, resize, img.bit_depth)
        gt = resize_image(gt, resize, gt_img.bit_depth) if gt is not None else None
    elif gt is not None and gt.shape != hazy.shape:
        raise DataError(f"size mismatch: {item.hazy} is {tuple(hazy.shape[-2:])} but {item.gt} is "
                        f"{tuple(gt.shape[-2:])}")
    result = dehazer(hazy)
    name = output_name(Path(item.name))
    depth = output_bit_depth(item.hazy, img.bit_depth)
    write_image(result.restored[0], out_dir / "restored" / name, depth)
    if save_coarse:
        write_image(result.coarse[0], out_dir / "coarse" / name, depth)
    row: Dict[str, object] = {"name": item.name, "height": hazy.shape[-2], "width": hazy.shape[-1]}
    if gt is not None:
        m1, m2 = psnr_ssim(result.coarse, gt, protocol), psnr_ssim(result.restored, gt, protocol)
        row.update(psnr_stage1=m1["psnr"][0], ssim_stage1=m1["ssim"][0],
                   psnr_stage2=m2["psnr"][0], ssim_stage2=m2["ssim"][0])
    if panel:
        tiles = [("hazy", hazy), ("stage 1", result.coarse), ("stage 2", result.restored)]
        captions = None
        if gt is not None:
            tiles += [("GT", gt), ("|stage 2 - GT|", error_map(result.restored, gt))]
            scores = [psnr_ssim(hazy, gt, protocol), m1, m2]
            captions = [f"{m['psnr'][0]:.2f} dB / {m['ssim'][0]:.3f}" for m in scores] + ["PSNR / SSIM", ""]
        save_panel(tiles, out_dir / "panels" / (Path(name).stem + ".png"), captions, min_size=PANEL_MIN_SIZE)
    return row


def run_items(dehazer: Dehazer, items: Sequence[Item], out_dir: Path, protocol: str = "paper",
              resize: Optional[int] = None, save_coarse: bool = False, panels: int = 0,
              progress: bool = True, resume: bool = False, rank: int = 0, world: int = 1,
              raster: Optional[RasterOptions] = None) -> List[Dict[str, object]]:
    """Process this process's share of ``items`` (every ``world``-th from ``rank``) into
    ``out_dir``; panels for the first ``panels`` items. Returns their rows; a failed item's
    row is ``{'name', 'error'}``; records also name the process that did the item. With
    ``resume``, items with a record and an output file are skipped; a fresh run should
    :func:`clear_records` of an earlier one first (once, before any process starts)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    out_dir = Path(out_dir)
    check_output_names(items)
    mine = list(enumerate(items))[rank::world]
    rows = []
    for k, item in tqdm(mine, desc="dehazing", unit="img", disable=not progress or rank != 0):
        record = _record_path(out_dir, item)
        if resume and record.is_file() and (out_dir / "restored" / output_name(Path(item.name))).is_file():
            row = json.loads(record.read_text())
            if "error" not in row:
                rows.append(row)
                continue
        try:
            row = process_item(dehazer, item, out_dir, protocol, resize, save_coarse, k < panels, raster)
        except ITEM_ERRORS as exc:
            row = {"name": item.name, "error": " ".join(str(exc).split()) or type(exc).__name__}
            tqdm.write(f"skipped: {row['error']}")
        write_text_atomic(record, json.dumps({**row, "process": rank}))
        rows.append(row)
    return rows


def clear_records(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / RECORDS, ignore_errors=True)


def collect_rows(items: Sequence[Item], out_dir: Path) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """All items' rows in item order, from the records: (done rows, failed rows). An item
    without a record (its process died) counts as failed."""
    done, failed = [], []
    for item in items:
        record = _record_path(Path(out_dir), item)
        row = json.loads(record.read_text()) if record.is_file() else {"name": item.name, "error": "not processed"}
        (failed if "error" in row else done).append(row)
    return done, failed


def mean_metrics(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
    scored = [r for r in rows if "psnr_stage2" in r]
    return {c: sum(float(r[c]) for r in scored) / len(scored) for c in METRIC_COLUMNS} if scored else {}


def write_rows_csv(path: Path, rows: Sequence[Dict[str, object]], fields: Sequence[str]) -> None:
    """``rows`` as CSV with the columns ``fields`` (other keys ignored), floats with 6
    decimals, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def write_results(rows: Sequence[Dict[str, object]], out_dir: Path, protocol: str, title: str,
                  notes: Sequence[str] = (), failed: Sequence[Dict[str, object]] = ()) -> Dict[str, float]:
    """``metrics.csv`` (one row per image) and ``summary.md`` (means, per image, and the
    items that failed with their reasons), both written atomically; returns the means."""
    out_dir = Path(out_dir)
    fields = ["name", "height", "width"] + METRIC_COLUMNS
    if any("scale" in r for r in rows):
        fields += ["bands", "scale"]
    write_rows_csv(out_dir / "metrics.csv", rows, fields)
    means = mean_metrics(rows)
    lines = [f"# {title}", "", f"Metric protocol: {PROTOCOLS[protocol]}.", *[f"{n}" for n in notes], ""]
    if means:
        lines += ["| images | PSNR stage 1 | SSIM stage 1 | PSNR stage 2 | SSIM stage 2 |", "|---|---|---|---|---|",
                  f"| {sum(1 for r in rows if 'psnr_stage2' in r)} | {means['psnr_stage1']:.3f} | "
                  f"{means['ssim_stage1']:.4f} | {means['psnr_stage2']:.3f} | {means['ssim_stage2']:.4f} |", "",
                  "Per image:", "", "| image | PSNR S1 | SSIM S1 | PSNR S2 | SSIM S2 |", "|---|---|---|---|---|"]
        for r in rows:
            if "psnr_stage2" in r:
                lines.append(f"| {r['name']} | {r['psnr_stage1']:.3f} | {r['ssim_stage1']:.4f} | "
                             f"{r['psnr_stage2']:.3f} | {r['ssim_stage2']:.4f} |")
    else:
        lines.append(f"{len(rows)} image(s) dehazed; no ground truth, so no scores.")
    rasters = [r for r in rows if "scale" in r]
    if rasters:
        lines += ["", "Rasters (GeoTIFF in, GeoTIFF out):", "", "| raster | width x height | RGB bands | scale |",
                  "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['width']} x {r['height']} | {r['bands']} | {r['scale']} |" for r in rasters]
    if failed:
        lines += ["", f"## Failed: {len(failed)} item(s), not in the results above", "", "| item | reason |",
                  "|---|---|"]
        lines += [f"| {r['name']} | {str(r['error']).replace('|', '/')} |" for r in failed]
    write_text_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    return means


def fmt(x: Optional[float], digits: int) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
