"""Train DS-RDMPD stage 1 or stage 2 (``dsrdmpd-train-stage1`` / ``dsrdmpd-train-stage2``).

    dsrdmpd-train-stage1 --config configs/stage1_rsid.yaml --run-dir runs/stage1_rsid --set data.root=/data/RSID
    dsrdmpd-train-stage2 --config configs/stage2_rsid.yaml --run-dir runs/stage2_rsid --resume auto
    accelerate launch --multi_gpu --num_processes 4 scripts/train_stage2.py --config ... --run-dir ...

A bad config, data folder or checkpoint is reported on one line naming the file or key
(exit code 2); --debug shows the traceback. Ctrl-C or SIGTERM: the step under way is
finished and checkpoints/last.pt written before the command ends (exit code 130 / 143;
continue with --resume auto); a NaN loss or a failed checkpoint write stops the run in one
line naming the step (exit code 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..config import load_config
from .errors import run_command
from .options import parser


def build_parser(stage: int):
    ap = parser(f"dsrdmpd-train-stage{stage}", __doc__.replace("stage 1 or stage 2", f"stage {stage}"))
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--run-dir", required=True, type=Path, help="folder for checkpoints, logs and samples")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", default=None,
                    help="'auto' (continue from RUN_DIR/checkpoints/last.pt if present) or a checkpoint path")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow a --resume or train.stage1_checkpoint file that needs arbitrary unpickling (this can "
                         "run code from the file: only for files from a source you trust)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the run can be resumed)")
    return ap


def train_main(stage: int, argv: Optional[List[str]] = None) -> dict:
    """Parse, train, return the trainer's summary (raises on errors)."""
    import sys
    args = build_parser(stage).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from ..training import Stage1Trainer, Stage2Trainer      # torch loads once the arguments and config are read
    trainer_cls = Stage1Trainer if stage == 1 else Stage2Trainer
    command = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]     # as typed: the program, its arguments
    trainer = trainer_cls(cfg, args.run_dir, resume=args.resume, argv=command, trust=args.trust_checkpoint)
    summary = trainer.train(max_steps=args.max_steps)
    trainer.accelerator.print(done_line(summary))
    return summary


def done_line(summary: dict) -> str:
    """What a finished (or --max-steps-stopped) run says last, in one line."""
    step, total, best = summary["step"], summary["total"], summary["best"]
    where = (f"step {step} of {total}" if step >= total else
             f"stopped at step {step} of {total} (continue with --resume auto)")
    chosen = (f"best {best.get('metric', 'psnr')} {best['psnr']:.4f} at step {best['step']} (checkpoints/best.pt)"
              if best.get("step") is not None else "no best.pt (no validation set, no validation yet, or validation on a test split)")
    return f"done: {where}; {chosen}; {summary['it_per_s']:.2f} it/s; run folder {summary['run_dir']}"


def main_stage1(argv: Optional[List[str]] = None) -> int:
    return run_command(lambda a: train_main(1, a), argv)


def main_stage2(argv: Optional[List[str]] = None) -> int:
    return run_command(lambda a: train_main(2, a), argv)
