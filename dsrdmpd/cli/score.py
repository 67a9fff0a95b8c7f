"""Score restored images that already exist (any method's outputs) against ground truth.

    dsrdmpd-score --restored theirs/restored --gt data/RSID/test/GT --output results/scored
    dsrdmpd-score --restored out/ --data-root data/Haze1k_thin/dataset --preset satehaze1k --split test \\
        --protocol paper,y --crop-border 4 --output results/scored
    dsrdmpd-score --restored ours/restored --gt theirs/ --output results/ours_vs_theirs   # two pipelines

Restored files pair with ground truth by name key, never by order: a restored file's
stem (or the group of --restored-key) must be a pair's key, its hazy file's stem or its
GT file's stem; names that match nothing are an error that lists them. Writes
<output>/metrics.csv (per image: PSNR / SSIM per protocol, CIEDE2000) and summary.md
(the protocols, means, per image, pairs that failed with the reason; a failed pair makes
the exit code 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..data import PRESET_NAMES, split_pairs
from ..metrics import PROTOCOLS
from ..scoring import gt_references, parse_protocols, score_folder
from .errors import ItemsFailed, UsageError, run_command
from .options import parser


def build_parser():
    ap = parser("dsrdmpd-score", __doc__)
    src = ap.add_argument_group("images")
    src.add_argument("--restored", required=True, type=Path, help="folder of restored images to score")
    src.add_argument("--restored-key", default=r"(.+)", help="name-key rule for restored files (regex on the stem, "
                                                             "one group)")
    src.add_argument("--gt", type=Path, help="folder of ground truth (instead of --data-root)")
    src.add_argument("--data-root", help="dataset root (with --preset and --split), as dsrdmpd-test")
    src.add_argument("--preset", default="rsid", choices=list(PRESET_NAMES), help="dataset layout, as dsrdmpd-test")
    src.add_argument("--split", default="test")
    src.add_argument("--hazy-subdir", help="with --preset paired: hazy folder under the root ('{split}' allowed)")
    src.add_argument("--gt-subdir", help="with --preset paired: GT folder under the root ('{split}' allowed)")
    src.add_argument("--list-file", help="with --preset realblur: list file under the root")
    src.add_argument("--hazy-key", default=r"(.+)", help="with --preset paired: name-key rule for hazy files")
    src.add_argument("--gt-key", default=r"(.+)", help="name-key rule for GT files (--gt, or --preset paired)")
    g = ap.add_argument_group("scoring")
    g.add_argument("--protocol", default="paper",
                   help=f"one or more of {', '.join(sorted(PROTOCOLS))}, comma-separated (e.g. paper,y)")
    g.add_argument("--crop-border", type=int, default=0, help="pixels cropped from every border before scoring")
    g.add_argument("--resize", type=int, default=None,
                   help="resize the ground truth to N x N first (as dsrdmpd-test --resize); outputs must be N x N")
    g.add_argument("--output", required=True, type=Path, help="folder for metrics.csv and summary.md")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def references(args) -> list:
    """The reference pairs: a GT folder, or a dataset split (by preset)."""
    if args.gt and args.data_root:
        raise UsageError("give --gt or --data-root, not both")
    if args.gt:
        return gt_references(args.gt, args.gt_key)
    if args.data_root:
        data = {"preset": args.preset, "root": args.data_root, "list_file": args.list_file}
        if args.preset == "paired":
            data.update(hazy_key=args.hazy_key, gt_key=args.gt_key, hazy_dir=args.hazy_subdir, gt_dir=args.gt_subdir)
        return split_pairs(data, args.split)
    raise UsageError("give the ground truth: --gt DIR, or --data-root with --preset and --split")


def run(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    try:
        protocols = parse_protocols(args.protocol)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.crop_border < 0 or (args.resize is not None and args.resize < 1):
        raise UsageError("--crop-border must be >= 0 and --resize >= 1")
    refs = references(args)
    gt_label = args.gt if args.gt else f"{args.data_root} ({args.preset}, {args.split} split)"
    means, failed = score_folder(args.restored, refs, args.output, protocols, args.crop_border, args.resize,
                                 args.restored_key, "Scores of existing results",
                                 [f"Restored: `{args.restored}`; ground truth: `{gt_label}`."],
                                 progress=not args.no_progress)
    print((args.output / "summary.md").read_text().split("Per image:")[0].strip())
    if failed:
        raise ItemsFailed(f"{len(failed)} of {len(refs)} pair(s) could not be scored "
                          f"({', '.join(str(r['name']) for r in failed[:5])}{' ...' if len(failed) > 5 else ''}): "
                          f"reasons in {args.output / 'summary.md'}")
    return means


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
