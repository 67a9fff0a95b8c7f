"""Speed and memory report: see --help (thin entry point; the logic lives in dsrdmpd/benchmark.py, also installed as dsrdmpd-benchmark)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
