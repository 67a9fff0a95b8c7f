"""Reproduce the paper's tables: see --help (thin entry point; the command lives in dsrdmpd/cli/reproduce.py, also installed as dsrdmpd-reproduce)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
