"""Evaluate DS-RDMPD on a paired dataset: see --help (thin entry point; the command lives in dsrdmpd/cli/evaluate.py, also installed as dsrdmpd-test)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
