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

Batches: with ``batch`` > 1, :func:`run_items` runs images of the same size (after
``resize``) together, up to ``batch`` per pipeline call; everything above (failures,
records, resume, writes) stays per image, and a call that fails is redone image by image.
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .choices import DEFAULT_MAX_UNTILED_PIXELS  # noqa: F401  (re-exported)
from .data import DataError
from .imageio import (DEFAULT_MAX_PIXELS, TIFF_EXTENSIONS, check_pixel_limit, read_image, write_image,
                      write_text_atomic)
from .inference import DehazeResult, Dehazer
from .messages import one_line
from .metrics import PROTOCOLS, psnr_ssim
from .raster import RasterOptions, is_raster, dehaze_raster
from .runfolder import RunFolder, ignores_case
from .visualize import error_map, save_panel

METRIC_COLUMNS = ["psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2"]
PANEL_MIN_SIZE = 192        # small images are enlarged (nearest neighbour) in panels to stay legible
AUTO_TILE = 512             # tile size for images too large to run whole
# OSError numbers that concern the whole run (every later write would fail too): they end it.
RUN_WIDE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
T = TypeVar("T")


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


def panel_name(name: str) -> str:
    """The panel file of the item whose output is ``name``: its stem, as PNG."""
    return Path(name).stem + ".png"


def check_output_names(items: Sequence[Item], panels: int = 0, ignore_case: bool = False) -> None:
    """Two inputs that would write the same output file (e.g. a.jpg and a.png; with
    panels for the first ``panels`` items, a.png and a.tif: both panels/a.png) are refused;
    with ``ignore_case`` (the output folder's file system ignores case) also A.png and a.png."""
    seen: Dict[str, Tuple[str, Path]] = {}
    for k, item in enumerate(items):
        out = output_name(Path(item.name))
        for target in [out] + ([f"panels/{panel_name(out)}"] if k < panels else []):
            key = target.lower() if ignore_case else target     # (Unicode normalisation not compared)
            if key in seen:
                other, first = seen[key]
                if other == target:
                    raise DataError(f"{item.hazy} and {first} would both be written as {target}; rename one of them")
                raise DataError(f"{item.hazy} and {first} would be written as {target} and {other}: one file on a file "
                                f"system that ignores case, as the output folder's does; rename one of them")
            seen[key] = target, item.hazy


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


def count_non_finite(result: DehazeResult) -> Dict[str, int]:
    """{'stage-1': NaN / infinite values in ``result.coarse``, 'stage-2': in ``result.restored``}."""
    return {stage: int((~torch.isfinite(t)).sum()) for stage, t in (("stage-1", result.coarse),
                                                                    ("stage-2", result.restored))}


def check_finite(result, item: Item) -> None:
    """An output with NaN or infinite values fails its item (it would be written black)."""
    for stage, bad in count_non_finite(result).items():
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


def streams_as_raster(item: Item, raster: Optional[RasterOptions]) -> bool:
    """Whether ``item`` goes through :func:`dsrdmpd.raster.dehaze_raster` (a TIFF without GT,
    with raster options) instead of being read whole."""
    return raster is not None and item.gt is None and is_raster(item.hazy)


@dataclass
class ReadItem:
    """An item's images as the pipeline gets them (after ``resize``)."""
    hazy: torch.Tensor                 # (1, 3, H, W) float32 in [0, 1]
    gt: Optional[torch.Tensor]         # (1, 3, H, W) or None
    bit_depth: int                     # of the hazy file: outputs are written back alike
    conversion: str = ""               # what reading did to make the files RGB (imageio notes), if anything


def read_item(item: Item, resize: Optional[int] = None,
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> ReadItem:
    """Read (and resize) an item's hazy image and GT; a GT of another size is a DataError."""
    img = read_image(item.hazy, max_pixels)
    gt_img = read_image(item.gt, max_pixels) if item.gt is not None else None
    hazy, gt = img.tensor[None], (gt_img.tensor[None] if gt_img is not None else None)
    if resize:
        hazy = resize_image(hazy, resize, img.bit_depth)
        gt = resize_image(gt, resize, gt_img.bit_depth) if gt is not None else None
    elif gt is not None and gt.shape != hazy.shape:
        raise DataError(f"size mismatch: {item.hazy} is {tuple(hazy.shape[-2:])} but {item.gt} is "
                        f"{tuple(gt.shape[-2:])}")
    notes = [img.conversion, f"ground truth: {gt_img.conversion}" if gt_img is not None and gt_img.conversion else ""]
    return ReadItem(hazy, gt, img.bit_depth, "; ".join(n for n in notes if n))


def process_item(dehazer: Dehazer, item: Item, out_dir: Path, protocol: str = "paper", resize: Optional[int] = None,
                 save_coarse: bool = False, panel: bool = False,
                 raster: Optional["RasterOptions"] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_untiled_pixels: Optional[int] = DEFAULT_MAX_UNTILED_PIXELS,
                 read: Optional[ReadItem] = None) -> Dict[str, object]:
    """Dehaze one item alone, write its outputs; return its row (metrics when it has GT).
    With ``raster`` options, a TIFF without GT goes through :func:`dsrdmpd.raster.dehaze_raster`
    (GeoTIFF out, streamed; no coarse output or panel). Images above ``max_pixels`` are
    refused from their header; see :func:`dehaze_in_memory` for ``max_untiled_pixels``.
    ``read``: the item's images when already read (they are not read again)."""
    if streams_as_raster(item, raster):
        if resize:
            raise DataError(f"{item.hazy}: --resize does not apply to satellite rasters")
        note = f"dehazed with DS-RDMPD (seed {dehazer.seed}, {dehazer.steps} sampling steps)"
        return dehaze_raster(dehazer, item.hazy, out_dir / "restored" / output_name(Path(item.name)), raster, note)
    read = read or read_item(item, resize, max_pixels)
    result, tiled = dehaze_in_memory(dehazer, read.hazy, max_untiled_pixels)
    check_finite(result, item)
    return finish_item(item, read, result, tiled, out_dir, protocol, save_coarse, panel)


def finish_item(item: Item, read: ReadItem, result: DehazeResult, tiled: Optional[int], out_dir: Path,
                protocol: str = "paper", save_coarse: bool = False, panel: bool = False) -> Dict[str, object]:
    """Write an item's outputs from its (1, 3, H, W) ``result``; return its row (scores when
    it has GT; ``tiled``: the automatic tile size it ran in, if any)."""
    hazy, gt = read.hazy, read.gt
    name = output_name(Path(item.name))
    depth = output_bit_depth(item.hazy, read.bit_depth)
    write_image(result.restored[0], out_dir / "restored" / name, depth)
    if save_coarse:
        write_image(result.coarse[0], out_dir / "coarse" / name, depth)
    row: Dict[str, object] = {"name": item.name, "height": hazy.shape[-2], "width": hazy.shape[-1]}
    if tiled:
        row["tiled"] = tiled
    if read.conversion:
        row["converted"] = read.conversion
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
        save_panel(tiles, out_dir / "panels" / panel_name(name), captions, min_size=PANEL_MIN_SIZE)
    return row


def batch_key(dehazer: Dehazer, item: Item, resize: Optional[int] = None, raster: Optional[RasterOptions] = None,
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              max_untiled_pixels: Optional[int] = DEFAULT_MAX_UNTILED_PIXELS) -> Optional[Tuple[int, int]]:
    """The (height, width) ``item`` will have in the pipeline (from its header, or ``resize``),
    when it may share a pipeline call with images of that size; None when it runs alone:
    tiled (``dehazer.tile``, or above ``max_untiled_pixels``), a streamed satellite raster,
    or a header that cannot be read or is above ``max_pixels`` (the item then fails alone,
    with the reason reading it gives)."""
    if dehazer.tile is not None or streams_as_raster(item, raster):
        return None
    try:
        h, w = check_pixel_limit(item.hazy, max_pixels)
    except Exception:                  # not readable: it fails alone, when read
        return None
    if resize:
        h = w = resize
    if max_untiled_pixels and h * w > max_untiled_pixels:
        return None
    return h, w


def plan_batches(keyed: Sequence[Tuple[Optional[Tuple[int, int]], T]], batch: int) -> List[List[T]]:
    """Pipeline calls for ``(key, entry)`` pairs in item order: entries with the same key
    (image size) share a call, at most ``batch`` per call, each call's entries in item
    order and the calls in the order of their first entry; a None key, or ``batch`` 1, is a
    call of its own. Only the grouping depends on ``batch``, never an image's result."""
    calls: List[List[T]] = []
    filling: Dict[Tuple[int, int], List[T]] = {}
    for key, entry in keyed:
        if key is None or batch <= 1:
            calls.append([entry])
            continue
        call = filling.get(key)
        if call is None or len(call) >= batch:
            call = filling[key] = []
            calls.append(call)
        call.append(entry)
    return calls


def run_items(dehazer: Dehazer, items: Sequence[Item], out_dir: Path, protocol: str = "paper",
              resize: Optional[int] = None, save_coarse: bool = False, panels: int = 0,
              progress: bool = True, resume: bool = False, rank: int = 0, world: int = 1,
              raster: Optional[RasterOptions] = None, run_id: str = "",
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              max_untiled_pixels: Optional[int] = DEFAULT_MAX_UNTILED_PIXELS,
              batch: int = 1) -> List[Dict[str, object]]:
    """Process this process's share of ``items`` (every ``world``-th from ``rank``) into
    ``out_dir``; panels for the first ``panels`` items. Returns their rows in item order; a
    failed item's row is ``{'name', 'error'}``; records carry ``run_id`` (the fingerprint's
    digest) and the process that did the item. With ``resume``, items with a readable record
    of this run and an output file are skipped. Any exception of one item fails that item;
    interruptions pass through and :func:`run_wide` errors raise :class:`RunStopped`. The
    caller prepares the folder (lock, fingerprint, clearing old records:
    :class:`dsrdmpd.runfolder.RunFolder`).

    ``batch`` > 1: images of the same size share a pipeline call, up to ``batch`` per call
    (:func:`batch_key`, :func:`plan_batches`); tiled images and streamed rasters run alone.
    Each image keeps its own start noise (drawn from the seed alone, whatever its place in
    the call), so its result does not depend on ``batch`` beyond float32 rounding (PyTorch
    may pick another convolution kernel for another batch size). A call that fails, or gives
    a non-finite output for any of its images, is redone one image at a time, so only the
    bad image fails. Records, resume, the progress bar and every write stay per image."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    out_dir = Path(out_dir)
    check_output_names(items, panels, ignore_case=ignores_case(out_dir))
    mine = list(enumerate(items))[rank::world]
    with tqdm(total=len(mine), desc="dehazing", unit="img", disable=not progress or rank != 0) as bar:
        runner = ItemRunner(dehazer, out_dir, run_id, rank, bar, protocol=protocol, resize=resize,
                            save_coarse=save_coarse, panels=panels, raster=raster, max_pixels=max_pixels,
                            max_untiled_pixels=max_untiled_pixels)
        todo = []
        for k, item in mine:
            if resume and (out_dir / "restored" / output_name(Path(item.name))).is_file():
                row = runner.folder.read_record(item.name, run_id)
                if row is not None and "error" not in row:
                    runner.keep(k, row)
                    continue
            todo.append((k, item))
        keyed = [(batch_key(dehazer, item, resize, raster, max_pixels, max_untiled_pixels) if batch > 1 else None,
                  (k, item)) for k, item in todo]
        for call in plan_batches(keyed, batch):
            runner.run_call(call)
    return [row for _, row in sorted(runner.rows, key=lambda kr: kr[0])]


class ItemRunner:
    """Runs items into ``out_dir`` and records each one (:func:`run_items`'s worker): one
    item alone, or a group of same-size items in one pipeline call."""

    def __init__(self, dehazer: Dehazer, out_dir: Path, run_id: str, rank: int, bar, **settings):
        self.dehazer, self.out_dir, self.run_id, self.rank, self.bar = dehazer, out_dir, run_id, rank, bar
        self.folder = RunFolder(out_dir)
        self.protocol, self.resize = settings["protocol"], settings["resize"]
        self.save_coarse, self.panels, self.raster = settings["save_coarse"], settings["panels"], settings["raster"]
        self.max_pixels, self.max_untiled_pixels = settings["max_pixels"], settings["max_untiled_pixels"]
        self.rows: List[Tuple[int, Dict[str, object]]] = []
        self.done_now = 0

    def keep(self, k: int, row: Dict[str, object]) -> None:
        """An item done by an earlier run (resume)."""
        self.rows.append((k, row))
        self.bar.update(1)

    def attempt(self, k: int, item: Item, work: Callable[[], Any]) -> Any:
        """``work()`` for one item; any exception fails that item only (recorded with its
        reason; returns None), a :func:`run_wide` one raises :class:`RunStopped`."""
        try:
            return work()
        except Exception as exc:                   # one item's failure; interruptions are not Exceptions
            if run_wide(exc):
                raise RunStopped(f"{self.out_dir}: {one_line(exc)}; the run stopped at {item.name!r} "
                                 f"({self.done_now} item(s) done in this run are kept; free space "
                                 f"and continue with --resume)") from exc
            row = {"name": item.name, "error": one_line(exc)}
            tqdm.write(f"skipped: {row['error']}")
            self.record(k, item, row)
            return None

    def record(self, k: int, item: Item, row: Dict[str, object]) -> None:
        """Record item ``k``'s row (done or failed) and count it in the progress bar."""
        try:
            self.folder.write_record(item.name, row, self.run_id, self.rank)
        except OSError as exc:
            if run_wide(exc):
                raise RunStopped(f"{self.out_dir}: {one_line(exc)} while recording {item.name!r}; the run stopped "
                                 f"(free space and continue with --resume)") from exc
            tqdm.write(f"warning: {item.name!r} could not be recorded ({one_line(exc)}); it counts as not processed")
        self.rows.append((k, row))
        self.done_now += "error" not in row
        self.bar.update(1)

    def run_alone(self, k: int, item: Item, read: Optional[ReadItem] = None) -> None:
        """Item ``k`` in a pipeline call of its own (:func:`process_item`), from ``read`` if given."""
        row = self.attempt(k, item, lambda: process_item(
            self.dehazer, item, self.out_dir, self.protocol, self.resize, self.save_coarse, k < self.panels,
            self.raster, self.max_pixels, self.max_untiled_pixels, read))
        if row is not None:
            self.record(k, item, row)

    def run_call(self, call: Sequence[Tuple[int, Item]]) -> None:
        """The items of one planned call: read each (a failure fails that item), then one
        pipeline call per size actually read (normally one), else each alone."""
        if len(call) == 1:
            self.run_alone(*call[0])
            return
        ready: Dict[Tuple[int, ...], list] = {}
        for k, item in call:
            read = self.attempt(k, item, lambda: read_item(item, self.resize, self.max_pixels))
            if read is not None:
                ready.setdefault(tuple(read.hazy.shape), []).append((k, item, read))
        for same in ready.values():
            result = self.together([read for _, _, read in same]) if len(same) > 1 else None
            if result is None:
                for k, item, read in same:
                    self.run_alone(k, item, read)
                continue
            for i, (k, item, read) in enumerate(same):
                one = DehazeResult(result.coarse[i:i + 1], result.restored[i:i + 1])
                row = self.attempt(k, item, lambda: finish_item(item, read, one, None, self.out_dir, self.protocol,
                                                             self.save_coarse, k < self.panels))
                if row is not None:
                    self.record(k, item, row)

    def together(self, reads: Sequence[ReadItem]) -> Optional[DehazeResult]:
        """One pipeline call on same-size images; None when it fails or any output value
        is not finite (the caller then runs them one by one)."""
        try:
            result = self.dehazer(torch.cat([r.hazy for r in reads]))
        except Exception as exc:                   # e.g. out of memory: each image alone may still fit
            if out_of_memory(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write(f"a call of {len(reads)} images failed ({one_line(exc)}); running them one by one")
            return None
        if any(count_non_finite(result).values()):
            tqdm.write(f"a call of {len(reads)} images gave non-finite values; running them one by one")
            return None
        return result


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
    """``metrics.csv`` (one row per image) and ``summary.md`` (means, per image, what reading
    converted per image, and the items that failed with their reasons), both written
    atomically; returns the means."""
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
    converted = [r for r in rows if r.get("converted")]
    if converted:
        lines += ["", "Converted on reading (the results are of the converted image):", "", "| image | conversion |",
                  "|---|---|", *[f"| {cell(r['name'])} | {cell(r['converted'])} |" for r in converted]]
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
