"""Dehaze a list of images (with or without ground truth), save the results, score them,
and write a per-image CSV plus a markdown summary that names the metric protocol.

Scores are computed on the float outputs before saving (the paper's protocol); saved
images are 8-bit PNG, or 16-bit TIFF when the input was a 16-bit TIFF.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .imageio import TIFF_EXTENSIONS, read_image, write_image
from .inference import Dehazer
from .metrics import PROTOCOLS, psnr_ssim
from .visualize import error_map, save_panel

METRIC_COLUMNS = ["psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2"]


@dataclass
class Item:
    name: str
    hazy: Path
    gt: Optional[Path] = None


def output_name(path: Path) -> str:
    """Same file name; TIFF stays TIFF (bit depth kept), everything else becomes PNG."""
    return path.name if path.suffix.lower() in TIFF_EXTENSIONS + (".png",) else path.stem + ".png"


def resize_image(x: torch.Tensor, size: int, bit_depth: int = 8) -> torch.Tensor:
    """The authors' test-time resize: ``transforms.Resize((size, size))`` on the PIL image,
    i.e. PIL's bilinear filter (which widens its support when shrinking), before ToTensor.
    (B, 3, H, W) in [0, 1] -> (B, 3, size, size). 8-bit images go through PIL's RGB path
    exactly (8-bit rounding included); deeper ones through PIL's float mode, channel by
    channel, with the same filter."""
    out = []
    for img in x:
        if bit_depth == 8:
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            small = np.asarray(Image.fromarray(arr, "RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
            out.append(torch.from_numpy(small / 255.0).permute(2, 0, 1))
        else:
            chans = [np.asarray(Image.fromarray(c.float().numpy(), "F").resize((size, size), Image.BILINEAR))
                     for c in img]
            out.append(torch.from_numpy(np.stack(chans)).clamp(0, 1))
    return torch.stack(out).to(x.dtype)


def run_items(dehazer: Dehazer, items: Sequence[Item], out_dir: Path, protocol: str = "paper",
              resize: Optional[int] = None, save_coarse: bool = False, panels: int = 0,
              progress: bool = True) -> List[Dict[str, object]]:
    """Dehaze every item, write ``out_dir/restored/<name>`` (and ``coarse/``, ``panels/``);
    return one row per item with its metrics (empty without GT)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    out_dir = Path(out_dir)
    rows = []
    for k, item in enumerate(tqdm(items, desc="dehazing", unit="img", disable=not progress)):
        img = read_image(item.hazy)
        gt_img = read_image(item.gt) if item.gt is not None else None
        hazy, gt = img.tensor[None], (gt_img.tensor[None] if gt_img is not None else None)
        if resize:
            hazy = resize_image(hazy, resize, img.bit_depth)
            gt = resize_image(gt, resize, gt_img.bit_depth) if gt is not None else None
        elif gt is not None and gt.shape != hazy.shape:
            raise ValueError(f"size mismatch: {item.hazy} is {tuple(hazy.shape[-2:])} but {item.gt} is "
                             f"{tuple(gt.shape[-2:])}")
        result = dehazer(hazy)
        name = output_name(item.hazy)
        depth = img.bit_depth if item.hazy.suffix.lower() in TIFF_EXTENSIONS else 8
        write_image(result.restored[0], out_dir / "restored" / name, depth)
        if save_coarse:
            write_image(result.coarse[0], out_dir / "coarse" / name, depth)
        row: Dict[str, object] = {"name": item.name, "height": hazy.shape[-2], "width": hazy.shape[-1]}
        if gt is not None:
            m1, m2 = psnr_ssim(result.coarse, gt, protocol), psnr_ssim(result.restored, gt, protocol)
            row.update(psnr_stage1=m1["psnr"][0], ssim_stage1=m1["ssim"][0],
                       psnr_stage2=m2["psnr"][0], ssim_stage2=m2["ssim"][0])
        rows.append(row)
        if k < panels:
            tiles = [("hazy", hazy), ("stage 1", result.coarse), ("stage 2", result.restored)]
            if gt is not None:
                tiles += [("GT", gt), ("|stage 2 - GT|", error_map(result.restored, gt))]
            save_panel(tiles, out_dir / "panels" / (Path(name).stem + ".png"))
    return rows


def mean_metrics(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
    scored = [r for r in rows if "psnr_stage2" in r]
    return {c: sum(float(r[c]) for r in scored) / len(scored) for c in METRIC_COLUMNS} if scored else {}


def write_results(rows: Sequence[Dict[str, object]], out_dir: Path, protocol: str, title: str,
                  notes: Sequence[str] = ()) -> Dict[str, float]:
    """``metrics.csv`` (one row per image) and ``summary.md``; returns the means."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["name", "height", "width"] + METRIC_COLUMNS
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    means = mean_metrics(rows)
    lines = [f"# {title}", "", f"Metric protocol: {PROTOCOLS[protocol]}.", *[f"{n}" for n in notes], ""]
    if means:
        lines += ["| images | PSNR stage 1 | SSIM stage 1 | PSNR stage 2 | SSIM stage 2 |", "|---|---|---|---|---|",
                  f"| {sum(1 for r in rows if 'psnr_stage2' in r)} | {means['psnr_stage1']:.3f} | "
                  f"{means['ssim_stage1']:.4f} | {means['psnr_stage2']:.3f} | {means['ssim_stage2']:.4f} |", "",
                  "Per image:", "", "| image | PSNR S1 | SSIM S1 | PSNR S2 | SSIM S2 |", "|---|---|---|---|---|"]
        for r in rows:
            if "psnr_stage2" in r:
                lines.append(f"| {r['name']} | {r['psnr_stage1']:.3f} | {r['ssim_stage1']:.4f} | "
                             f"{r['psnr_stage2']:.3f} | {r['ssim_stage2']:.4f} |")
    else:
        lines.append(f"{len(rows)} image(s) dehazed; no ground truth, so no scores.")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return means


def fmt(x: Optional[float], digits: int) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
