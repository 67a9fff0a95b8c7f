"""Train DS-RDMPD stage 1 (see README "Training").

    python scripts/train_stage1.py --config configs/stage1_rsid.yaml --run-dir runs/stage1_rsid --resume auto
    accelerate launch --multi_gpu --num_processes 4 scripts/train_stage1.py --config ... --run-dir ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.training.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(1)
