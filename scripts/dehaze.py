"""Dehaze your own scenes: one image or a folder, any size, PNG / JPEG / TIFF (8 or 16 bit).

    python scripts/dehaze.py --stage1 S1.pth --stage2 model-30.pt --input scene.tif --output out/
    python scripts/dehaze.py ... --input big_scene.tif --output out/ --tile 512 --overlap 64   # large scenes

Results go to <output>/restored/ with the input's name (PNG, or TIFF at the input's bit
depth). This is scripts/test.py without ground truth; every option of test.py works here.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import test as evaluate  # noqa: E402  (scripts/test.py)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gt-dir" in argv:
        raise SystemExit("dehaze.py takes no ground truth: use scripts/test.py --hazy-dir ... --gt-dir ...")
    return evaluate.main(["--hazy-dir" if a == "--input" else a for a in argv])


if __name__ == "__main__":
    main()
