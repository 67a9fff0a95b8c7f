"""The DS-RDMPD demo: from nothing to dehazed pictures on a CPU in a few minutes.

    python scripts/demo.py                      # tiny models trained here on synthetic haze
    python scripts/demo.py --stage1 S1.pth --stage2 model-30.pt --input my_scenes/ [--gt my_clear/]

Without checkpoints it (1) makes a small hazy / clear dataset with the atmospheric
scattering model over images shipped inside scikit-image, (2) trains TINY versions of both
stages on it, (3) dehazes held-out scenes, and prints and saves a results table and
side-by-side panels under demo_output/. Those numbers come from tiny models trained for
minutes, not from the paper's models. With --stage1/--stage2 it runs the given (e.g. the
authors' released) checkpoints on --input instead.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dsrdmpd.config import load_config  # noqa: E402
from dsrdmpd.data import find_pairs  # noqa: E402
from dsrdmpd.data.synthetic import make_synthetic_dataset  # noqa: E402
from dsrdmpd.evaluation import Item, run_items, write_results  # noqa: E402
from dsrdmpd.imageio import list_images, read_image  # noqa: E402
from dsrdmpd.inference import Dehazer  # noqa: E402
from dsrdmpd.metrics import psnr_ssim  # noqa: E402
from dsrdmpd.training import Stage1Trainer, Stage2Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_NOTE = ("These numbers come from TINY models (stage 1 dim 32, stage 2 dim 8) trained for a few minutes on a "
             "small synthetic dataset, not from the paper's models; they show the pipeline works end to end.")


def train_tiny(out: Path, args) -> tuple:
    data = make_synthetic_dataset(out / "data", n_train=args.train_images, n_test=args.test_images,
                                  size=args.size, seed=args.seed, n_valid=args.valid_images)
    print(f"[1/3] synthetic dataset: {args.train_images} train / {args.valid_images} valid / {args.test_images} "
          f"test pairs of "
          f"{args.size}x{args.size} in {data}")
    s1_cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml",
                         [f"data.root={data}", f"train.epochs={args.stage1_epochs}", f"train.seed={args.seed}"])
    t0 = time.time()
    Stage1Trainer(s1_cfg, out / "runs" / "stage1").train()
    s1 = out / "runs" / "stage1" / "checkpoints" / "best.pt"
    print(f"[2/3] stage 1 trained in {time.time() - t0:.0f} s -> {s1}")
    s2_cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                         [f"data.root={data}", f"train.stage1_checkpoint={s1}", f"train.steps={args.stage2_steps}",
                          f"train.val_every={args.stage2_steps}", f"train.save_every={args.stage2_steps}",
                          "train.log_every=10", f"train.seed={args.seed}", "train.zero_init_residual_head=true"])
    t0 = time.time()
    Stage2Trainer(s2_cfg, out / "runs" / "stage2").train()
    s2 = out / "runs" / "stage2" / "checkpoints" / "last.pt"
    print(f"      stage 2 trained in {time.time() - t0:.0f} s -> {s2}")
    items = [Item(p.hazy.name, p.hazy, p.gt) for p in find_pairs(data / "test" / "hazy", data / "test" / "GT")]
    return s1, s2, items, "ema"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=ROOT / "demo_output")
    ap.add_argument("--stage1", help="stage-1 checkpoint: run the given models instead of training tiny ones")
    ap.add_argument("--stage2", help="stage-2 checkpoint (with --stage1)")
    ap.add_argument("--input", type=Path, help="hazy image or folder (with --stage1/--stage2)")
    ap.add_argument("--gt", type=Path, help="ground-truth folder for --input (same names), optional")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=48)
    ap.add_argument("--valid-images", type=int, default=4, help="validation pairs (stage 1's best.pt is chosen "
                                                                   "on them, never on the test pairs)")
    ap.add_argument("--test-images", type=int, default=8)
    ap.add_argument("--stage1-epochs", type=int, default=20)
    ap.add_argument("--stage2-steps", type=int, default=300)
    args = ap.parse_args(argv)
    out = args.output
    t_start = time.time()
    if bool(args.stage1) != bool(args.stage2):
        ap.error("give both --stage1 and --stage2, or neither")
    if args.stage1:
        if not args.input:
            ap.error("--input is required with --stage1/--stage2")
        files = list_images(args.input) if args.input.is_dir() else [args.input]
        items = [Item(p.name, p, (args.gt / p.name) if args.gt else None) for p in files]
        s1, s2, weights, tiny = args.stage1, args.stage2, "model", False
    else:
        if out.exists():
            shutil.rmtree(out)
        s1, s2, items, weights = train_tiny(out, args)
        tiny = True
    dehazer = Dehazer.from_checkpoints(str(s1), str(s2), device=args.device, weights=weights, seed=args.seed)
    rows = run_items(dehazer, items, out / "results", panels=len(items), progress=False)
    for r, item in zip(rows, items):
        if item.gt is not None:
            m = psnr_ssim(read_image(item.hazy).tensor, read_image(item.gt).tensor)
            r["psnr_hazy"], r["ssim_hazy"] = m["psnr"][0], m["ssim"][0]
    notes = [TINY_NOTE] if tiny else [f"Checkpoints: `{s1}`, `{s2}`."]
    means = write_results(rows, out / "results", "paper", "DS-RDMPD demo", notes)
    print(f"[3/3] dehazed {len(rows)} held-out image(s) -> {out / 'results'} (restored/, panels/, metrics.csv, "
          f"summary.md)")
    if means:
        hz = [r for r in rows if "psnr_hazy" in r]
        ph = sum(r["psnr_hazy"] for r in hz) / len(hz)
        sh = sum(r["ssim_hazy"] for r in hz) / len(hz)
        print("\n| input | PSNR (dB) | SSIM |\n|---|---|---|")
        print(f"| hazy (no processing) | {ph:.2f} | {sh:.4f} |")
        print(f"| stage 1 (MCESS-UNet) | {means['psnr_stage1']:.2f} | {means['ssim_stage1']:.4f} |")
        print(f"| stage 2 (RDMPD, 5 steps) | {means['psnr_stage2']:.2f} | {means['ssim_stage2']:.4f} |")
    if tiny:
        print("\n" + TINY_NOTE)
    print(f"\ntotal time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
