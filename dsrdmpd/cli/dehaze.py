"""Dehaze your own scenes: one image or a folder, any size, PNG / JPEG / TIFF (8 or 16 bit).

    dsrdmpd-dehaze --stage1 S1.pth --stage2 model-30.pt --input scene.tif --output out/
    dsrdmpd-dehaze ... --input big_scene.tif --output out/ --tile 512 --overlap 64     # large scenes
    dsrdmpd-dehaze ... --input archive/ --output out/ --resume                         # continue a killed run
    accelerate launch --num_processes 4 scripts/dehaze.py ... --input archive/ --output out/   # 4 GPUs

Results go to <output>/restored/ with the input's name (PNG and TIFF keep their bit depth,
other formats become PNG); summary.md lists what could not be processed and why (those
files are skipped, the exit code is then 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .batch import run_batch
from .errors import run_command
from .evaluate import input_items
from .options import add_model_options, add_output_options, add_run_options, parser


def build_parser():
    ap = parser("dsrdmpd-dehaze", __doc__)
    ap.add_argument("--input", required=True, type=Path, help="a hazy image or a folder of them")
    add_model_options(ap)
    add_output_options(ap)
    add_run_options(ap)
    return ap


def run(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    return run_batch(args, input_items(args.input), "DS-RDMPD dehazing")


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
