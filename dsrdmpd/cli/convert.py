"""Convert checkpoints to a weights folder of safetensors files (``dsrdmpd-convert``).

    dsrdmpd-convert --stage1 MCESS_UNet_epoch91.pth --stage2 model-30.pt --output weights/rsid
    dsrdmpd-convert --stage2 runs/stage2/checkpoints/last.pt --output weights/mine   # one stage at a time
    dsrdmpd-dehaze --weights-dir weights/rsid --input scenes/ --output out/

Loads each file without unpickling code (the authors' files and this package's load that
way), checks it, writes FOLDER/stage1/model.safetensors, stage2/model.safetensors,
stage2/model.ema.safetensors (if the file has an EMA copy), config.json and SHA256SUMS,
reads every tensor back to compare, and prints each file's SHA-256. A file that needs
arbitrary unpickling is refused unless --trust-checkpoint says you trust its source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..config import load_config
from .errors import UsageError, run_command
from .options import parser


def build_parser():
    ap = parser("dsrdmpd-convert", __doc__)
    ap.add_argument("--stage1", type=Path, help="stage-1 checkpoint (the authors' .pth or ours)")
    ap.add_argument("--stage2", type=Path, help="stage-2 checkpoint (the authors' model-N.pt or ours)")
    ap.add_argument("--output", required=True, type=Path, help="weights folder to write (or update)")
    ap.add_argument("--config", help="YAML config with the model sizes (default: read off the checkpoints)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow checkpoints that need arbitrary unpickling (this can run code from the file: only "
                         "for files from a source you trust)")
    return ap


def run(argv: Optional[List[str]] = None) -> Dict[str, str]:
    args = build_parser().parse_args(argv)
    if args.stage1 is None and args.stage2 is None:
        raise UsageError("give --stage1 and/or --stage2")
    cfg = load_config(args.config) if args.config else None
    from ..convert import convert_checkpoints           # torch loads once the arguments are checked
    return convert_checkpoints(args.output, args.stage1, args.stage2, cfg, trust=args.trust_checkpoint)


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
