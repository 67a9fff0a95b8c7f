"""Command line shared by scripts/train_stage1.py and scripts/train_stage2.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..config import load_config


def train_main(stage: int, argv: Optional[List[str]] = None) -> dict:
    from . import Stage1Trainer, Stage2Trainer
    ap = argparse.ArgumentParser(
        description=f"Train DS-RDMPD stage {stage}. Single device: python scripts/train_stage{stage}.py ...; "
                    f"multi-GPU / multi-node: accelerate launch scripts/train_stage{stage}.py ...")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--run-dir", required=True, type=Path, help="folder for checkpoints, logs and samples")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", default=None,
                    help="'auto' (continue from RUN_DIR/checkpoints/last.pt if present) or a checkpoint path")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the run can be resumed)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer_cls = Stage1Trainer if stage == 1 else Stage2Trainer
    trainer = trainer_cls(cfg, args.run_dir, resume=args.resume, argv=sys.argv if argv is None else list(argv))
    summary = trainer.train(max_steps=args.max_steps)
    trainer.accelerator.print(f"done: step {summary['step']}, best {summary['best']}, "
                              f"{summary['it_per_s']:.2f} it/s, run folder {summary['run_dir']}")
    return summary
