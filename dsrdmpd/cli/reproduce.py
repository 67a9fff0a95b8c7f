"""Reproduce the paper's tables: evaluate every dataset listed in a suite file and write
one table with our numbers beside the paper's.

    dsrdmpd-reproduce --suite configs/reproduce.yaml --output results/tables \
        [--set datasets.RSID.root=/data/RSID] [--device cuda]

Writes <output>/<dataset>/ (as dsrdmpd-test) and <output>/tables.md + tables.csv.
Paper values come from configs/paper_results.yaml (empty where not transcribed).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional

from ..config import load_config
from ..evaluation import fmt, mean_metrics
from ..metrics import PROTOCOLS
from . import evaluate
from .errors import ItemsFailed, run_command
from .options import parser

ROOT = Path(__file__).resolve().parents[2]


def load_means(folder: Path) -> dict:
    with open(folder / "metrics.csv") as f:
        return mean_metrics(list(csv.DictReader(f)))


def run(argv: Optional[List[str]] = None) -> List[dict]:
    ap = parser("dsrdmpd-reproduce", __doc__)
    ap.add_argument("--suite", default=str(ROOT / "configs" / "reproduce.yaml"))
    ap.add_argument("--paper", default=str(ROOT / "configs" / "paper_results.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--device", default="auto", help="as dsrdmpd-test --device")
    ap.add_argument("--config", help="model config for every dataset (default: sizes read off the checkpoints)")
    args = ap.parse_args(argv)
    suite = load_config(args.suite, args.overrides, defaults={})
    paper = load_config(args.paper, defaults={})
    protocol = suite.get("protocol", "paper")
    rows = []
    for name, ds in (suite.get("datasets") or {}).items():
        missing = [k for k in ("root", "stage1", "stage2") if not ds.get(k) or not Path(ds[k]).exists()]
        ours = {}
        if missing:
            note = "skipped: not found: " + ", ".join(f"{k}={ds.get(k)}" for k in missing)
            print(f"{name}: {note}")
        else:
            cli = ["--stage1", str(ds["stage1"]), "--stage2", str(ds["stage2"]), "--data-root", str(ds["root"]),
                   "--preset", ds.get("preset", "rsid"), "--split", ds.get("split", "test"),
                   "--output", str(args.output / name), "--protocol", protocol, "--device", args.device,
                   "--weights", suite.get("weights", "model"), "--seed", str(suite.get("seed", 0))]
            if ds.get("resize"):
                cli += ["--resize", str(ds["resize"])]
            if args.config:
                cli += ["--config", args.config]
            note = f"{ds.get('split', 'test')} split" + (f", resized to {ds['resize']}" if ds.get("resize") else "")
            try:
                ours = evaluate.run(cli)
            except ItemsFailed as exc:
                ours = load_means(args.output / name)
                note += f"; {exc}"
        ref = (paper.get("datasets") or {}).get(name, {})
        rows.append({"dataset": name, "psnr": ours.get("psnr_stage2"), "ssim": ours.get("ssim_stage2"),
                     "psnr_stage1": ours.get("psnr_stage1"), "ssim_stage1": ours.get("ssim_stage1"),
                     "paper_psnr": ref.get("psnr"), "paper_ssim": ref.get("ssim"), "note": note})
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "tables.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["dataset"])
        w.writeheader()
        w.writerows(rows)
    lines = ["# DS-RDMPD: our results beside the paper's", "", f"Metric protocol: {PROTOCOLS[protocol]}.",
             f"Paper values: {paper.get('source', 'configs/paper_results.yaml')} (empty = not transcribed).", "",
             "| dataset | PSNR (ours) | SSIM (ours) | PSNR (paper) | SSIM (paper) | stage 1 PSNR / SSIM (ours) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s1 = f"{fmt(r['psnr_stage1'], 2)} / {fmt(r['ssim_stage1'], 4)}" if r["psnr_stage1"] is not None else ""
        lines.append(f"| {r['dataset']} | {fmt(r['psnr'], 2)} | {fmt(r['ssim'], 4)} | {fmt(r['paper_psnr'], 2)} | "
                     f"{fmt(r['paper_ssim'], 4)} | {s1} | {r['note']} |")
    (args.output / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows



def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
