"""The DS-RDMPD demo: see --help (thin entry point; the command lives in dsrdmpd/cli/demo.py, also installed as dsrdmpd-demo)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
