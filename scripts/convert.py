"""Convert checkpoints to safetensors: see --help (thin entry point; the command lives in dsrdmpd/cli/convert.py, also installed as dsrdmpd-convert)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrdmpd.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
