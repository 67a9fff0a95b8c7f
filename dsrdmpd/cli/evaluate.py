"""Evaluate DS-RDMPD on a paired dataset (or score any folder of hazy images against GT).

    dsrdmpd-test --stage1 S1.pth --stage2 model-30.pt --data-root data/RSID --preset rsid --split test \\
        --output results/rsid
    dsrdmpd-test --stage1 ... --stage2 ... --hazy-dir my/hazy --gt-dir my/clear --output results/mine
    accelerate launch --num_processes 4 scripts/test.py ...      # items split over 4 GPUs, same results
    dsrdmpd-test ... --batch 8      # same-size images 8 per pipeline call; each image's result is its own

Writes <output>/restored/ (same names; PNG and TIFF keep their bit depth), metrics.csv
(per image, stage 1 and stage 2), summary.md (means, naming the metric protocol; items
that failed, with the reason) and, with --panels N, side-by-side panels. A file that
cannot be used is reported and skipped; the exit code is then 1. --resume continues a
killed run in the same output folder (made with the same settings: <output>/run.json);
one run per output folder at a time. README: "Batch runs survive".
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from .errors import UsageError, run_command
from .options import (add_dataset_options, add_model_options, add_output_options, add_protocol_options,
                      add_run_options, dataset_split_pairs, key_rule, parser)

if TYPE_CHECKING:
    from ..evaluation import Item


def build_parser():
    ap = parser("dsrdmpd-test", __doc__)
    add_model_options(ap)
    src = ap.add_argument_group("images")
    add_dataset_options(src)
    src.add_argument("--hazy-dir", help="folder (or one file) of hazy images, instead of --data-root")
    src.add_argument("--gt-dir", help="folder of ground truth for --hazy-dir (paired by name key)")
    src.add_argument("--hazy-key", type=key_rule, default=r"(.+)", help="name-key rule for hazy files (regex, one group)")
    src.add_argument("--gt-key", type=key_rule, default=r"(.+)", help="name-key rule for GT files")
    add_output_options(ap)
    add_protocol_options(ap)
    add_run_options(ap)
    return ap


def collect_items(args) -> List[Item]:
    from ..data import find_pairs
    from ..evaluation import items_from_pairs
    if args.data_root and (args.hazy_dir or args.gt_dir):
        raise UsageError("give --data-root or --hazy-dir [--gt-dir], not both")
    if args.data_root:
        items = items_from_pairs(dataset_split_pairs(args))
    elif args.hazy_dir and args.gt_dir:
        items = items_from_pairs(find_pairs(args.hazy_dir, args.gt_dir, args.hazy_key, args.gt_key))
    elif args.hazy_dir:
        items = input_items(Path(args.hazy_dir))
    else:
        raise UsageError("give --data-root, or --hazy-dir [--gt-dir]")
    return items


def input_items(path: Path) -> List[Item]:
    """Items of a file or a folder of images; a missing path or an empty folder is an error."""
    from ..evaluation import Item
    from ..imageio import list_images
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    files = list_images(path) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path}: no images found (looked for .png, .jpg, .jpeg, .tif, .tiff, .bmp)")
    return [Item(p.name, p) for p in files]


def run(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    from .batch import run_batch           # torch and the models load after the arguments are parsed
    items = collect_items(args)
    return run_batch(args, items, "DS-RDMPD evaluation", args.protocol, args.resize)


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
