"""Dehaze one image or a folder with both stages.

    python scripts/dehaze.py --stage1 S1.pth --stage2 model-30.pt --input hazy/ --output out/

Writes <output>/<name>.png (restored) and, with --save-coarse, <output>/coarse/<name>.png.
Model sizes come from --config, or are read off the checkpoints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from dsrdmpd.imageio import IMAGE_EXTENSIONS, list_images, read_image, write_image  # noqa: E402
from dsrdmpd.inference import Dehazer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True, help="stage-1 checkpoint (official .pth or ours)")
    ap.add_argument("--stage2", required=True, help="stage-2 checkpoint (official model-N.pt or ours)")
    ap.add_argument("--config", help="YAML config with stage1/stage2 sizes (default: read off checkpoints)")
    ap.add_argument("--input", required=True, type=Path, help="image file or folder")
    ap.add_argument("--output", required=True, type=Path, help="output folder")
    ap.add_argument("--weights", choices=["model", "ema"], default="model", help="stage-2 weights to use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-coarse", action="store_true", help="also write the stage-1 output")
    args = ap.parse_args(argv)

    if args.input.is_dir():
        files = list_images(args.input)
        if not files:
            ap.error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.input}")
    elif args.input.is_file():
        files = [args.input]
    else:
        ap.error(f"input not found: {args.input}")
    dehazer = Dehazer.from_checkpoints(args.stage1, args.stage2, args.config, device=args.device,
                                       weights=args.weights, seed=args.seed)
    for path in tqdm(files, desc="dehazing", unit="img"):
        img = read_image(path)
        result = dehazer(img.tensor[None])
        name = path.with_suffix(".png").name if path.suffix.lower() in (".jpg", ".jpeg", ".bmp") else path.name
        write_image(result.restored[0], args.output / name, img.bit_depth)
        if args.save_coarse:
            write_image(result.coarse[0], args.output / "coarse" / name, img.bit_depth)
    print(f"wrote {len(files)} image(s) to {args.output}")


if __name__ == "__main__":
    main()
