"""Dehaze a list of images (with or without ground truth), save the results, score them,
and write a per-image CSV plus a markdown summary that names the metric protocol.

Scores are computed on the float outputs before saving (the paper's protocol). Saved
images keep the input's format where it can hold the result: PNG and TIFF keep their bit
depth (8 or 16), other formats become 8-bit PNG.

Batch runs survive bad items and kills. Any exception while doing one item (a file that
cannot be decoded, an image above the pixel limit, a size mismatch, running out of
memory, a name the file system refuses, a network-file error, an output that is not
finite) fails that item only: it is recorded with its reason and the run goes on. Only an
interruption (Ctrl-C, SIGTERM) and errors that concern the whole run end it: a full disk,
an exceeded quota or a read-only file system (:data:`RUN_WIDE_ERRNOS`) raise
:class:`RunStopped`. Every finished item leaves a record (see :mod:`dsrdmpd.runfolder`)
beside its written image, so a killed run resumed with ``resume=True`` skips what is done
and ends with the same ``metrics.csv`` / ``summary.md`` as an uninterrupted one. Every
file is written atomically. Items can be split across processes (``rank``, ``world``);
the records of all processes are merged afterwards by :func:`collect_rows`.

Memory: without a tile size, an image of more than ``max_untiled_pixels`` (default 4 Mpx,
2048 x 2048) runs in :data:`AUTO_TILE` x :data:`AUTO_TILE` tiles, and an image that runs
out of memory untiled is retried once in such tiles; its row then says ``tiled``.
"""
from __future__ import annotations

import copy
import csv
import errno
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import DataError
from .imageio import DEFAULT_MAX_PIXELS, TIFF_EXTENSIONS, read_image, write_image, write_text_atomic
from .inference import Dehazer
from .metrics import PROTOCOLS, psnr_ssim
from .raster import RasterOptions, is_raster, dehaze_raster
from .runfolder import RunFolder
from .visualize import error_map, save_panel

METRIC_COLUMNS = ["psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2"]
PANEL_MIN_SIZE = 192        # small images are enlarged (nearest neighbour) in panels to stay legible
AUTO_TILE = 512             # tile size for images too large to run whole
DEFAULT_MAX_UNTILED_PIXELS = 2048 * 2048
# OSError numbers that concern the whole run (every later write would fail too): they end it.
RUN_WIDE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class RunStopped(RuntimeError):
    """An error that concerns the whole run (disk full, quota, read-only file system)."""


def run_wide(exc: BaseException) -> bool:
    """Whether ``exc`` ends the run instead of failing one item."""
    if isinstance(exc, OSError) and exc.errno in RUN_WIDE_ERRNOS:
        return True
    text = str(exc)         # GDAL / rasterio report a full disk without an errno
    return any(os.strerror(n) in text for n in RUN_WIDE_ERRNOS)


def out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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


def with_tiles(dehazer: Dehazer, tile: Optional[int] = None) -> Dehazer:
    """The same Dehazer (same networks, settings) running in ``tile`` x ``tile`` tiles
    (default AUTO_TILE)."""
    tile = tile or AUTO_TILE
    tiled = copy.copy(dehazer)
    tiled.tile, tiled.overlap = tile, min(dehazer.overlap, tile // 2)
    return tiled


def check_finite(result, item: Item) -> None:
    """An output with NaN or infinite values fails its item (it would be written black)."""
    for stage, t in (("stage-1", result.coarse), ("stage-2", result.restored)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise DataError(f"{item.hazy}: the {stage} output has {bad} NaN or infinite value(s) (check the "
                            f"checkpoint and the sampling settings); nothing written")


def dehaze_in_memory(dehazer: Dehazer, hazy: torch.Tensor, max_untiled_pixels: Optional[int]):
    """Run ``dehazer`` on (1, 3, H, W); returns (result, tile size used when tiled
    automatically or None). Untiled images above ``max_untiled_pixels``, or that run out of
    memory, run in AUTO_TILE tiles."""
    if dehazer.tile is not None:
        return dehazer(hazy), None
    h, w = hazy.shape[-2:]
    if max_untiled_pixels and h * w > max_untiled_pixels:
        tiled = with_tiles(dehazer)
        return tiled(hazy), tiled.tile
    try:
        return dehazer(hazy), None
    except Exception as exc:
        if not out_of_memory(exc):
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tiled = with_tiles(dehazer)
    return tiled(hazy), tiled.tile


def process_item(dehazer: Dehazer, item: Item, out_dir: Path, protocol: str = "paper", resize: Optional[int] = None,
                 save_coarse: bool = False, panel: bool = False,
                 raster: Optional["RasterOptions"] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_untiled_pixels: Optional[int] = DEFAULT_MAX_UNTILED_PIXELS) -> Dict[str, object]:
    """Dehaze one item, write its outputs; return its row (metrics when it has GT). With
    ``raster`` options, a TIFF without GT goes through :func:`dsrdmpd.raster.dehaze_raster`
    (GeoTIFF out, streamed; no coarse output or panel). Images above ``max_pixels`` are
    refused from their header; see :func:`dehaze_in_memory` for ``max_untiled_pixels``."""
    if raster is not None and item.gt is None and is_raster(item.hazy):
        if resize:
            raise DataError(f"{item.hazy}: --resize does not apply to satellite rasters")
        note = f"dehazed with DS-RDMPD (seed {dehazer.seed}, {dehazer.steps} sampling steps)"
        return dehaze_raster(dehazer, item.hazy, out_dir / "restored" / output_name(Path(item.name)), raster, note)
    img = read_image(item.hazy, max_pixels)
    gt_img = read_image(item.gt, max_pixels) if item.gt is not None else None
    hazy, gt = img.tensor[None], (gt_img.tensor[None] if gt_img is not None else None)
    if resize:
        hazy = resize_image(hazy, resize, img.bit_depth)
        gt = resize_image(gt, resize, gt_img.bit_depth) if gt is not None else None
    elif gt is not None and gt.shape != hazy.shape:
        raise DataError(f"size mismatch: {item.hazy} is {tuple(hazy.shape[-2:])} but {item.gt} is "
                        f"{tuple(gt.shape[-2:])}")
    result, tiled = dehaze_in_memory(dehazer, hazy, max_untiled_pixels)
    check_finite(result, item)
    name = output_name(Path(item.name))
    depth = output_bit_depth(item.hazy, img.bit_depth)
    write_image(result.restored[0], out_dir / "restored" / name, depth)
    if save_coarse:
        write_image(result.coarse[0], out_dir / "coarse" / name, depth)
    row: Dict[str, object] = {"name": item.name, "height": hazy.shape[-2], "width": hazy.shape[-1]}
    if tiled:
        row["tiled"] = tiled
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
              raster: Optional[RasterOptions] = None, run_id: str = "",
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              max_untiled_pixels: Optional[int] = DEFAULT_MAX_UNTILED_PIXELS) -> List[Dict[str, object]]:
    """Process this process's share of ``items`` (every ``world``-th from ``rank``) into
    ``out_dir``; panels for the first ``panels`` items. Returns their rows; a failed item's
    row is ``{'name', 'error'}``; records carry ``run_id`` (the fingerprint's digest) and the
    process that did the item. With ``resume``, items with a readable record of this run and
    an output file are skipped. Any exception of one item fails that item; interruptions
    pass through and :func:`run_wide` errors raise :class:`RunStopped`. The caller prepares
    the folder (lock, fingerprint, clearing old records: :class:`dsrdmpd.runfolder.RunFolder`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    out_dir = Path(out_dir)
    folder = RunFolder(out_dir)
    check_output_names(items)
    mine = list(enumerate(items))[rank::world]
    rows = []
    done_before = 0
    for k, item in tqdm(mine, desc="dehazing", unit="img", disable=not progress or rank != 0):
        if resume and (out_dir / "restored" / output_name(Path(item.name))).is_file():
            row = folder.read_record(item.name, run_id)
            if row is not None and "error" not in row:
                rows.append(row)
                done_before += 1
                continue
        try:
            row = process_item(dehazer, item, out_dir, protocol, resize, save_coarse, k < panels, raster,
                               max_pixels, max_untiled_pixels)
        except Exception as exc:                   # one item's failure; interruptions are not Exceptions
            if run_wide(exc):
                raise RunStopped(f"{out_dir}: {one_line(exc)}; the run stopped at {item.name!r} "
                                 f"({len(rows) - done_before} item(s) done in this run are kept; free space "
                                 f"and continue with --resume)") from exc
            row = {"name": item.name, "error": one_line(exc)}
            tqdm.write(f"skipped: {row['error']}")
        try:
            folder.write_record(item.name, row, run_id, rank)
        except OSError as exc:
            if run_wide(exc):
                raise RunStopped(f"{out_dir}: {one_line(exc)} while recording {item.name!r}; the run stopped "
                                 f"(free space and continue with --resume)") from exc
            tqdm.write(f"warning: {item.name!r} could not be recorded ({one_line(exc)}); it counts as not processed")
        rows.append(row)
    return rows


def collect_rows(items: Sequence[Item], out_dir: Path,
                 run_id: Optional[str] = None) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """All items' rows in item order, from the records (of run ``run_id`` when given):
    (done rows, failed rows). An item without a readable record (its process died) counts
    as failed."""
    folder = RunFolder(out_dir)
    done, failed = [], []
    for item in items:
        row = folder.read_record(item.name, run_id) or {"name": item.name, "error": "not processed"}
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


def cell(value: object) -> str:
    """``value`` as a markdown table cell: '|' escaped, line breaks shown as '\\n'."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


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
                lines.append(f"| {cell(r['name'])} | {r['psnr_stage1']:.3f} | {r['ssim_stage1']:.4f} | "
                             f"{r['psnr_stage2']:.3f} | {r['ssim_stage2']:.4f} |")
    else:
        lines.append(f"{len(rows)} image(s) dehazed; no ground truth, so no scores.")
    rasters = [r for r in rows if "scale" in r]
    if rasters:
        lines += ["", "Rasters (GeoTIFF in, GeoTIFF out):", "", "| raster | width x height | RGB bands | scale |",
                  "|---|---|---|---|"]
        lines += [f"| {cell(r['name'])} | {r['width']} x {r['height']} | {cell(r['bands'])} | {cell(r['scale'])} |"
                  for r in rasters]
    tiled = [r for r in rows if r.get("tiled")]
    if tiled:
        lines += ["", f"Run in {tiled[0]['tiled']} x {tiled[0]['tiled']} tiles automatically (too large to run "
                  f"whole): {', '.join(cell(r['name']) for r in tiled)}."]
    lines += failed_lines(failed, "item")
    write_text_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    return means


def failed_lines(failed: Sequence[Dict[str, object]], noun: str = "item") -> List[str]:
    """The summary's "Failed" section (name and reason per row, cells escaped); [] when none failed."""
    if not failed:
        return []
    return ["", f"## Failed: {len(failed)} {noun}(s), not in the results above", "", f"| {noun} | reason |",
            "|---|---|", *[f"| {cell(r['name'])} | {cell(r['error'])} |" for r in failed]]


def fmt(x: Optional[float], digits: int) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
