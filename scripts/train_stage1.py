"""Train DS-RDMPD stage 1: see --help (thin entry point; the command lives in dsrdmpd/cli/train.py, also installed as dsrdmpd-train-stage1)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.train import main_stage1  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_stage1())
