"""Dehaze your own scenes: one image or a folder, any size: PNG / JPEG, and GeoTIFFs
(any band layout, bit depth and size; streamed from and to disk).

    dsrdmpd-dehaze --stage1 S1.pth --stage2 model-30.pt --input photo.png --output out/
    dsrdmpd-dehaze ... --input big_scene.png --output out/ --tile 512 --overlap 64     # large images
    dsrdmpd-dehaze ... --input S2_scene.tif --output out/ --bands 4,3,2 --scale 0,3000  # satellite products
    dsrdmpd-dehaze ... --input archive/ --output out/ --resume                         # continue a killed run
    dsrdmpd-dehaze ... --input archive/ --output out/ --batch 8                        # same-size images 8 per call
    accelerate launch --num_processes 4 scripts/dehaze.py ... --input archive/ --output out/   # 4 GPUs

Results go to <output>/restored/ with the input's name (PNG keeps its bit depth, TIFFs come
back as GeoTIFFs in the input's data type and units, other formats become PNG);
summary.md lists what could not be processed and why (those files are skipped, the exit
code is then 1); a full disk ends the run (exit code 1). Images above --max-pixels are
refused from their header; large ones run tiled (--max-untiled-pixels). One run per output
folder at a time (<output>/.lock); --resume refuses a folder made with other settings
(<output>/run.json). README: "Batch runs survive".
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from ..choices import DEFAULT_MAX_RASTER_PIXELS, ScaleSpec, parse_bands, parse_scale
from .errors import run_command
from .evaluate import input_items
from .options import parse_pixels, add_model_options, add_output_options, add_run_options, parser


def build_parser():
    ap = parser("dsrdmpd-dehaze", __doc__)
    ap.add_argument("--input", required=True, type=Path, help="a hazy image or a folder of them")
    add_model_options(ap)
    add_output_options(ap)
    add_run_options(ap)
    g = ap.add_argument_group("satellite rasters (.tif / .tiff, read with GDAL; see the README's Satellite scenes)")
    g.add_argument("--bands", type=_bands, default=None, metavar="R,G,B",
                   help="the red, green and blue bands, 1-based (Sentinel-2: 4,3,2; BGR+NIR products: 3,2,1); "
                        "default: a 3-band file's bands, or the bands labelled red/green/blue")
    g.add_argument("--scale", type=_scale, default=ScaleSpec("auto"), metavar="SPEC",
                   help="values -> [0, 1] per band: auto (8-bit: 0,255; else p0.5,p99.5), LO,HI (e.g. 0,4095, "
                        "0,10000), pA,pB (percentiles of the valid pixels) or dtype (the type's full range); "
                        "the output is mapped back exactly into the input's units")
    g.add_argument("--keep-other-bands", action="store_true",
                   help="copy the bands that are not dehazed (NIR, SWIR, alpha) unchanged into the output "
                        "(default: the output holds the three dehazed bands)")
    g.add_argument("--cog", action="store_true", help="write Cloud-Optimized GeoTIFFs (with overviews)")
    g.add_argument("--max-raster-pixels", type=parse_pixels, default=DEFAULT_MAX_RASTER_PIXELS,
                   help="refuse (per item, before reading) rasters of more pixels (0: no limit)")
    return ap


def _bands(text: str):
    try:
        return parse_bands(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scale(text: str):
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    from ..raster import RasterOptions, check_rasterio, is_raster        # torch loads after the arguments are parsed
    from .batch import run_batch
    raster = RasterOptions(bands=args.bands, scale=args.scale, keep_other_bands=args.keep_other_bands, cog=args.cog,
                           max_pixels=args.max_raster_pixels)
    items = input_items(args.input)
    if any(is_raster(i.hazy) for i in items):
        check_rasterio()
    return run_batch(args, items, "DS-RDMPD dehazing", raster=raster)


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
