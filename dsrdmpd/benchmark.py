"""Speed and memory report for DS-RDMPD, fast path against the straightforward path.

    python scripts/benchmark.py                                   # CPU, 256 and 512, paper widths
    python scripts/benchmark.py --device cuda --sizes 256 512 1024 --scene 4096 --variants all
    python scripts/benchmark.py --sizes 256 --train-size 256 --out results/bench

Paths compared (both give the same outputs to float32 rounding; tested):
* straightforward: the authors' code as written: every sampling step runs the whole
  network (noise decoder included) and recomputes the perceptual decoder's fusion terms;
  middle attention materialises the score matrix; training runs the frozen stage 1 on
  every step and the full network.
* fast (this package's default): fusion terms computed once per image, noise decoder
  skipped, fused attention kernel; training reuses each image's cached stage-1 output.

Variants (``--variants``) time the fast pipeline with the speed options of
:class:`dsrdmpd.inference.Dehazer` (fp32, bf16 autocast, channels_last, torch.compile)
and report the PSNR of each variant's output against the fp32 output.

Each case runs in a fresh process (CPU peak memory = that process's peak RSS; GPU =
max allocated). Times: median of --repeats after --warmup runs. Random weights (speed
does not depend on them; for the accuracy column pass --stage1/--stage2 checkpoints).
Writes benchmark.md and benchmark.csv with --out.
"""
from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import queue
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"fp32": {}, "fp32+cl": {"channels_last": True}, "tf32": {"precision": "tf32"},
            "tf32+cl": {"precision": "tf32", "channels_last": True}, "bf16-stage1": {"precision": "bf16-stage1"},
            "bf16-stage1+cl": {"precision": "bf16-stage1", "channels_last": True}, "bf16": {"precision": "bf16"},
            "bf16+cl": {"precision": "bf16", "channels_last": True},
            "bf16+cl+compile": {"precision": "bf16", "channels_last": True, "compile": True},
            "fp32+compile": {"compile": True}}


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


def _models(args, stage2=True):
    import torch
    from dsrdmpd.builders import build_stage1, build_stage2, load_stage1, load_stage2
    torch.manual_seed(0)
    s1 = load_stage1(args.stage1) if args.stage1 else build_stage1({"dim": args.dim1})
    if not stage2:
        return s1.eval(), None
    s2 = (load_stage2(args.stage2) if args.stage2 else
          build_stage2({"dim": args.dim2, "perceptual_decoder": not args.plain}))
    return s1.eval(), s2.eval()


def _peak(dev):
    import torch
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _case(args, spec, queue):
    """One measurement in this (fresh) process; puts a dict on ``queue``."""
    import torch
    from dsrdmpd.inference import Dehazer
    from dsrdmpd.models.unet_blocks import set_fused_attention
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, kind, size = args.device, spec["kind"], spec["size"]
    out = dict(spec)
    g = torch.Generator().manual_seed(0)
    if kind in ("stage1", "stage2_fast", "stage2_straightforward"):
        s1, s2 = _models(args, stage2=kind != "stage1")
        s1.to(dev)
        x = torch.rand(1, 3, size, size, generator=g).to(dev)
        with torch.inference_mode():
            if kind == "stage1":
                fn = lambda: s1(x)
            else:
                c = s1(x)
                s2.to(dev)
                fast = kind == "stage2_fast"
                set_fused_attention(s2, fast)
                fn = lambda: s2.sample(c, x, seed=0, fast=fast)
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            out["seconds"] = _timed(fn, dev, args.warmup, args.repeats)
        out["params_m"] = sum(p.numel() for p in (s1 if s2 is None else s2).parameters()) / 1e6
    elif kind == "pipeline":
        s1, s2 = _models(args)
        d = Dehazer(s1, s2, device=dev, **VARIANTS[spec["variant"]])
        x = torch.rand(spec["batch"], 3, size, size, generator=g)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sec = _timed(lambda: d(x), dev, args.warmup + (2 if "compile" in spec["variant"] else 0), args.repeats)
        out["seconds"] = sec
        out["ms_per_image"] = 1000 * sec / spec["batch"]
        out["img_per_s"] = spec["batch"] / sec
        if spec["variant"] != "fp32":
            ref = Dehazer(*_models(args), device=dev)(x).restored
            mse = ((d(x).restored - ref) ** 2).mean().item()
            out["psnr_vs_fp32"] = float("inf") if mse == 0 else 10 * math.log10(1 / mse)
    elif kind in ("train_fast", "train_straightforward"):
        fast = kind == "train_fast"
        if dev.startswith("cuda"):
            from dsrdmpd.training.common import configure_cuda
            configure_cuda(spec.get("tf32", True), spec.get("deterministic", True))
        s1, s2 = _models(args)
        s1.to(dev).requires_grad_(False)
        s2.to(dev).train()
        set_fused_attention(s2, fast)
        if fast:
            s2.net.noise_decoder.requires_grad_(False)
        opt = torch.optim.Adam([p for p in s2.parameters() if p.requires_grad], lr=8e-5)
        hazy = torch.rand(args.train_batch, 3, size, size, generator=g).to(dev)
        gt = torch.rand(args.train_batch, 3, size, size, generator=g).to(dev)
        with torch.no_grad():
            cached = s1(hazy)

        def step():
            with torch.no_grad():
                coarse = cached if fast else s1(hazy)
            t = torch.randint(0, s2.num_timesteps, (args.train_batch,), generator=g).to(dev)
            noise = torch.randn(gt.shape, generator=g).to(dev)
            loss = s2.training_loss(gt, coarse, hazy, t=t, noise=noise, full_network=not fast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sec = _timed(step, dev, args.warmup, args.repeats)
        out["seconds"] = sec
        out["it_per_s"] = 1 / sec
    elif kind == "scene":
        s1, s2 = _models(args)
        d = Dehazer(s1, s2, device=dev, tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch,
                    **VARIANTS[spec["variant"]])
        x = torch.rand(1, 3, size, size, generator=g)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        d(x)
        _sync(dev)
        out["seconds"] = time.perf_counter() - t0
    elif kind == "raster":
        from dsrdmpd.raster import RasterOptions, dehaze_raster
        if spec["networks"] == "passthrough":
            from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2
            s1, s2 = PassThroughStage1(), PassThroughStage2()
        else:
            s1, s2 = _models(args)
        d = Dehazer(s1, s2, device=dev, tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch)
        t0 = time.perf_counter()
        dehaze_raster(d, spec["path"], spec["path"] + ".out.tif", RasterOptions(bands=[3, 2, 1], progress=False))
        _sync(dev)
        out["seconds"] = time.perf_counter() - t0
        out["megapixels"] = size * size / 1e6
        Path(spec["path"] + ".out.tif").unlink()
    else:
        raise ValueError(kind)
    out["peak_mib"] = _peak(dev)
    queue.put(out)


def make_geotiff(path: Path, size: int) -> None:
    """A size x size, 4-band (B, G, R, NIR) uint16 GeoTIFF with 12-bit values, a UTM CRS and
    a nodata border, written strip by strip (tiled, DEFLATE)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    profile = dict(driver="GTiff", height=size, width=size, count=4, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(500000, 4000000, 10, 10), nodata=0, tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", predictor=2, bigtiff="if_safer")
    xx = np.arange(size)
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, size, 512):
            n = min(512, size - y0)
            yy = np.arange(y0, y0 + n)[:, None]
            base = 1500 + 1000 * np.sin(yy / 97.0) * np.cos(xx[None] / 131.0) + (yy * 7 + xx[None] * 13) % 61
            block = np.stack([base + 300 * k for k in range(4)]).clip(1, 4095).astype(np.uint16)
            block[:, :, :size // 50] = 0                      # a nodata strip on the left
            dst.write(block, window=Window(0, y0, size, n))


def run_case(args, **spec):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(args, spec, q))
    p.start()
    res = None
    while res is None:
        try:
            res = q.get(timeout=1)
        except queue.Empty:
            if not p.is_alive() and q.empty():      # died before reporting (error printed above)
                raise RuntimeError(f"benchmark case {spec} failed (exit {p.exitcode})") from None
    p.join()
    print(f"  {spec}: {res['seconds']:.3f} s, peak {res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return res


def _fmt(v, f="{:.3f}"):
    return "" if v is None else ("inf" if v == float("inf") else f.format(v))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512], help="square input sizes (may be empty)")
    ap.add_argument("--straightforward-max", type=int, default=1024,
                    help="largest size also timed on the straightforward path (it is slow and memory hungry)")
    ap.add_argument("--dim1", type=int, default=64, help="stage-1 width (paper: 64)")
    ap.add_argument("--dim2", type=int, default=64, help="stage-2 width (paper: 64)")
    ap.add_argument("--plain", action="store_true", help="stage 2 without the perceptual decoder")
    ap.add_argument("--stage1", help="stage-1 checkpoint instead of random weights")
    ap.add_argument("--stage2", help="stage-2 checkpoint instead of random weights")
    ap.add_argument("--variants", nargs="*", default=["fp32"],
                    help=f"pipeline variants among {list(VARIANTS)} ('all': every one)")
    ap.add_argument("--variant-sizes", type=int, nargs="*", help="sizes for the variants table (default: --sizes)")
    ap.add_argument("--scene-variant", default=None, help="variant for the tiled scenes (default: the last variant)")
    ap.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    ap.add_argument("--train-size", type=int, default=256, help="stage-2 training crop (0: skip training)")
    ap.add_argument("--train-batch", type=int, default=1, help="stage-2 training batch (paper: 1)")
    ap.add_argument("--scene", type=int, nargs="*", default=[], help="tiled scene sizes, e.g. 1024 2048 4096")
    ap.add_argument("--raster", type=int, nargs="*", default=[],
                    help="square uint16 GeoTIFF sizes streamed through dehaze_raster, e.g. 10000 20000")
    ap.add_argument("--raster-networks", choices=["passthrough", "models"], default="passthrough",
                    help="passthrough: stand-ins that return their input (the streaming, I/O and mapping alone); "
                         "models: the networks at --dim1/--dim2")
    ap.add_argument("--raster-dir", type=Path, default=None, help="where the synthetic GeoTIFFs go (default: temp)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--tile-batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", type=Path, help="folder for benchmark.md / benchmark.csv")
    args = ap.parse_args(argv)
    if args.variants == ["all"]:
        args.variants = list(VARIANTS)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)} (choose from {list(VARIANTS)})")

    def save(lines, records):
        """Write what is measured so far (a run cut short keeps its finished rows)."""
        if not args.out:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
        keys = sorted({k for r in records for k in r})
        with open(args.out / "benchmark.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(records)

    import torch
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but CUDA is not available")
    from dsrdmpd.machine import cpu_model
    machine = (torch.cuda.get_device_name() if cuda else
               f"{cpu_model()}, {args.threads or torch.get_num_threads()} threads")
    mem = "GPU max allocated" if cuda else "process peak RSS"
    records = []
    lines = [f"Device: {args.device} ({machine}); torch {torch.__version__}; stage-1 dim {args.dim1}, stage-2 dim "
             f"{args.dim2} ({'plain' if args.plain else 'perceptual'} decoder), 5 sampling steps; median of "
             f"{args.repeats} after {args.warmup} warm-up; memory = {mem} (MiB).", ""]

    if args.sizes:
        lines += ["| size | stage 1 (s) | stage 2 fast (s) | stage 2 straightforward (s) | speed-up | "
                  "pipeline img/s fast | pipeline img/s straightforward | peak S1 / S2 fast / S2 straightf. |",
                  "|---|---|---|---|---|---|---|---|"]
        for size in args.sizes:
            s1 = run_case(args, kind="stage1", size=size)
            fast = run_case(args, kind="stage2_fast", size=size)
            slow = (run_case(args, kind="stage2_straightforward", size=size)
                    if size <= args.straightforward_max else None)
            records += [s1, fast] + ([slow] if slow else [])
            sp = slow["seconds"] / fast["seconds"] if slow else None
            lines.append(f"| {size} | {_fmt(s1['seconds'])} | {_fmt(fast['seconds'])} | "
                         f"{_fmt(slow and slow['seconds'])} | {_fmt(sp, '{:.2f}x')} | "
                         f"{_fmt(1 / (s1['seconds'] + fast['seconds']))} | "
                         f"{_fmt(slow and 1 / (s1['seconds'] + slow['seconds']))} | {s1['peak_mib']:.0f} / "
                         f"{fast['peak_mib']:.0f} / {_fmt(slow and slow['peak_mib'], '{:.0f}')} |")
            save(lines, records)
        lines.append("")

    variant_sizes = args.sizes if args.variant_sizes is None else args.variant_sizes
    if args.variants and variant_sizes and (args.variants != ["fp32"] or args.batch > 1):
        lines += [f"Pipeline variants (both stages through `Dehazer`, batch {args.batch}):", "",
                  "| size | variant | ms / image | img/s | PSNR vs fp32 (dB) | peak |", "|---|---|---|---|---|---|"]
        for size in variant_sizes:
            for v in args.variants:
                r = run_case(args, kind="pipeline", size=size, variant=v, batch=args.batch)
                records.append(r)
                lines.append(f"| {size} | {v} | {r['ms_per_image']:.1f} | {r['img_per_s']:.2f} | "
                             f"{_fmt(r.get('psnr_vs_fp32'), '{:.1f}') or 'reference'} | {r['peak_mib']:.0f} |")
                save(lines, records)
        lines.append("")

    if args.train_size:
        fast = run_case(args, kind="train_fast", size=args.train_size)
        slow = run_case(args, kind="train_straightforward", size=args.train_size)
        records += [fast, slow]
        cuda_note = " (CUDA: the trainer's defaults, TF32 on, deterministic algorithms)" if cuda else ""
        lines += [f"Stage-2 training step ({args.train_size}x{args.train_size}, batch {args.train_batch}, "
                  f"Adam){cuda_note}:", "",
                  "| path | s / step | it/s | peak |", "|---|---|---|---|",
                  f"| fast (cached stage 1, residual decoder only) | {fast['seconds']:.3f} | {fast['it_per_s']:.3f} | "
                  f"{fast['peak_mib']:.0f} |",
                  f"| straightforward (stage 1 every step, full network) | {slow['seconds']:.3f} | "
                  f"{slow['it_per_s']:.3f} | {slow['peak_mib']:.0f} |",
                  f"| speed-up | {slow['seconds'] / fast['seconds']:.2f}x | | |"]
        if cuda:
            for label, opts in (("fast, not deterministic (train.deterministic: false)", {"deterministic": False}),
                                ("fast, true float32 (train.tf32: false)", {"tf32": False})):
                r = run_case(args, kind="train_fast", size=args.train_size, **opts)
                records.append(r)
                lines.append(f"| {label} | {r['seconds']:.3f} | {r['it_per_s']:.3f} | {r['peak_mib']:.0f} |")
        lines.append("")
        save(lines, records)

    if args.scene:
        v = args.scene_variant or (args.variants[-1] if args.variants else "fp32")
        if v not in VARIANTS:
            ap.error(f"unknown scene variant {v!r}")
        lines += [f"Tiled scenes (tile {args.tile}, overlap {args.overlap}, {args.tile_batch} tile(s) per call, "
                  f"variant {v}; one run each):", "", "| scene | tiles | seconds | peak |", "|---|---|---|---|"]
        from dsrdmpd.inference import padded_size, tile_starts
        for size in args.scene:
            r = run_case(args, kind="scene", size=size, variant=v)
            records.append(r)
            n = len(tile_starts(padded_size(size, size)[0], args.tile, args.overlap)) ** 2
            lines.append(f"| {size}x{size} | {n} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")
        lines.append("")

    if args.raster:
        import tempfile
        folder = Path(tempfile.mkdtemp(dir=args.raster_dir))
        nets = ("pass-through stand-ins" if args.raster_networks == "passthrough"
                else f"networks at stage-1 dim {args.dim1}, stage-2 dim {args.dim2}")
        lines += [f"Streamed GeoTIFFs (4-band uint16, 12-bit, nodata strip; RGB = 3,2,1; tile {args.tile}, overlap "
                  f"{args.overlap}, {args.tile_batch} tile(s) per call; {nets}; one run each, the input written "
                  "before the timing):", "", "| scene | megapixels | input file (MiB) | seconds | s / Mpx | peak |",
                  "|---|---|---|---|---|---|"]
        for size in args.raster:
            path = folder / f"scene_{size}.tif"
            make_geotiff(path, size)
            r = run_case(args, kind="raster", size=size, path=str(path), networks=args.raster_networks)
            r["file_mib"] = path.stat().st_size / 2 ** 20
            path.unlink()
            records.append(r)
            lines.append(f"| {size}x{size} | {r['megapixels']:.0f} | {r['file_mib']:.0f} | {r['seconds']:.1f} | "
                         f"{r['seconds'] / r['megapixels']:.2f} | {r['peak_mib']:.0f} |")
            save(lines, records)
        folder.rmdir()
        lines.append("")

    save(lines, records)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
