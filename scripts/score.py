"""Score existing results against ground truth: see --help (thin entry point; the command lives in dsrdmpd/cli/score.py, also installed as dsrdmpd-score)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
