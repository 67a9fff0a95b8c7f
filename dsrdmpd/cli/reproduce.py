"""Reproduce the paper's tables: evaluate every dataset listed in a suite file and write
one table with our numbers beside the reported ones, their difference and their source.

    dsrdmpd-reproduce --suite configs/reproduce.yaml --output results/tables \\
        [--set datasets.RSID.root=/data/RSID] [--device cuda]

Writes <output>/<dataset>/ (as dsrdmpd-test) and <output>/tables.md + tables.csv.
Reported values come from configs/paper_results.yaml, each with its source; values read
from another paper's table (not checked against the DS-RDMPD paper) are marked so.
Datasets whose folders or checkpoints are missing are skipped with a note.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import load_config
from ..evaluation import fmt, mean_metrics
from ..imageio import write_text_atomic
from ..metrics import PROTOCOLS
from . import evaluate
from .errors import ItemsFailed, run_command
from .options import parser

ROOT = Path(__file__).resolve().parents[2]
# suite key -> dsrdmpd-test option
DATASET_OPTIONS = {"preset": "--preset", "root": "--data-root", "split": "--split", "list_file": "--list-file",
                   "hazy_dir": "--hazy-subdir", "gt_dir": "--gt-subdir", "hazy_key": "--hazy-key",
                   "gt_key": "--gt-key", "resize": "--resize"}
FIELDS = ["dataset", "psnr", "ssim", "reported_psnr", "reported_ssim", "diff_psnr", "diff_ssim", "source",
          "checked_against_paper", "psnr_stage1", "ssim_stage1", "note"]


def load_means(folder: Path) -> dict:
    with open(folder / "metrics.csv") as f:
        return mean_metrics(list(csv.DictReader(f)))


def source_label(ref: Dict[str, Any]) -> str:
    """'EM-SNN, Tables 1-2 (second-hand)' / '' when no value was reported."""
    if not ref.get("source"):
        return ""
    label = str(ref["source"]) + (f", {ref['table']}" if ref.get("table") else "")
    return label + ("" if ref.get("checked_against_paper") else " (second-hand)")


def table_row(name: str, ours: Dict[str, float], ref: Dict[str, Any], note: str) -> Dict[str, Any]:
    """One dataset's row: ours, reported, ours - reported (None where either is missing)."""
    diff = lambda a, b: None if a is None or b is None else a - b
    psnr, ssim = ours.get("psnr_stage2"), ours.get("ssim_stage2")
    return {"dataset": name, "psnr": psnr, "ssim": ssim, "reported_psnr": ref.get("psnr"),
            "reported_ssim": ref.get("ssim"), "diff_psnr": diff(psnr, ref.get("psnr")),
            "diff_ssim": diff(ssim, ref.get("ssim")), "source": source_label(ref),
            "checked_against_paper": bool(ref.get("checked_against_paper")) if ref.get("source") else None,
            "psnr_stage1": ours.get("psnr_stage1"), "ssim_stage1": ours.get("ssim_stage1"),
            "note": note or ref.get("note", "")}


def signed(x: Optional[float], digits: int) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def write_tables(rows: List[Dict[str, Any]], paper: Dict[str, Any], out: Path, protocol: str) -> str:
    """tables.csv (one row per dataset) and tables.md (ours | reported | difference |
    source, then the sources and the peers reported beside DS-RDMPD); returns the markdown."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    write_text_atomic(out / "tables.csv", buf.getvalue())
    lines = ["# DS-RDMPD: our results beside the reported ones", "", f"Metric protocol (ours): {PROTOCOLS[protocol]}.",
             "", "| dataset | PSNR ours | SSIM ours | PSNR reported | SSIM reported | PSNR diff | SSIM diff | "
             "reported in | stage 1 PSNR / SSIM (ours) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s1 = f"{fmt(r['psnr_stage1'], 2)} / {fmt(r['ssim_stage1'], 4)}" if r["psnr_stage1"] is not None else ""
        lines.append(f"| {r['dataset']} | {fmt(r['psnr'], 2)} | {fmt(r['ssim'], 4)} | {fmt(r['reported_psnr'], 2)} | "
                     f"{fmt(r['reported_ssim'], 4)} | {signed(r['diff_psnr'], 2)} | {signed(r['diff_ssim'], 4)} | "
                     f"{r['source']} | {s1} | {r['note']} |")
    used = sorted({str(ref.get("source")) for ref in (paper.get("datasets") or {}).values() if ref.get("source")})
    if used:
        lines += ["", "Sources of the reported values (diff = ours - reported; '(second-hand)': read from a paper "
                      "that cites DS-RDMPD, not yet checked against the DS-RDMPD paper itself):"]
        for key in used:
            src = (paper.get("sources") or {}).get(key, {})
            lines.append(f"- {key}: {' '.join(str(src.get('citation', key)).split())}"
                         + (f" {' '.join(str(src['protocol_notes']).split())}" if src.get("protocol_notes") else ""))
    peers = paper.get("peers") or {}
    if peers:
        names = [r["dataset"] for r in rows]
        lines += ["", "Other methods as reported in the same sources (PSNR / SSIM):", "",
                  "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for method, values in peers.items():
            cells = [f"{fmt(values[n]['psnr'], 2)} / {fmt(values[n]['ssim'], 4)}" if n in values else ""
                     for n in names]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "tables.md", text)
    return text


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
        ours: Dict[str, float] = {}
        if missing:
            note = "skipped: not found: " + ", ".join(f"{k}={ds.get(k)}" for k in missing)
            print(f"{name}: {note}")
        else:
            cli = ["--stage1", str(ds["stage1"]), "--stage2", str(ds["stage2"]), "--output", str(args.output / name),
                   "--protocol", protocol, "--device", args.device, "--weights", suite.get("weights", "model"),
                   "--seed", str(suite.get("seed", 0))]
            for key, option in DATASET_OPTIONS.items():
                if ds.get(key) is not None:
                    cli += [option, str(ds[key])]
            if args.config:
                cli += ["--config", args.config]
            note = f"{ds.get('split', 'test')} split" + (f", resized to {ds['resize']}" if ds.get("resize") else "")
            try:
                ours = evaluate.run(cli)
            except ItemsFailed as exc:
                ours = load_means(args.output / name)
                note += f"; {exc}"
        rows.append(table_row(name, ours, (paper.get("datasets") or {}).get(name, {}), note))
    print(write_tables(rows, paper, args.output, protocol))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
