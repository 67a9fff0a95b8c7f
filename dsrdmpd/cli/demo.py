"""The DS-RDMPD demo: from nothing to dehazed pictures on a CPU in a few minutes.

    python scripts/demo.py                      # tiny models trained here on synthetic haze (or: dsrdmpd-demo)
    python scripts/demo.py --seeds 0 1 2        # the same for several seeds, with a table of all of them
    python scripts/demo.py --stage1 S1.pth --stage2 model-30.pt --input my_scenes/ [--gt my_clear/]

Without checkpoints it (1) makes a small hazy / clear dataset with the atmospheric
scattering model over images shipped inside scikit-image (the test scenes come from a part
of every image that training never sees), (2) trains TINY versions of both stages on it,
(3) dehazes the held-out scenes, and prints and saves a results table, side-by-side panels
and an overview picture under demo_output/. Those numbers come from tiny models trained
for minutes, not from the paper's models; --seeds repeats the whole run per seed and
tabulates all of them (the quality report). With --stage1/--stage2 it runs the given (e.g.
the authors' released) checkpoints on --input instead.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..atomicfile import write_text_atomic
from ..config import load_config
from .errors import UsageError, run_command
from .options import HelpFormatter, add_safe_loading_options

ROOT = Path(__file__).resolve().parents[2]
TINY_NOTE = ("These numbers come from TINY models (stage 1 dim 32, stage 2 dim 8) trained for a few minutes on a "
             "small synthetic dataset, not from the paper's models; they show the pipeline works end to end.")
TRAIN_IMAGES, TEST_IMAGES, TEST_SIZE = 48, 24, 64
STAGE1_EPOCHS, STAGE2_STEPS = 20, 600
STAGE1_CHECK_EPOCHS = 5
OVERVIEW_PANELS = 4          # the first panels, stacked in results/overview.png


def train_tiny(out: Path, args, seed: int) -> tuple:
    from ..data import find_pairs
    from ..data.synthetic import make_synthetic_dataset
    from ..evaluation import Item
    from ..training import Stage1Trainer, Stage2Trainer
    data = make_synthetic_dataset(out / "data", n_train=args.train_images, n_test=args.test_images,
                                  size=args.size, seed=seed, n_valid=args.valid_images, test_size=args.test_size)
    print(f"[1/3] synthetic dataset: {args.train_images} train / {args.valid_images} valid pairs of "
          f"{args.size}x{args.size}, {args.test_images} held-out test scenes of {args.test_size}x{args.test_size} "
          f"in {data}")
    # --device cpu keeps training on the CPU too (the trainers otherwise take a GPU if there is one)
    device_override = ["train.device=cpu"] if args.device == "cpu" else []
    s1_cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml",
                         [f"data.root={data}", f"train.epochs={args.stage1_epochs}", f"train.seed={seed}",
                          *device_override])
    # validate (best.pt) and save every STAGE1_CHECK_EPOCHS epochs, not every epoch: 20
    # validations and 20 checkpoint writes took 19 s of stage 1's 142 s (2-core Xeon)
    every = STAGE1_CHECK_EPOCHS * max(1, args.train_images // int(s1_cfg["train"]["batch_size"]))
    s1_cfg["train"].update(val_every=every, save_every=every)
    t0 = time.time()
    Stage1Trainer(s1_cfg, out / "runs" / "stage1").train()
    s1 = out / "runs" / "stage1" / "checkpoints" / "best.pt"
    print(f"[2/3] stage 1 trained in {time.time() - t0:.0f} s -> {s1}")
    s2_cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                         [f"data.root={data}", f"train.stage1_checkpoint={s1}", f"train.steps={args.stage2_steps}",
                          f"train.val_every={args.stage2_steps}", f"train.save_every={args.stage2_steps}",
                          "train.log_every=10", f"train.seed={seed}", "train.zero_init_residual_head=true",
                          *device_override])
    t0 = time.time()
    Stage2Trainer(s2_cfg, out / "runs" / "stage2").train()
    s2 = out / "runs" / "stage2" / "checkpoints" / "last.pt"
    print(f"      stage 2 trained in {time.time() - t0:.0f} s -> {s2}")
    items = [Item(p.hazy.name, p.hazy, p.gt) for p in find_pairs(data / "test" / "hazy", data / "test" / "GT")]
    return s1, s2, items, "ema"


def run_demo(args, seed: int, out: Path) -> dict:
    """One demo run into ``out``; returns its mean scores (hazy, stage 1, stage 2) and seconds."""
    from ..evaluation import Item, run_items, write_results
    from ..imageio import list_images, read_image
    from ..inference import Dehazer
    from ..metrics import psnr_ssim
    from ..visualize import stack_panels
    t_start = time.time()
    if args.stage1 or args.weights_dir:
        files = list_images(args.input) if args.input.is_dir() else [args.input]
        items = [Item(p.name, p, (args.gt / p.name) if args.gt else None) for p in files]
        s1, s2, weights, tiny = args.stage1, args.stage2, "model", False
    else:
        for sub in ("data", "runs", "results"):      # only what an earlier demo run wrote there
            shutil.rmtree(out / sub, ignore_errors=True)
        s1, s2, items, weights = train_tiny(out, args, seed)
        tiny = True
    if args.weights_dir:
        dehazer = Dehazer.from_pretrained(args.weights_dir, device=args.device, weights=weights, seed=seed)
    else:
        dehazer = Dehazer.from_checkpoints(str(s1), str(s2), device=args.device, weights=weights, seed=seed,
                                           trust=args.trust_checkpoint)
    rows = run_items(dehazer, items, out / "results", panels=len(items), progress=False)
    panels = sorted((out / "results" / "panels").glob("*.png"))[:OVERVIEW_PANELS]
    if panels:
        stack_panels(panels, out / "results" / "overview.png")
    for r, item in zip(rows, items):
        if item.gt is not None:
            m = psnr_ssim(read_image(item.hazy).tensor, read_image(item.gt).tensor)
            r["psnr_hazy"], r["ssim_hazy"] = m["psnr"][0], m["ssim"][0]
    notes = [TINY_NOTE] if tiny else [f"Checkpoints: `{args.weights_dir or s1}`" + (f", `{s2}`." if s2 else ".")]
    means = write_results(rows, out / "results", "paper", "DS-RDMPD demo", notes)
    print(f"[3/3] dehazed {len(rows)} held-out image(s) -> {out / 'results'} (restored/, panels/, overview.png, "
          f"metrics.csv, summary.md)")
    result = {"seed": seed}
    if means:
        hz = [r for r in rows if "psnr_hazy" in r]
        result["psnr_hazy"] = sum(r["psnr_hazy"] for r in hz) / len(hz)
        result["ssim_hazy"] = sum(r["ssim_hazy"] for r in hz) / len(hz)
        result.update({k: means[k] for k in ("psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2")})
        print("\n| input | PSNR (dB) | SSIM |\n|---|---|---|")
        print(f"| hazy (no processing) | {result['psnr_hazy']:.2f} | {result['ssim_hazy']:.4f} |")
        print(f"| stage 1 (MCESS-UNet) | {means['psnr_stage1']:.2f} | {means['ssim_stage1']:.4f} |")
        print(f"| stage 2 (RDMPD, 5 steps) | {means['psnr_stage2']:.2f} | {means['ssim_stage2']:.4f} |")
    if tiny:
        print("\n" + TINY_NOTE)
    result["seconds"] = time.time() - t_start
    print(f"\ntotal time {result['seconds']:.0f} s")
    return result


SEED_COLUMNS = ("seed", "psnr_hazy", "ssim_hazy", "psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2",
                "seconds")


def seeds_table(results: list, machine: str, command: str) -> str:
    """Markdown: one row per seed (stage 2 minus stage 1 in its own columns), then mean and spread."""
    lines = [f"# DS-RDMPD demo over {len(results)} seeds", "", f"Machine: {machine}.", f"Command: `{command}`.",
             "", TINY_NOTE, "",
             "| seed | hazy PSNR / SSIM | stage 1 PSNR / SSIM | stage 2 PSNR / SSIM | stage 2 - stage 1 | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['psnr_hazy']:.2f} / {r['ssim_hazy']:.4f} | {r['psnr_stage1']:.2f} / "
                     f"{r['ssim_stage1']:.4f} | {r['psnr_stage2']:.2f} / {r['ssim_stage2']:.4f} | "
                     f"{r['psnr_stage2'] - r['psnr_stage1']:+.2f} dB / {r['ssim_stage2'] - r['ssim_stage1']:+.4f} | "
                     f"{r['seconds']:.0f} |")
    dp = [r["psnr_stage2"] - r["psnr_stage1"] for r in results]
    ds = [r["ssim_stage2"] - r["ssim_stage1"] for r in results]
    better = sum(p > 0 and s > 0 for p, s in zip(dp, ds))
    lines += ["", f"Stage 2 minus stage 1 over the seeds: PSNR {min(dp):+.2f} to {max(dp):+.2f} dB (mean "
                  f"{statistics.fmean(dp):+.2f}), SSIM {min(ds):+.4f} to {max(ds):+.4f} "
                  f"(mean {statistics.fmean(ds):+.4f}); "
                  f"stage 2 above stage 1 on both in {better} of {len(results)} seeds; longest run "
                  f"{max(r['seconds'] for r in results):.0f} s."]
    return "\n".join(lines) + "\n"


def write_seeds(results: list, out: Path, machine: str, command: str) -> None:
    from ..evaluation import write_rows_csv
    write_rows_csv(out / "seeds.csv", results, SEED_COLUMNS)
    write_text_atomic(out / "seeds.md", seeds_table(results, machine, command))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="demo.py", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for the data, runs and results")
    ap.add_argument("--stage1", help="stage-1 checkpoint: run the given models instead of training tiny ones")
    ap.add_argument("--stage2", help="stage-2 checkpoint (with --stage1)")
    add_safe_loading_options(ap)
    ap.add_argument("--input", type=Path, help="hazy image or folder (with --stage1/--stage2 or --weights-dir)")
    ap.add_argument("--gt", type=Path, help="ground-truth folder for --input (same names), optional")
    ap.add_argument("--device", default=None, help="where to train and dehaze (default: cuda if available, else cpu)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the sampling")
    ap.add_argument("--seeds", type=int, nargs="+", help="run the whole demo once per seed (into OUTPUT/seed_N) "
                                                         "and write OUTPUT/seeds.csv and seeds.md")
    ap.add_argument("--size", type=int, default=64, help="training crop size")
    ap.add_argument("--test-size", type=int, default=TEST_SIZE, help="size of the held-out test scenes")
    ap.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="training pairs")
    ap.add_argument("--valid-images", type=int, default=4, help="validation pairs (stage 1's best.pt is chosen "
                                                                   "on them, never on the test pairs)")
    ap.add_argument("--test-images", type=int, default=TEST_IMAGES, help="held-out test scenes")
    ap.add_argument("--stage1-epochs", type=int, default=STAGE1_EPOCHS, help="stage-1 training epochs")
    ap.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS, help="stage-2 training steps")
    return ap


def run(argv: Optional[List[str]] = None) -> List[dict]:
    """The demo (once, or once per --seeds); returns each run's mean scores."""
    args = build_parser().parse_args(argv)
    if bool(args.stage1) != bool(args.stage2):
        raise UsageError("give both --stage1 and --stage2, or neither")
    if args.weights_dir and args.stage1:
        raise UsageError("give either --weights-dir or --stage1/--stage2, not both")
    if (args.stage1 or args.weights_dir) and not args.input:
        raise UsageError("--input is required with --stage1/--stage2 or --weights-dir")
    if args.seeds and (args.stage1 or args.weights_dir):
        raise UsageError("--seeds trains the tiny models once per seed; it does not go with --stage1/--stage2")
    import torch                        # loaded once the arguments are checked
    from ..machine import machine_description
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.seeds:
        return [run_demo(args, args.seed, args.output)]
    results = []
    for seed in args.seeds:
        print(f"\n=== seed {seed} ===")
        results.append(run_demo(args, seed, args.output / f"seed_{seed}"))
    command = "python scripts/demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_seeds(results, args.output, machine_description(args.device), command)
    print("\n" + (args.output / "seeds.md").read_text())
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
