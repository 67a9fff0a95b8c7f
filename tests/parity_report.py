"""Measure how far the authors' float32 results are from exact, in units of our own float32
rounding, on the parity fixture sets; optionally bf16 accuracy against float32.

    .venv/bin/python tests/parity_report.py [--sets DIR ...] [--out results/parity_report.md]
                                            [--bf16 [--seeds S ...] [--trained STAGE1 STAGE2 ...]]

Produces the README "Tests" tables. For every set (default: the in-repository ones, as in
tests/conftest.py) and every compared tensor it runs our code in float32 and in float64
(tests/parity_cases.py, the same cases the parity tests check) and reports the worst ratio
``max|authors - exact| / d32`` per kind of output (in brackets the range of d32), the worst
rms ratio, and for the chain how many 8-bit levels of the restored images differ from the
authors'. ``--bf16`` adds restored PSNR of precision 'bf16-stage1' and 'bf16' against
float32 on every set's chain, on randomly initialised tiny models (``--seeds``)
(configs/stage*_tiny.yaml widths) and on ``--trained`` checkpoint pairs. A development
script, not part of the suite.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsrdmpd.atomicfile import write_text_atomic
from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.imageio import read_image
from dsrdmpd.inference import Dehazer

from conftest import DEFAULT_PARITY_DIRS, ROOT
from fixture_recipe import write_official_checkpoints
from parity_bounds import compare, to_levels
from parity_cases import (chain_dehazer, exact_chain, stage1_case, stage2_case, stage2_output_parity,
                          stage2_sample)
from test_speed_options import psnr

KINDS = ["stage 1", "stage-2 decoders", "5-step samples", "chain restored"]
PRECISIONS = ["bf16-stage1", "bf16"]
TINY = ({"dim": 32}, {"dim": 8})        # configs/stage1_tiny.yaml, configs/stage2_tiny.yaml widths


def set_parities(folder: Path) -> dict:
    """{kind: [Parity, ...]} for one fixture set, and 'levels': [(differing, pixels), ...] of the chain."""
    found = {k: [] for k in KINDS}
    found["levels"] = []
    for f in sorted(folder.glob("stage1_mcess_unet*.pt")):
        fx, out, exact = stage1_case(f)
        found["stage 1"].append(compare(f.name, out, exact, fx["output"]))
    for f in sorted(folder.glob("stage2_perceptual*.pt")) + sorted(folder.glob("stage2_plain*.pt")):
        fx, diffusion, exact = stage2_case(f)
        found["stage-2 decoders"] += stage2_output_parity(fx, diffusion, exact)
        for fast in (True, False):
            out, _ = stage2_sample(fx, diffusion, fast)
            found["5-step samples"].append(compare(f.name, out, exact["sample"], fx["sample_output"]))
    chain = folder / "chain"
    if chain.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            write_official_checkpoints(chain, Path(tmp))
            _, expected, dehazer = chain_dehazer(chain, Path(tmp))
            for name, exp in expected.items():
                hazy = read_image(chain / "data" / "hazy" / name).tensor[None]
                ours = dehazer(hazy).restored
                found["chain restored"].append(compare(name, ours, exact_chain(dehazer, hazy).restored, exp["restored"]))
                found["levels"].append((int((to_levels(ours) != to_levels(exp["restored"])).sum()), ours.numel()))
    return found


def _cell(parities: list) -> str:
    if not parities:
        return "-"
    ratio = max(p.err / max(p.d32, 1e-30) for p in parities)
    d32 = [p.d32 for p in parities]
    return f"{ratio:.2f} ({min(d32):.1e} .. {max(d32):.1e})"


def _rms_ratio(p) -> float:
    return p.rms_err / max(p.rms_d32, 1e-30)


def parity_table(sets: list) -> str:
    lines = ["| set | " + " | ".join(KINDS) + " | worst rms ratio (networks & samples / chain) | 8-bit levels differing (chain) |",
             "|---" * (len(KINDS) + 3) + "|"]
    for folder in sets:
        found = set_parities(folder)
        nets = [p for k in KINDS[:3] for p in found[k]]
        rms = " / ".join(f"{max(map(_rms_ratio, ps)):.2f}" if ps else "-" for ps in (nets, found["chain restored"]))
        levels = found["levels"]
        lv = (f"{min(d for d, _ in levels)}-{max(d for d, _ in levels)} of {levels[0][1]} per image"
              if levels else "-")
        lines.append(f"| {folder.name} | " + " | ".join(_cell(found[k]) for k in KINDS) + f" | {rms} | {lv} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _weight_rms(model: torch.nn.Module) -> float:
    """Root mean square of all convolution weights: the scale bf16's relative errors act on."""
    ws = [m.weight.detach().double().flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return torch.cat(ws).pow(2).mean().sqrt().item()


def bf16_psnr(make_dehazer, hazy: torch.Tensor) -> dict:
    """{precision: restored PSNR against the float32 Dehazer}, plus what the accuracy may
    depend on: 'w1' / 'w2' the rms of each stage's conv weights, 'sat' the share of the
    float32 restored values at the clamp (0 or 1). ``make_dehazer(precision)`` builds a fresh one."""
    fp32 = make_dehazer("fp32")
    ref = fp32(hazy)
    stats = {"w1": _weight_rms(fp32.stage1), "w2": _weight_rms(fp32.stage2.net),
             "sat": ((ref.restored <= 0) | (ref.restored >= 1)).double().mean().item()}
    runs = {p: make_dehazer(p)(hazy) for p in PRECISIONS}
    # per image (test_bf16_accuracy_cpu scores a set's first image): restored, and the coarse
    # image of stage 1 in bf16 (the same in both precisions)
    per_image = {f"{p} per image": [psnr(out.restored[i], ref.restored[i]) for i in range(len(hazy))]
                 for p, out in runs.items()}
    per_image["coarse per image"] = [psnr(runs["bf16"].coarse[i], ref.coarse[i]) for i in range(len(hazy))]
    return {**{p: psnr(out.restored, ref.restored) for p, out in runs.items()}, **per_image, **stats}


def bf16_cases(sets: list, seeds: list, trained: list) -> list:
    """(case name, bf16_psnr's dict) for every set's chain, random tiny models of ``seeds`` (on
    2 random 64 x 96 images) and the ``trained`` (stage-1, stage-2) checkpoint pairs (on the first chain's images)."""
    cases, first_hazy = [], None
    for folder in sets:
        chain = folder / "chain"
        if not chain.is_dir():
            continue
        hazy = torch.stack([read_image(p).tensor for p in sorted((chain / "data" / "hazy").iterdir())])
        first_hazy = hazy if first_hazy is None else first_hazy
        with tempfile.TemporaryDirectory() as tmp:
            write_official_checkpoints(chain, Path(tmp))
            # the Dehazer of test_bf16_accuracy_cpu: the set's sizes and sampling seed
            cases.append((f"{folder.name} chain", bf16_psnr(lambda p: chain_dehazer(chain, Path(tmp), precision=p)[2],
                                                            hazy)))
        print(cases[-1], flush=True)
    for seed in seeds:
        torch.manual_seed(seed)
        s1, s2 = build_stage1(TINY[0]).eval(), build_stage2(TINY[1]).eval()
        images = torch.rand(2, 3, 64, 96)
        cases.append((f"random tiny model and images, seed {seed}",
                      bf16_psnr(lambda p: Dehazer(copy.deepcopy(s1), copy.deepcopy(s2), precision=p), images)))
        print(cases[-1], flush=True)
    if trained and first_hazy is None:
        raise SystemExit("parity_report: --trained needs a set with a chain (its hazy images are the input)")
    for i, ckpts in enumerate(trained):
        cases.append((f"trained pair {i + 1} ({Path(ckpts[1]).parent.parent.name})",
                      bf16_psnr(lambda p: Dehazer.from_checkpoints(*ckpts, precision=p), first_hazy)))
        print(cases[-1], flush=True)
    return cases


def bf16_table(cases: list) -> str:
    lines = ["| precision | min | median | max | over |", "|---|---|---|---|---|"]
    for p in PRECISIONS:
        values = [c[1][p] for c in cases]
        lines.append(f"| {p} | {min(values):.1f} dB | {statistics.median(values):.1f} dB | {max(values):.1f} dB "
                     f"| {len(values)} cases |")
    lines += ["", "| case | " + " | ".join(PRECISIONS) + " | conv weight rms (stage 1 / 2) | restored at the clamp |",
              "|---" * (len(PRECISIONS) + 3) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v[p]:.1f} dB" for p in PRECISIONS)
              + f" | {v['w1']:.3f} / {v['w2']:.3f} | {100 * v['sat']:.1f} % |" for name, v in cases]
    each = lambda values: " / ".join(f"{x:.1f}" for x in values)      # noqa: E731
    kinds = [f"{p} per image" for p in PRECISIONS] + ["coarse per image"]
    lines += ["", "Per image, in input order (dB):", "", "| case | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(each(v[k]) for k in kinds) + " |" for name, v in cases]
    chains = [v for name, v in cases if name.endswith(" chain")]     # what test_bf16_accuracy_cpu scores
    for k in kinds if chains else []:
        values = [x for v in chains for x in v[k]]
        firsts = [v[k][0] for v in chains]
        lines.append(f"\n{k}, chain sets only: {min(values):.1f}-{max(values):.1f} dB over {len(values)} images; "
                     f"first images {min(firsts):.1f}-{max(firsts):.1f} dB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", type=Path, default=DEFAULT_PARITY_DIRS,
                    help="fixture folders (default: the in-repository sets)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "parity_report.md")
    ap.add_argument("--bf16", action="store_true", help="also measure bf16 accuracy against float32")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3],
                    help="seeds of the random tiny models for --bf16 (default 0 1 2 3; none: no random models)")
    ap.add_argument("--trained", nargs=2, action="append", default=[], metavar=("STAGE1", "STAGE2"),
                    help="for --bf16: a trained checkpoint pair (e.g. the demo's best.pt files); repeatable")
    ap.add_argument("--skip-parity", action="store_true", help="only the bf16 part")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.sets if not d.is_dir()] + [f for pair in args.trained for f in pair
                                                               if not Path(f).is_file()]
    if missing:
        print(f"parity_report: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    started = time.time()
    parts = [f"Parity report (torch {torch.__version__}, {torch.get_num_threads()} threads)", ""]
    if not args.skip_parity:
        parts += ["Worst ratio max|authors - exact| / d32 per kind (in brackets the range of d32):", "",
                  parity_table(args.sets), ""]
    if args.bf16:
        parts += ["Restored PSNR against float32:", "", bf16_table(bf16_cases(args.sets, args.seeds, args.trained)), ""]
    parts.append(f"({time.time() - started:.0f} s)")
    text = "\n".join(parts) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
