"""Evaluate DS-RDMPD on a paired dataset (or any folder of hazy images).

    python scripts/test.py --stage1 S1.pth --stage2 model-30.pt --data-root data/RSID --preset rsid --split test \
        --output results/rsid
    python scripts/test.py --stage1 ... --stage2 ... --hazy-dir my/hazy [--gt-dir my/clear] --output results/mine

Writes results/<...>/restored/<same names>.png, metrics.csv (per image, stage 1 and stage 2),
summary.md (means, naming the metric protocol) and, with --panels N, side-by-side panels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.config import load_config  # noqa: E402
from dsrdmpd.data import find_pairs, split_pairs  # noqa: E402
from dsrdmpd.evaluation import Item, run_items, write_results  # noqa: E402
from dsrdmpd.imageio import list_images  # noqa: E402
from dsrdmpd.inference import Dehazer  # noqa: E402
from dsrdmpd.metrics import PROTOCOLS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True, help="stage-1 checkpoint (official .pth or ours)")
    ap.add_argument("--stage2", required=True, help="stage-2 checkpoint (official model-N.pt or ours)")
    ap.add_argument("--config", help="YAML config: model sizes and sampling (default: read off the checkpoints)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--weights", choices=["model", "ema"], default="model",
                    help="stage-2 weights: raw ('model', the authors' test script) or the EMA copy")
    src = ap.add_argument_group("images")
    src.add_argument("--data-root", help="dataset root (with --preset and --split)")
    src.add_argument("--preset", default="rsid", choices=["rsid", "satehaze1k", "paired"])
    src.add_argument("--split", default="test")
    src.add_argument("--hazy-dir", help="folder of hazy images (instead of --data-root)")
    src.add_argument("--gt-dir", help="folder of ground truth for --hazy-dir (same names)")
    src.add_argument("--hazy-key", default=r"(.+)", help="name-key rule for hazy files (regex, one group)")
    src.add_argument("--gt-key", default=r"(.+)", help="name-key rule for GT files")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper")
    ap.add_argument("--resize", type=int, default=None, help="resize hazy and GT to N x N first (authors' protocol "
                                                             "for one dataset: 512)")
    ap.add_argument("--seed", type=int, default=None, help="start-noise seed (default: config sampling.seed, 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", type=int, default=None, help="tile size for large scenes (multiple of 16)")
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--tile-batch", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16", "bf16-stage1"], default="fp32",
                    help="bf16: bfloat16 autocast for both networks, bf16-stage1: for stage 1 only (faster "
                         "on GPUs; see the README for the accuracy cost)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convs on GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both networks (first image is slow)")
    ap.add_argument("--save-coarse", action="store_true")
    ap.add_argument("--panels", type=int, default=0, help="write side-by-side panels for the first N images")
    return ap


def collect_items(args, ap) -> list:
    if args.data_root:
        data = {"preset": args.preset, "root": args.data_root}
        if args.preset == "paired":
            data.update(hazy_key=args.hazy_key, gt_key=args.gt_key)
        return [Item(p.hazy.name, p.hazy, p.gt) for p in split_pairs(data, args.split)]
    if args.hazy_dir and args.gt_dir:
        return [Item(p.hazy.name, p.hazy, p.gt) for p in find_pairs(args.hazy_dir, args.gt_dir, args.hazy_key,
                                                                    args.gt_key)]
    if args.hazy_dir:
        hazy = Path(args.hazy_dir)
        files = list_images(hazy) if hazy.is_dir() else [hazy]
        return [Item(p.name, p) for p in files]
    ap.error("give --data-root, or --hazy-dir [--gt-dir]")


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.overrides and not args.config:
        ap.error("--set needs --config (without a config the model sizes are read off the checkpoints)")
    cfg = load_config(args.config, args.overrides) if args.config else None
    items = collect_items(args, ap)
    kwargs = dict(tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch, precision=args.precision,
                  channels_last=args.channels_last, compile=args.compile)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    dehazer = Dehazer.from_checkpoints(args.stage1, args.stage2, cfg, device=args.device, weights=args.weights,
                                       **kwargs)
    rows = run_items(dehazer, items, args.output, args.protocol, args.resize, args.save_coarse, args.panels)
    notes = [f"Checkpoints: stage 1 `{args.stage1}`, stage 2 `{args.stage2}` ({args.weights} weights); "
             f"seed {dehazer.seed}; {dehazer.steps} sampling steps" + (f"; resized to {args.resize}" if args.resize
                                                                       else "") + "."]
    means = write_results(rows, args.output, args.protocol, "DS-RDMPD evaluation", notes)
    print((args.output / "summary.md").read_text().split("Per image:")[0].strip())
    return means


if __name__ == "__main__":
    main()
