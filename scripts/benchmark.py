"""Speed and memory of the DS-RDMPD pipeline (paper configuration by default).

    python scripts/benchmark.py                      # CPU, 256x256, dim 64
    python scripts/benchmark.py --device cuda --sizes 256 512

Each case runs in a fresh process (so CPU peak RSS is per case); timings are the median
of --repeats runs after --warmup runs. Random weights: speed does not depend on them.
Prints a markdown table and, with --out, writes it (plus a CSV) to disk.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _case(args, name, size, queue):
    import torch
    from dsrdmpd.builders import build_stage1, build_stage2
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    s1 = build_stage1({"dim": args.dim1}).to(dev).eval()
    s2 = build_stage2({"dim": args.dim2, "perceptual_decoder": not args.plain}).to(dev).eval()
    x = torch.rand(1, 3, size, size, device=dev)
    with torch.no_grad():
        c = s1(x)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        if name == "stage1":
            sec = _timed(lambda: s1(x), dev, args.warmup, args.repeats)
        elif name == "stage2_fast":
            sec = _timed(lambda: s2.sample(c, x, seed=0, fast=True), dev, args.warmup, args.repeats)
        elif name == "stage2_straightforward":
            sec = _timed(lambda: s2.sample(c, x, seed=0, fast=False), dev, args.warmup, args.repeats)
        else:
            raise ValueError(name)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    params = sum(p.numel() for p in (s1 if name == "stage1" else s2).parameters()) / 1e6
    queue.put({"case": name, "size": size, "seconds": sec, "peak_mib": peak, "params_m": params})


def run_case(args, name, size):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(args, name, size, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"benchmark case {name} at {size} failed (exit {p.exitcode})")
    return q.get()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--dim1", type=int, default=64, help="stage-1 width (paper: 64)")
    ap.add_argument("--dim2", type=int, default=64, help="stage-2 width (paper: 64)")
    ap.add_argument("--plain", action="store_true", help="stage 2 without the perceptual decoder")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", type=Path, help="folder for benchmark.md / benchmark.csv")
    args = ap.parse_args(argv)

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but CUDA is not available")
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"CPU, {torch.get_num_threads()} threads")
    rows = []
    for size in args.sizes:
        res = {n: run_case(args, n, size) for n in ("stage1", "stage2_fast", "stage2_straightforward")}
        ratio = res["stage2_straightforward"]["seconds"] / res["stage2_fast"]["seconds"]
        rows.append({"size": size,
                     "stage1_s": res["stage1"]["seconds"],
                     "stage2_fast_s": res["stage2_fast"]["seconds"],
                     "stage2_straightforward_s": res["stage2_straightforward"]["seconds"],
                     "speedup": ratio,
                     "pipeline_fast_img_per_s": 1 / (res["stage1"]["seconds"] + res["stage2_fast"]["seconds"]),
                     "stage1_params_m": res["stage1"]["params_m"], "stage2_params_m": res["stage2_fast"]["params_m"],
                     "peak_mib_stage1": res["stage1"]["peak_mib"], "peak_mib_stage2_fast": res["stage2_fast"]["peak_mib"],
                     "peak_mib_stage2_straightforward": res["stage2_straightforward"]["peak_mib"]})
    mem = "GPU max allocated" if args.device.startswith("cuda") else "process peak RSS"
    lines = [f"Device: {args.device} ({machine}); stage-1 dim {args.dim1}, stage-2 dim {args.dim2} "
             f"({'plain' if args.plain else 'perceptual'} decoder), 5 sampling steps, batch 1; "
             f"median of {args.repeats} after {args.warmup} warm-up; memory = {mem}.", "",
             "| size | stage 1 (s) | stage 2 fast (s) | stage 2 straightforward (s) | speed-up | pipeline img/s (fast) "
             "| params S1 / S2 (M) | peak MiB S1 / S2 fast / S2 straightforward |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['stage1_s']:.3f} | {r['stage2_fast_s']:.3f} | "
                     f"{r['stage2_straightforward_s']:.3f} | {r['speedup']:.2f}x | {r['pipeline_fast_img_per_s']:.3f} | "
                     f"{r['stage1_params_m']:.1f} / {r['stage2_params_m']:.1f} | {r['peak_mib_stage1']:.0f} / "
                     f"{r['peak_mib_stage2_fast']:.0f} / {r['peak_mib_stage2_straightforward']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.md").write_text(table + "\n")
        with open(args.out / "benchmark.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
