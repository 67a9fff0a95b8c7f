"""Satellite products: a GDAL raster (GeoTIFF) in, a GeoTIFF out, streamed window by window.

    from dsrdmpd.raster import RasterOptions, dehaze_raster
    dehaze_raster(dehazer, "S2_scene.tif", "out/S2_scene.tif", RasterOptions(bands=[4, 3, 2]))

* Bands: ``bands`` (1-based, GDAL's numbering) pick red, green and blue. Default: a
  3-band file -> 1,2,3; otherwise bands whose colour interpretation or description says
  red / green / blue (a 4-band RGB + alpha file -> 1,2,3, the alpha band acting as a
  mask); anything else is refused with the band count and descriptions.
* Radiometry: :mod:`dsrdmpd.radiometry` (``--scale``), statistics from the valid pixels
  (of 64 windows of 256 x 256 spread over scenes above 4 Mpx, or of a decimated read
  when the windows miss every valid pixel); written back in the input's units and data
  type, exactly inverted.
* Nodata and masks: GDAL's per-band masks (nodata, alpha, internal masks) mark invalid
  pixels; they are left out of the statistics, filled with the band's median for the
  networks, and written back with their input values (nodata stays nodata; a pixel that is
  nodata in one band only keeps its other bands' values, not dehazed; the output's mask
  when the input has no nodata value). Tiles with no valid pixel are not run at all.
* Output: the same size, CRS, transform (or ground control points, or RPCs), nodata, data
  type, band order, descriptions, colour interpretation, scales / offsets / units and tags
  (every KEY=VALUE metadata domain but the structural ones), plus the mapping used
  (``DSRDMPD_SCALE`` tags); tiled 256 x 256, DEFLATE with a predictor, BigTIFF when
  needed; ``cog=True`` writes a Cloud-Optimized GeoTIFF (GDAL's COG driver keeps the
  default metadata domain only). Bands not dehazed are dropped,
  or copied unchanged with ``keep_other_bands``. The file appears only when complete
  (written through :func:`dsrdmpd.atomicfile.atomic_path`: synced, the umask's mode).
  An output that is not finite is refused (nothing written).
* Size limit: a raster of more than ``max_pixels`` pixels (default
  :data:`DEFAULT_MAX_RASTER_PIXELS`, 4000 Mpx; a sparse file can declare any size) is
  refused before anything is read. A file GDAL cannot read (a corrupt tile) is reported
  with the file's name and GDAL's own cause.
* Memory: the scene is read and written window by window. Tiles run through
  :class:`~dsrdmpd.inference.Dehazer` exactly as an in-memory tiled scene would (same
  tiles, batches, noise and blend order: the same result, tested); only a band of
  rows (tile + stride + 256 rows, the full width) is held, so memory grows with the
  scene's width, not its area.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomicfile import atomic_path
from .choices import DEFAULT_MAX_RASTER_PIXELS, parse_bands  # noqa: F401  (re-exported)
from .data import DataError
from .inference import Dehazer
from .messages import megapixels
from .radiometry import BandScale, ScaleError, ScaleSpec, resolve_scale

RASTER_EXTENSIONS = (".tif", ".tiff")
DEFAULT_TILE = 512
OUTPUT_BLOCK = 256          # output GeoTIFF tile side; rows are written in whole blocks
STATS_PIXELS = 1 << 22      # scenes up to ~4 Mpx: statistics from every pixel
STATS_WINDOWS = 8           # larger ones: 8 x 8 windows of 256 x 256 (4 Mpx) spread over the scene


class RasterError(DataError):
    """A raster that cannot be dehazed as asked (bands, values, format)."""


@dataclass
class RasterOptions:
    bands: Optional[List[int]] = None         # red, green, blue (1-based); None: from the file
    scale: ScaleSpec = field(default_factory=lambda: ScaleSpec("auto"))
    keep_other_bands: bool = False
    cog: bool = False
    tile: Optional[int] = None                # None: the Dehazer's tile, else DEFAULT_TILE
    progress: bool = True
    max_pixels: Optional[int] = DEFAULT_MAX_RASTER_PIXELS    # None: no limit


def check_rasterio() -> None:
    """rasterio (GDAL) is there, or a one-line error saying how to get it."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        raise RasterError("reading GeoTIFFs needs rasterio (GDAL): pip install rasterio") from None


def is_raster(path: Path) -> bool:
    return Path(path).suffix.lower() in RASTER_EXTENSIONS


def _band_summary(src) -> str:
    parts = []
    for i in range(1, src.count + 1):
        desc = src.descriptions[i - 1] or "-"
        parts.append(f"{i}: {desc} ({src.colorinterp[i - 1].name})")
    return "; ".join(parts)


def choose_bands(src, bands: Optional[Sequence[int]], name: str) -> Tuple[List[int], Optional[int]]:
    """(red, green, blue band numbers, alpha band number or None) for an open dataset."""
    from rasterio.enums import ColorInterp
    interp = list(src.colorinterp)
    alpha = next((i + 1 for i, c in enumerate(interp) if c == ColorInterp.alpha), None)
    if bands is not None:
        bad = [b for b in bands if b > src.count]
        if bad:
            raise RasterError(f"{name}: --bands {','.join(map(str, bands))} asks for band {bad[0]}, but the file has "
                              f"{src.count} band(s) ({_band_summary(src)})")
        return list(bands), alpha
    if src.count < 3:
        raise RasterError(f"{name}: {src.count} band(s) ({_band_summary(src)}); dehazing needs red, green and "
                          f"blue bands")
    if src.count == 3:
        return [1, 2, 3], None
    by_interp = [next((i + 1 for i, c in enumerate(interp) if c == want), None)
                 for want in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
    if None not in by_interp:
        return by_interp, alpha
    descs = [(d or "").lower() for d in src.descriptions]
    by_desc = []
    for word in ("red", "green", "blue"):
        hits = [i + 1 for i, d in enumerate(descs) if word in d.replace("_", " ").split() or d == word]
        exact = [i + 1 for i, d in enumerate(descs) if d == word]     # 'blue' beside 'coastal_blue'
        by_desc.append(exact[0] if len(exact) == 1 else hits[0] if len(hits) == 1 else None)
    if None not in by_desc and len(set(by_desc)) == 3:
        return by_desc, alpha
    raise RasterError(f"{name}: {src.count} band(s) and no way to tell which are red, green and blue "
                      f"({_band_summary(src)}); choose them with --bands R,G,B, e.g. --bands 3,2,1 for "
                      f"a blue, green, red, NIR product, --bands 4,3,2 for Sentinel-2")


def _valid(masks: np.ndarray) -> np.ndarray:
    """GDAL masks (C, h, w) uint8, 255 = valid -> (h, w) bool, valid in every band."""
    return np.all(masks > 0, axis=0)


def _statistics(src, bands: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Values (C, h, w) and validity (h, w) to take statistics from: the whole scene when it
    has at most STATS_PIXELS pixels, else a mosaic of STATS_WINDOWS x STATS_WINDOWS windows
    of 256 x 256 spread evenly over it (aligned to the file's blocks; GDAL's decimated reads
    of a compressed file without overviews are far slower than reading whole blocks), or,
    when no window holds a valid pixel, a decimated read of the whole scene."""
    from rasterio.windows import Window
    h, w = src.height, src.width
    if h * w <= STATS_PIXELS:
        values = src.read(bands)
        return values, _valid(src.read_masks(bands)) & np.all(np.isfinite(values), axis=0)
    side = 256
    bh, bw = src.block_shapes[bands[0] - 1]
    bh, bw = (b if b <= side else 1 for b in (bh, bw))       # strips span the width: no alignment across
    def starts(n, b):
        return sorted({min(n - side, int(round(p)) // b * b) for p in np.linspace(0, n - side, STATS_WINDOWS)})
    rows = []
    for y in starts(h, bh):
        windows = [Window(x, y, side, side) for x in starts(w, bw)]
        tiles = [(src.read(bands, window=win), src.read_masks(bands, window=win)) for win in windows]
        rows.append((np.concatenate([t[0] for t in tiles], axis=2), np.concatenate([t[1] for t in tiles], axis=2)))
    values = np.concatenate([r[0] for r in rows], axis=1)
    masks = np.concatenate([r[1] for r in rows], axis=1)
    valid = _valid(masks) & np.all(np.isfinite(values), axis=0)
    if not valid.any():     # the windows missed the valid part (a small area in a nodata frame)
        f = int(np.ceil(np.sqrt(h * w / STATS_PIXELS)))
        shape = (len(bands), -(-h // f), -(-w // f))      # every f-th pixel of the whole scene
        values = src.read(bands, out_shape=shape)
        valid = _valid(src.read_masks(bands, out_shape=shape)) & np.all(np.isfinite(values), axis=0)
    return values, valid


def _pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    return x if ph == 0 and pw == 0 else F.pad(x, (0, pw, 0, ph), mode=mode)


def _output_profile(src, count: int) -> Dict:
    profile = src.profile.copy()
    for key in ("photometric", "blockxsize", "blockysize", "tiled", "compress", "predictor", "interleave"):
        profile.pop(key, None)
    kind = np.dtype(src.dtypes[0]).kind
    profile.update(driver="GTiff", count=count, tiled=True, blockxsize=OUTPUT_BLOCK, blockysize=OUTPUT_BLOCK,
                   compress="deflate", predictor=3 if kind == "f" else 2, bigtiff="if_safer", interleave="pixel")
    return profile


# metadata domains GDAL derives from the file's structure or that are copied otherwise (RPCs)
STRUCTURAL_DOMAINS = ("IMAGE_STRUCTURE", "DERIVED_SUBDATASETS", "SUBDATASETS", "RPC", "GEOLOCATION")


def _copy_tags(src, dst, band: int = 0, out_band: int = 0) -> None:
    """Copy the tags of ``band`` (0: the dataset) to ``out_band``: the default domain and every
    other KEY=VALUE domain (e.g. IMAGERY's acquisition date and cloud cover), not the
    structural ones nor XML documents."""
    dst.update_tags(out_band, **src.tags(band))
    for ns in src.tag_namespaces(band):
        if ns not in STRUCTURAL_DOMAINS and not ns.startswith("xml:"):
            dst.update_tags(out_band, ns=ns, **src.tags(band, ns=ns))


def _copy_metadata(src, dst, out_bands: List[int], scale: BandScale, dehazed: List[int], note: str) -> None:
    if src.gcps[0]:                     # georeferenced by ground control points (an unrectified scene)
        dst.gcps = src.gcps
    if src.rpcs is not None:            # or by rational polynomial coefficients (a sensor model)
        dst.rpcs = src.rpcs
    _copy_tags(src, dst)
    dst.update_tags(DSRDMPD=note, DSRDMPD_SCALE=scale.describe(dehazed))
    for k, b in enumerate(out_bands, start=1):
        if src.descriptions[b - 1]:
            dst.set_band_description(k, src.descriptions[b - 1])
        _copy_tags(src, dst, b, k)
        if b in dehazed:
            j = dehazed.index(b)
            dst.update_tags(k, DSRDMPD_SCALE_MIN=f"{scale.lo[j]:.17g}", DSRDMPD_SCALE_MAX=f"{scale.hi[j]:.17g}")
    try:
        dst.colorinterp = [src.colorinterp[b - 1] for b in out_bands]
    except Exception:       # some interpretations cannot be set on some band layouts: keep GDAL's
        pass
    dst.scales = [src.scales[b - 1] for b in out_bands]
    dst.offsets = [src.offsets[b - 1] for b in out_bands]
    dst.units = [src.units[b - 1] or "" for b in out_bands]


def _avoid_nodata(values: np.ndarray, valid: np.ndarray, nodata) -> np.ndarray:
    """Valid pixels whose output equals the nodata value are moved one step off it."""
    if nodata is None or np.isnan(nodata):
        return values
    hit = (values == values.dtype.type(nodata)) & valid[None]
    if hit.any():
        kind = values.dtype.kind
        if kind in "ui":
            step = 1 if nodata < np.iinfo(values.dtype).max else -1
            values[hit] = values.dtype.type(nodata + step)
        else:
            values[hit] = np.nextafter(values.dtype.type(nodata), values.dtype.type(np.inf))
    return values


def dehaze_raster(dehazer: Dehazer, src_path, dst_path, options: Optional[RasterOptions] = None,
                  note: str = "") -> Dict[str, object]:
    """Dehaze one raster into ``dst_path`` (a GeoTIFF); returns a summary row."""
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    with warnings.catch_warnings():             # plain TIFFs without georeferencing are fine
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return _dehaze_raster(dehazer, src_path, dst_path, options, note)
        except RasterioIOError as exc:          # e.g. a corrupt tile: "Read failed. See previous exception."
            raise RasterError(f"{src_path}: {gdal_message(exc)}") from None


def gdal_message(exc: BaseException) -> str:
    """``exc`` and the GDAL errors chained to it (its causes), on one line, without repeats."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).replace("See previous exception for details.", "").split()).rstrip(".")
        if text and not any(text in p for p in parts):
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return "; ".join(parts) or "read failed"


GDAL_CACHE_MB = 256     # GDAL's block cache while a raster is read and written


def _dehaze_raster(dehazer: Dehazer, src_path, dst_path, options: Optional[RasterOptions], note: str):
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window
    options = options or RasterOptions()
    src_path, dst_path = Path(src_path), Path(dst_path)
    name = str(src_path)
    try:
        src = rasterio.open(src_path)
    except RasterioIOError as exc:
        raise RasterError(f"{name}: cannot be read as a raster ({' '.join(str(exc).split())})") from None
    with src, rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_CACHEMAX=GDAL_CACHE_MB):
        if options.max_pixels is not None and src.width * src.height > options.max_pixels:
            raise RasterError(f"{name}: {src.width} x {src.height} pixels ({megapixels(src.width * src.height)}) "
                              f"is above the raster size limit of {megapixels(options.max_pixels)} "
                              f"(--max-raster-pixels)")
        if len(set(src.dtypes)) != 1:
            raise RasterError(f"{name}: bands of different data types ({', '.join(src.dtypes)}) are not supported")
        dtype = np.dtype(src.dtypes[0])
        if dtype.kind not in "uif":
            raise RasterError(f"{name}: data type {dtype.name} is not supported (integers or floats only)")
        rgb, alpha = choose_bands(src, options.bands, name)
        others = [b for b in range(1, src.count + 1) if b not in rgb]
        out_bands = sorted(rgb + others) if options.keep_other_bands else sorted(rgb)
        order = [rgb.index(b) for b in sorted(rgb)]            # network channel of each written RGB band
        try:
            scale = resolve_scale(options.scale, dtype, *_statistics(src, rgb), name=name)
        except ScaleError as exc:
            raise RasterError(str(exc)) from None
        h, w = src.height, src.width
        plan = dehazer.tile_plan(h, w, options.tile or dehazer.tile or DEFAULT_TILE)
        th, tw = plan.tile_h, plan.tile_w
        stride = th - plan.overlap if len(plan.windows) > 1 else th
        weight = plan.weight()[0]                             # (1, th, tw)
        flags = src.mask_flag_enums[rgb[0] - 1]
        write_mask = src.nodata is None and (MaskFlags.per_dataset in flags or MaskFlags.alpha in flags)
        print(f"{src_path.name}: {w} x {h}, {src.count} band(s) {dtype.name}; RGB = bands {','.join(map(str, rgb))}; "
              f"scale {scale.describe(rgb)}; {len(plan.windows)} tile(s) of {th} x {tw}")

        def read_tile(y, x):
            """Network input of the tile at (y, x) in padded coordinates: (3, th, tw), and whether
            it has any valid pixel."""
            rh, rw = min(th, h - y), min(tw, w - x)
            win = Window(x, y, rw, rh)
            values = src.read(rgb, window=win)
            valid = _valid(src.read_masks(rgb, window=win)) & np.all(np.isfinite(values), axis=0)
            unit = scale.to_unit(values, valid)
            return _pad(unit[None], th - rh, tw - rw, plan.pad_mode)[0], bool(valid.any())

        with atomic_path(dst_path) as tmp:
            with rasterio.open(tmp, "w", **_output_profile(src, len(out_bands))) as dst:
                _copy_metadata(src, dst, out_bands, scale, rgb, note)
                per_row = len({x for _, x in plan.windows})
                extra_rows = -(-(dehazer.tile_batch - 1) // per_row)      # tile rows a chunk reaches past its first
                cap = th + stride * extra_rows + OUTPUT_BLOCK
                acc = torch.zeros(3, cap, plan.padded[1])
                norm = torch.zeros(1, cap, plan.padded[1])
                base = 0                                    # padded row held at acc[:, 0]

                def write_rows(y0: int, y1: int):
                    """Write the finished real rows [y0, y1) (held at acc[:, y0 - base])."""
                    n, off = y1 - y0, y0 - base
                    win = Window(0, y0, w, n)
                    restored = acc[:, off:off + n, :w] / norm[:, off:off + n, :w].clamp_min(1e-12)
                    bad = int((~torch.isfinite(restored)).sum())
                    if bad:
                        raise RasterError(f"{name}: the output has {bad} NaN or infinite value(s) in rows "
                                          f"{y0}-{y1 - 1} (check the checkpoint and the sampling settings); "
                                          f"nothing written")
                    values = src.read(rgb, window=win)
                    valid = _valid(src.read_masks(rgb, window=win)) & np.all(np.isfinite(values), axis=0)
                    out = scale.from_unit(restored.clamp(0, 1), values, dtype)
                    if src.nodata is not None:
                        out = _avoid_nodata(out, valid, src.nodata)
                    # pixels the networks did not see keep their values in every band: nodata stays
                    # nodata, masked pixels keep theirs, and a pixel that is nodata in one band only
                    # keeps its other bands' valid values
                    out[:, ~valid] = values[:, ~valid]
                    # every band of an output block in one write: band by band, a pixel-interleaved
                    # block leaves GDAL's cache half written when the row band is larger than the
                    # cache, and is compressed and appended again for each band (a file many times
                    # its size); one column of blocks at a time holds all bands of one block only
                    for x0 in range(0, w, OUTPUT_BLOCK):
                        cols = Window(x0, y0, min(OUTPUT_BLOCK, w - x0), n)
                        block = np.empty((len(out_bands), n, cols.width), dtype)
                        for k, b in enumerate(sorted(rgb)):
                            block[out_bands.index(b)] = out[order[k], :, x0:x0 + cols.width]
                        if options.keep_other_bands and others:
                            for b, values_b in zip(others, src.read(others, window=cols)):
                                block[out_bands.index(b)] = values_b
                        dst.write(block, window=cols)
                    if write_mask:
                        dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=win)

                def flush(upto: int):
                    """Write the finished rows [base, upto), OUTPUT_BLOCK rows at a time, and drop them."""
                    nonlocal base
                    for y0 in range(base, min(upto, h), OUTPUT_BLOCK):
                        write_rows(y0, min(y0 + OUTPUT_BLOCK, upto, h))
                    shift = min(max(0, upto - base), cap)
                    if shift:
                        for buf in (acc, norm):             # move the kept rows up, in place, no copy of the buffer
                            for i in range(0, cap - shift, shift):
                                m = min(shift, cap - shift - i)
                                buf[:, i:i + m].copy_(buf[:, shift + i:shift + i + m])
                            buf[:, cap - shift:].zero_()
                        base = upto

                jobs = list(plan.windows)
                bar = tqdm(total=len(jobs), desc=src_path.name, unit="tile", disable=not options.progress,
                           leave=False)
                for k in range(0, len(jobs), dehazer.tile_batch):
                    chunk = jobs[k:k + dehazer.tile_batch]
                    tiles = [read_tile(y, x) for y, x in chunk]
                    run = [j for j, (_, any_valid) in enumerate(tiles) if any_valid]
                    if run:
                        xs = torch.stack([tiles[j][0] for j in run])
                        ns = torch.cat([dehazer.tile_noise(plan, *chunk[j]) for j in run])
                        _, r = dehazer.run_tiles(xs, ns)
                        for i, j in enumerate(run):
                            y, x = chunk[j]
                            if y + th - base > cap:
                                raise RuntimeError("row buffer overflow (a bug)")
                            acc[:, y - base:y - base + th, x:x + tw] += r[i] * weight
                            norm[:, y - base:y - base + th, x:x + tw] += weight
                    bar.update(len(chunk))
                    done_rows = jobs[k + len(chunk)][0] if k + len(chunk) < len(jobs) else plan.padded[0]
                    if done_rows >= plan.padded[0]:
                        flush(plan.padded[0])
                    else:
                        flush(base + (done_rows - base) // OUTPUT_BLOCK * OUTPUT_BLOCK)
                bar.close()
            if options.cog:
                _to_cog(tmp)
    return {"name": src_path.name, "height": h, "width": w, "bands": ",".join(map(str, rgb)),
            "scale": scale.describe(rgb)}


def _to_cog(path: Path) -> None:
    """Rewrite the GeoTIFF at ``path`` as a Cloud-Optimized GeoTIFF (overviews included)."""
    import rasterio.shutil
    cog = path.with_name(path.name + ".cog.tif")
    try:
        with rasterio.open(path) as src:
            predictor = "3" if np.dtype(src.dtypes[0]).kind == "f" else "2"
        rasterio.shutil.copy(path, cog, driver="COG", COMPRESS="DEFLATE", PREDICTOR=predictor, BIGTIFF="IF_SAFER")
        os.replace(cog, path)
    finally:
        cog.unlink(missing_ok=True)
