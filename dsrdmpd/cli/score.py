"""Score restored images that already exist (any method's outputs) against ground truth.

    dsrdmpd-score --restored theirs/restored --gt data/RSID/test/GT --output results/scored
    dsrdmpd-score --restored out/ --data-root data/Haze1k_thin/dataset --preset satehaze1k --split test \\
        --protocol paper,y --crop-border 4 --output results/scored
    dsrdmpd-score --restored ours/restored --gt theirs/ --output results/ours_vs_theirs   # two pipelines

Restored files pair with ground truth by name key, never by order: a restored file's
stem (or the group of --restored-key) must be a pair's key, its hazy file's stem or its
GT file's stem (exactly, or else ignoring case where that names one pair); names that
match nothing are an error that lists them (exit code 2). Writes <output>/metrics.csv
(per image: PSNR / SSIM per protocol, CIEDE2000) and summary.md (the protocols, means,
per image, conversions made on reading, pairs that failed with the reason; a failed
pair makes the exit code 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..choices import PROTOCOLS
from .errors import ItemsFailed, UsageError, run_command
from .options import (add_dataset_options, dataset_split_pairs, key_rule_problem, non_negative_int, parser,
                      positive_int)

DEFAULT_KEY = r"(.+)"


def build_parser():
    ap = parser("dsrdmpd-score", __doc__)
    src = ap.add_argument_group("images")
    src.add_argument("--restored", required=True, type=Path, help="folder of restored images to score")
    src.add_argument("--restored-key", default=DEFAULT_KEY, help="name-key rule for restored files (regex on the stem, "
                                                             "one group)")
    src.add_argument("--gt", type=Path, help="folder of ground truth (instead of --data-root)")
    add_dataset_options(src)
    src.add_argument("--hazy-key", default=DEFAULT_KEY, help="with --preset paired: name-key rule for hazy files")
    src.add_argument("--gt-key", default=DEFAULT_KEY, help="name-key rule for GT files (--gt, or --preset paired)")
    g = ap.add_argument_group("scoring")
    g.add_argument("--protocol", default="paper",
                   help=f"one or more of {', '.join(sorted(PROTOCOLS))}, comma-separated (e.g. paper,y)")
    g.add_argument("--crop-border", type=non_negative_int, default=0, help="pixels cropped from every border before scoring")
    g.add_argument("--resize", type=positive_int, default=None,
                   help="resize the ground truth to N x N first (as dsrdmpd-test --resize); outputs must be N x N")
    g.add_argument("--output", required=True, type=Path, help="folder for metrics.csv and summary.md")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def check_output_folder(folder: Path) -> None:
    """An --output that exists as a file (or lies under one) is a UsageError, before any work."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--output {folder}: {p} is a file, not a folder")
            return


def check_key_rules(args) -> None:
    """Each --*-key given must be a regex with exactly one group and must apply: --hazy-key
    only with --preset paired, --gt-key with --gt or --preset paired (UsageError otherwise)."""
    for option, value in (("--restored-key", args.restored_key), ("--gt-key", args.gt_key),
                          ("--hazy-key", args.hazy_key)):
        problem = key_rule_problem(value)
        if problem:
            raise UsageError(f"{option} {value!r}: {problem}")
    paired = args.data_root and args.preset == "paired"
    if args.hazy_key != DEFAULT_KEY and not paired:
        raise UsageError("--hazy-key applies only with --data-root and --preset paired (presets name their files)")
    if args.gt_key != DEFAULT_KEY and not (args.gt or paired):
        raise UsageError("--gt-key applies only with --gt, or --data-root and --preset paired "
                         "(presets name their files)")


def references(args) -> list:
    """The reference pairs: a GT folder, or a dataset split (by preset)."""
    if args.gt and args.data_root:
        raise UsageError("give --gt or --data-root, not both")
    if args.gt:
        from ..scoring import gt_references
        return gt_references(args.gt, args.gt_key)
    if args.data_root:
        return dataset_split_pairs(args)
    raise UsageError("give the ground truth: --gt DIR, or --data-root with --preset and --split")


def run(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    from ..scoring import parse_protocols, score_folder      # torch loads after the arguments are parsed
    try:
        protocols = parse_protocols(args.protocol)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_output_folder(args.output)
    check_key_rules(args)
    refs = references(args)
    gt_label = args.gt if args.gt else f"{args.data_root} ({args.preset}, {args.split} split)"
    means, failed = score_folder(args.restored, refs, args.output, protocols, args.crop_border, args.resize,
                                 args.restored_key, "Scores of existing results",
                                 [f"Restored: `{args.restored}`; ground truth: `{gt_label}`."],
                                 progress=not args.no_progress)
    summary = (args.output / "summary.md").read_text()
    print(summary.split("Per image:")[0].strip())
    if "\nConverted on reading" in summary:
        print(f"\nSome images were converted on reading (grey or alpha to RGB, EXIF turn, bit depths differ): "
              f"listed in {args.output / 'summary.md'}")
    if failed:
        raise ItemsFailed(f"{len(failed)} of {len(refs)} pair(s) could not be scored "
                          f"({', '.join(str(r['name']) for r in failed[:5])}{' ...' if len(failed) > 5 else ''}): "
                          f"reasons in {args.output / 'summary.md'}")
    return means


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
