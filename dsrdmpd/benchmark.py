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
:class:`dsrdmpd.inference.Dehazer` (fp32 / tf32 / bf16 autocast, channels_last,
torch.compile, the fast GroupNorm ``fastnorm`` and CUDA graphs ``graphs``) for every
size x batch (``--variant-sizes`` x ``--batches``, or the pairs of ``--pairs 256x1 512x8``)
and report per image: milliseconds, images/s, kernel launches (CUDA: host-side launch
calls, graph launches included, and the GPU kernels seen, from ``torch.profiler`` over
one call), achieved TFLOP/s (the FLOPs of one call counted once per size and batch with
``torch.utils.flop_counter`` on the meta device: convolutions, matrix products and
attention) and their fraction of the card's peak for the variant's precision (the
datasheet table ``PEAK_TFLOPS`` or ``--peak-tflops``), the PSNR against the fp32
output, and peak memory. ``--compile-sizes`` times the first call of a compiled
pipeline with an empty and then with a filled inductor cache (cold / warm), each in a
fresh process; ``--aot-sizes`` the first call through an ahead-of-time compiled package
(:mod:`dsrdmpd.aot`): its build, then its load in a fresh process.

Each case runs in a fresh process (CPU peak memory = that process's peak RSS; GPU =
max allocated). On CUDA the variants of one size and batch share a process (peak memory
reset between them; the processes' start-up cost dominated short GPU runs).
Times: median of --repeats after --warmup runs. Random weights (speed
does not depend on them; for the accuracy column pass --stage1/--stage2 checkpoints).
``--case-timeout`` stops a case that runs too long (its row says so). Writes
benchmark.md and benchmark.csv with --out (after every row, so a run cut short keeps its
finished rows).
"""
from __future__ import annotations

import argparse
import functools
import math
import multiprocessing as mp
import queue
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

from .profiling import count_launches, module_breakdown, top_kernels

VARIANTS = {"fp32": {}, "fp32+cl": {"channels_last": True}, "tf32": {"precision": "tf32"},
            "tf32+cl": {"precision": "tf32", "channels_last": True}, "bf16-stage1": {"precision": "bf16-stage1"},
            "bf16-stage1+cl": {"precision": "bf16-stage1", "channels_last": True}, "bf16": {"precision": "bf16"},
            "bf16+cl": {"precision": "bf16", "channels_last": True},
            "bf16+cl+compile": {"precision": "bf16", "channels_last": True, "compile": True},
            "fp32+compile": {"compile": True},
            "fp32+fastnorm": {"fast_norm": True}, "fp32+graphs": {"cuda_graphs": True},
            "fp32+fastnorm+graphs": {"fast_norm": True, "cuda_graphs": True},
            "tf32+fastnorm": {"precision": "tf32", "fast_norm": True},
            "tf32+graphs": {"precision": "tf32", "cuda_graphs": True},
            "tf32+fastnorm+graphs": {"precision": "tf32", "fast_norm": True, "cuda_graphs": True},
            "tf32+cl+fastnorm+graphs": {"precision": "tf32", "channels_last": True, "fast_norm": True,
                                        "cuda_graphs": True},
            "bf16+cl+fastnorm+graphs": {"precision": "bf16", "channels_last": True, "fast_norm": True,
                                        "cuda_graphs": True}}

BREAKDOWN_ROWS = 12     # module classes listed per case in benchmark.md

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's data sheets (the sheets list the
# tensor-core figures with sparsity, twice these), SXM boards unless named; "fp32" is the
# non-tensor-core rate. Matched against torch.cuda.get_device_name() in order; a card not
# listed gets no fraction unless --peak-tflops is given. Not measured here.
PEAK_TFLOPS = (("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
               ("H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
               ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
               ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
               ("H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
               ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}))
# the rate that bounds each precision setting (bf16-stage1 runs stage 2, most of the work, in fp32)
PEAK_KIND = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "bf16-stage1": "fp32"}


def peak_tflops(device_name: str, precision: str, override: float = 0.0):
    """The card's dense peak for ``precision`` (see PEAK_TFLOPS), ``override`` if set, else None."""
    if override:
        return override
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[PEAK_KIND[precision]]
    return None


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
    from .builders import build_stage1, build_stage2, load_stage1, load_stage2
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


def count_flops(args, size: int, batch: int) -> float:
    """FLOPs of one pipeline call on (batch, 3, size, size), counted on the meta device
    (no arithmetic; same networks as the timed ones; attention is counted in its math form,
    which differs from a fused kernel's count by well under 1 %). Counting runs every
    operator through Python (seconds even for tiny models), so each count is kept per
    process for the same networks and shape."""
    return _count_flops(args.stage1, args.stage2, args.dim1, args.dim2, args.plain, size, batch)


@functools.lru_cache(maxsize=None)
def _count_flops(stage1, stage2, dim1, dim2, plain, size, batch) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from .inference import Dehazer
    args = argparse.Namespace(stage1=stage1, stage2=stage2, dim1=dim1, dim2=dim2, plain=plain)
    with torch.device("meta"):
        s1, s2 = _models(args)
    d = Dehazer(s1, s2, device="meta")
    with FlopCounterMode(display=False) as counter:
        d(torch.rand(batch, 3, size, size))
    return float(counter.get_total_flops())


def psnr_over_batch(out, ref) -> float:
    """PSNR (dB, peak 1) of ``out`` against ``ref`` over the whole batch; inf where equal."""
    mse = ((out - ref) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def _first_call(d, x, dev):
    """(``d(x)``, seconds to its end, the device synchronised)."""
    t0 = time.perf_counter()
    out = d(x)
    _sync(dev)
    return out, time.perf_counter() - t0


def _pipeline(args, spec, dev, torch, emit):
    """The variants of one size and batch, one Dehazer after another; ``emit(row)`` as each
    is measured (so a later variant that crashes or runs out of time loses only itself)."""
    import gc
    from .inference import Dehazer
    size, batch = spec["size"], spec["batch"]
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = None
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else ""
    for v in spec["variants"]:
        if dev.startswith("cuda"):
            # the previous Dehazer (a reference cycle with its GraphRunner) and its graphs' memory
            # pools are freed first, so that they count neither in this variant's peak nor in its time
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        d = Dehazer(*_models(args), device=dev, **VARIANTS[v])
        sec = _timed(lambda: d(x), dev, args.warmup + (2 if "compile" in v else 0), args.repeats)
        row = dict(kind="pipeline", size=size, batch=batch, variant=v, seconds=sec, ms_per_image=1000 * sec / batch,
                   img_per_s=batch / sec, peak_mib=_peak(dev))
        flops = spec.get("flops")
        if flops:
            row["tflops_per_image"] = flops / batch / 1e12
            row["tflop_s"] = flops / sec / 1e12
            peak = peak_tflops(name, VARIANTS[v].get("precision", "fp32"), args.peak_tflops) if name or \
                args.peak_tflops else None
            if peak:
                row["peak_tflop_s"] = peak
                row["fraction_of_peak"] = row["tflop_s"] / peak
        if dev.startswith("cuda") and args.profile:
            kernel_us = {}
            launches, kernels = count_launches(lambda: d(x), kernel_us)
            row["launches_per_image"], row["kernels_per_image"] = launches / batch, kernels / batch
            # GPU time (kernels, copies) per image against the wall time: well below it, the card waits for the host
            row["gpu_busy_ms_per_image"] = sum(kernel_us.values()) / 1000 / batch
            row["top_kernels"] = top_kernels(kernel_us, batch)
        out = d(x).restored
        if v == "fp32":
            ref = out
        elif ref is None:
            ref = Dehazer(*_models(args), device=dev)(x).restored
        if v != "fp32":
            row["psnr_vs_fp32"] = psnr_over_batch(out, ref)
        emit(row)
        del d


def _breakdown(args, spec, dev, torch, emit):
    """For each variant of one size and batch: one eager call (after the warm-up) split by
    module class (:func:`dsrdmpd.profiling.module_breakdown`); ``emit(row)`` per class."""
    from .inference import Dehazer
    size, batch = spec["size"], spec["batch"]
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for v in spec["variants"]:
        d = Dehazer(*_models(args), device=dev, **VARIANTS[v])
        for _ in range(max(1, args.warmup)):        # caches filled, kernels compiled before the profiled call
            d(x)
        rows = module_breakdown(lambda: d(x), (d.stage1, d.stage2), cuda=dev.startswith("cuda"))
        whole = sum(r["self_us"] for r in rows) or 1.0
        for r in rows:
            emit(dict(kind="breakdown", size=size, batch=batch, variant=v, module=r["module"],
                      calls_per_image=r["calls"] / batch, own_ms_per_image=r["self_us"] / 1000 / batch,
                      total_ms_per_image=r["total_us"] / 1000 / batch, share=r["self_us"] / whole,
                      seconds=r["self_us"] / 1e6, peak_mib=_peak(dev)))
        del d


# Dynamo's phases of a first compiled call, as torch._dynamo.utils.compilation_time_metrics
# names them (seconds per compiled frame): tracing the Python code, the backend (inductor's
# compile, or its load from the cache) and building the guards
COMPILE_PHASES = {"tracing_s": "bytecode_tracing", "backend_s": "OutputGraph.call_user_compiler",
                  "guards_s": "build_guards"}


def compile_phases(metrics) -> dict:
    """{column: seconds} of each phase in ``COMPILE_PHASES``, summed over the frames of
    ``metrics`` ({phase name: [seconds per frame]}); a phase it lacks is left out."""
    return {col: float(sum(metrics[name])) for col, name in COMPILE_PHASES.items() if metrics.get(name)}


def _first_compiled_call(args, spec, dev, torch):
    """Seconds to the end of the first compiled call and in Dynamo's phases of it, then the
    steady call (inductor cache in spec['cache_dir'], empty for 'cold', filled by an
    earlier process for 'warm')."""
    from torch._dynamo import utils as dynamo_utils
    from .inference import Dehazer
    x = torch.rand(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    d = Dehazer(*_models(args), device=dev, **VARIANTS[spec["variant"]])
    _, first = _first_call(d, x, dev)
    phases = compile_phases(getattr(dynamo_utils, "compilation_time_metrics", {}))   # private: may be absent
    return dict(spec, first_call_s=first, **phases, seconds=_timed(lambda: d(x), dev, 1, args.repeats))


def _first_aot_call(args, spec, dev, torch):
    """Seconds to the end of the first call through an ahead-of-time compiled pipeline (a
    build with spec['aot_dir'] empty, a load from a fresh process once an earlier one built
    it) and the parts of it (export_s, compile_s, load_s), then the steady call and the
    PSNR against the eager fp32 pipeline."""
    from .inference import Dehazer
    x = torch.rand(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    d = Dehazer(*_models(args), device=dev, aot=spec["aot_dir"], **VARIANTS[spec["variant"]])
    out, first = _first_call(d, x, dev)
    parts = {}                                           # summed over the programs (stage 1, terms, step)
    for times in d.aot.timings.values():
        for k, v in times.items():
            parts[k] = parts.get(k, 0.0) + v
    row = dict(spec, first_call_s=first, **parts, builds=d.aot.builds,
               seconds=_timed(lambda: d(x), dev, 1, args.repeats), peak_mib=_peak(dev))
    del row["aot_dir"]                                   # a temporary folder, gone after the run
    eager = Dehazer(*_models(args), device=dev)
    row["psnr_vs_fp32"] = psnr_over_batch(out.restored, eager(x).restored)
    row["eager_fp32_seconds"] = _timed(lambda: eager(x), dev, 1, args.repeats)    # side by side, same process
    return row


def _case(args, spec, queue):
    """One measurement in this (fresh) process: puts ("row", dict) on ``queue`` for each row
    measured (one, or one per variant of a pipeline group), then ("end", None)."""
    if spec["kind"] == "compile":
        from .compile_cache import use_compile_cache
        use_compile_cache(spec["cache_dir"])         # the mechanism of Dehazer(compile_cache=...) and the tools
    import os
    import torch
    from .inference import Dehazer
    from .models.unet_blocks import set_fused_attention
    from .models.norm import set_fast_norm
    # the kernel count profiles once per variant while CUDA graphs exist: keep CUPTI set up
    # between profiler sessions (PyTorch does the same for inductor's graphs; re-initialising
    # CUPTI after a teardown with graphs alive has crashed on CUDA 11/12)
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
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
    elif kind in ("pipeline", "breakdown"):
        (_pipeline if kind == "pipeline" else _breakdown)(args, spec, dev, torch, lambda row: queue.put(("row", row)))
        queue.put(("end", None))
        return
    elif kind == "compile":
        out = _first_compiled_call(args, spec, dev, torch)
    elif kind == "aot":
        out = _first_aot_call(args, spec, dev, torch)
    elif kind in ("train_fast", "train_straightforward"):
        fast = kind == "train_fast"
        if dev.startswith("cuda"):
            from .training.common import configure_cuda
            configure_cuda(spec.get("tf32", True), spec.get("deterministic", True))
        s1, s2 = _models(args)
        s1.to(dev).requires_grad_(False)
        s2.to(dev).train()
        set_fused_attention(s2, fast)
        set_fast_norm(s2, bool(spec.get("fast_norm")))        # train.fast_norm
        if fast:
            s2.net.noise_decoder.requires_grad_(False)
        from .training.step_options import (GraphedTrainingStep, StepOptions, make_adam,
                                            to_memory_format)
        # the trainer's step options (train.fused_optimizer / cuda_graph / channels_last / precision)
        fused = spec["fused"] if "fused" in spec else (True if dev.startswith("cuda") else None)   # auto
        options = StepOptions(bool(spec.get("channels_last")), fused, bool(spec.get("cuda_graph")))
        if options.channels_last:
            s2.to(memory_format=torch.channels_last)
        opt = make_adam([p for p in s2.parameters() if p.requires_grad], 8e-5, options, torch.device(dev))
        hazy = torch.rand(args.train_batch, 3, size, size, generator=g).to(dev)
        gt = torch.rand(args.train_batch, 3, size, size, generator=g).to(dev)
        with torch.no_grad():
            cached = s1(hazy)
        bf16 = spec.get("precision") == "bf16"

        def loss_of(gt, coarse, hazy, t, noise):
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                return s2.training_loss(gt, coarse, hazy, t=t, noise=noise, full_network=not fast)
        graphed = GraphedTrainingStep(loss_of, s2, opt) if options.cuda_graph else None

        def step():
            with torch.no_grad():
                coarse = cached if fast else s1(hazy)
            t = torch.randint(0, s2.num_timesteps, (args.train_batch,), generator=g).to(dev)
            noise = torch.randn(gt.shape, generator=g).to(dev)
            inputs = to_memory_format((gt, coarse, hazy, t, noise), options.channels_last)
            if graphed is not None:
                graphed(*inputs)
                return
            loss = loss_of(*inputs)
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
        from .raster import RasterOptions, dehaze_raster
        if spec["networks"] == "passthrough":
            from .models.passthrough import PassThroughStage1, PassThroughStage2
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
    queue.put(("row", out))
    queue.put(("end", None))


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


class CaseFailed(RuntimeError):
    """A benchmark case that crashed (out of memory, say) or ran past --case-timeout;
    ``rows``: what it measured before that (pipeline groups report variant by variant)."""

    def __init__(self, message: str, rows=()):
        super().__init__(message)
        self.rows = list(rows)


def _label(row) -> dict:
    """What a progress line names: the case, and the options that tell cases apart."""
    return {k: v for k, v in row.items() if k not in ("flops", "variants", "path", "cache_dir", "aot_dir",
                                                     "top_kernels") and not isinstance(v, float)}


def run_case(args, **spec):
    """Run one case in a fresh process; its dict (a list of dicts for a pipeline group).
    Each row is printed to stderr as it arrives."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(args, spec, q))
    start = time.monotonic()
    p.start()
    rows = []
    while True:
        try:
            tag, row = q.get(timeout=1)
        except queue.Empty:
            if not p.is_alive() and q.empty():      # died before reporting (error printed above)
                raise CaseFailed(f"failed (exit {p.exitcode})", rows) from None
            if args.case_timeout and time.monotonic() - start > args.case_timeout:
                p.terminate()
                p.join()
                raise CaseFailed(f"stopped after {args.case_timeout:.0f} s", rows) from None
            continue
        if tag == "end":
            break
        rows.append(row)
        print(f"  {_label(row)}: {row['seconds']:.3f} s, peak {row['peak_mib']:.0f} MiB", file=sys.stderr,
              flush=True)
    p.join()
    return rows if spec.get("kind") in ("pipeline", "breakdown") else rows[0]


def _fmt(v, f="{:.3f}"):
    return "" if v is None else ("inf" if v == float("inf") else f.format(v))


def main(argv=None):
    from .cli.options import HelpFormatter, non_negative_int, positive_int
    ap = argparse.ArgumentParser(prog="dsrdmpd-benchmark", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512],
                    help="square input sizes, multiples of 16 and at least 64 (may be empty)")
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
    ap.add_argument("--batch", type=positive_int, default=1, help="images per pipeline call")
    ap.add_argument("--batches", type=positive_int, nargs="*", help="several batch sizes for the variants table "
                    "(default: --batch)")
    ap.add_argument("--pairs", nargs="*", default=None, metavar="SIZExBATCH",
                    help="explicit size x batch pairs for the variants table, e.g. 256x1 256x32 512x8 "
                         "(instead of --variant-sizes x --batches)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the card's peak TFLOP/s for the fraction column (default: the data-sheet table)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the kernel-launch count (CUDA)")
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    ap.add_argument("--breakdown", nargs="*", default=[], metavar="VARIANT",
                    help="time by module class for these variants (eager: no graphs, no compile) at the variants "
                         "table's sizes and batches (GPU time on CUDA, wall time on the CPU)")
    ap.add_argument("--compile-sizes", type=int, nargs="*", default=[],
                    help="time the first compiled call, cold and warm inductor cache, at these sizes")
    ap.add_argument("--compile-variant", default="fp32+compile",
                    help="variant for --compile-sizes")
    ap.add_argument("--aot-sizes", type=int, nargs="*", default=[],
                    help="time the ahead-of-time compiled pipeline (Dehazer(aot=...)) at these sizes: its build "
                         "in a fresh process, then its load in another")
    ap.add_argument("--aot-variant", default="fp32", help="variant for --aot-sizes (no compile, no graphs)")
    ap.add_argument("--case-timeout", type=float, default=0.0, help="seconds before a case is stopped (0: never)")
    ap.add_argument("--train-size", type=non_negative_int, default=256, help="stage-2 training crop (0: skip training)")
    ap.add_argument("--train-batch", type=positive_int, default=1, help="stage-2 training batch (paper: 1)")
    ap.add_argument("--scene", type=positive_int, nargs="*", default=[], help="tiled scene sizes, e.g. 1024 2048 4096")
    ap.add_argument("--raster", type=positive_int, nargs="*", default=[],
                    help="square uint16 GeoTIFF sizes streamed through dehaze_raster, e.g. 10000 20000")
    ap.add_argument("--raster-networks", choices=["passthrough", "models"], default="passthrough",
                    help="passthrough: stand-ins that return their input (the streaming, I/O and mapping alone); "
                         "models: the networks at --dim1/--dim2")
    ap.add_argument("--raster-dir", type=Path, default=None, help="where the synthetic GeoTIFFs go (default: temp)")
    ap.add_argument("--scoring", type=int, nargs="*", default=[],
                    help="image sizes for the scoring table (SSIM on the CPU: 2-D window vs its two 1-D factors)")
    ap.add_argument("--tile", type=int, default=512, help="tile size of the tiled scenes and rasters")
    ap.add_argument("--overlap", type=non_negative_int, default=None,
                    help="tile overlap in pixels (default 64, 32 with --tile 64)")
    ap.add_argument("--tile-batch", type=positive_int, default=1, help="tiles per network call")
    ap.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls before the timed ones")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed calls (the median is reported)")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", type=Path, help="folder for benchmark.md / benchmark.csv")
    args = ap.parse_args(argv)
    try:
        pairs = [tuple(int(n) for n in p.lower().split("x")) for p in args.pairs] if args.pairs else None
        if pairs and any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError
    except ValueError:
        ap.error(f"--pairs takes SIZExBATCH items such as 256x8, got {args.pairs}")
    if args.variants == ["all"]:
        args.variants = list(VARIANTS)
    unknown = set(args.variants + args.breakdown) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)} (choose from {list(VARIANTS)})")
    eager_only = [v for v in args.breakdown if VARIANTS[v].get("cuda_graphs") or VARIANTS[v].get("compile")]
    if eager_only:
        ap.error(f"--breakdown {' '.join(eager_only)}: the breakdown sees modules run eagerly; drop +graphs / "
                 f"+compile (the kernels are the same)")

    def save(lines, records):
        """Write what is measured so far (a run cut short keeps its finished rows)."""
        if not args.out:
            return
        from .atomicfile import write_text_atomic
        from .evaluation import write_rows_csv
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "benchmark.md", "\n".join(lines) + "\n")
        write_rows_csv(args.out / "benchmark.csv", records, sorted({k for r in records for k in r}))

    import torch
    from .config import ConfigError
    from .inference import check_tiling, default_overlap, padded_size, tile_starts
    from .models.mcess_unet import STAGE1_MIN_SIZE, STAGE1_MULTIPLE, is_stage1_size
    if args.train_size and not is_stage1_size(args.train_size):
        ap.error(f"--train-size {args.train_size}: a training crop must be a multiple of {STAGE1_MULTIPLE} and at "
                 f"least {STAGE1_MIN_SIZE} (0: no training table)")
    for flag, sizes in (("--sizes", args.sizes), ("--variant-sizes", args.variant_sizes or []),
                        ("--pairs", [size for size, _ in pairs or []]), ("--compile-sizes", args.compile_sizes),
                        ("--aot-sizes", args.aot_sizes)):
        bad = [n for n in sizes if not is_stage1_size(n)]
        if bad:
            ap.error(f"{flag} {' '.join(map(str, bad))}: the networks run at sizes that are multiples of "
                     f"{STAGE1_MULTIPLE} and at least {STAGE1_MIN_SIZE}")
    if args.overlap is None:
        args.overlap = default_overlap(args.tile)
    if args.scene or args.raster:
        try:
            check_tiling(args.tile, args.overlap)
        except ConfigError as exc:
            ap.error(f"--tile / --overlap: {exc}")
    scene_variant = args.scene_variant or (args.variants[-1] if args.variants else "fp32")
    if args.scene and scene_variant not in VARIANTS:
        ap.error(f"unknown scene variant {scene_variant!r} (choose from {list(VARIANTS)})")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but CUDA is not available")
    from .machine import cpu_model
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
            try:
                s1 = run_case(args, kind="stage1", size=size)
                fast = run_case(args, kind="stage2_fast", size=size)
                slow = (run_case(args, kind="stage2_straightforward", size=size)
                        if size <= args.straightforward_max else None)
            except CaseFailed as e:           # a row saying so; the other sizes and tables still run
                records.append(dict(kind="sizes", size=size, error=str(e)))
                lines.append(f"| {size} | {e} | | | | | | |")
                save(lines, records)
                continue
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
    batches = args.batches or [args.batch]
    pairs = pairs or [(size, b) for size in variant_sizes for b in batches]
    if args.variants and pairs and (args.variants != ["fp32"] or pairs != [(size, 1) for size in variant_sizes]):
        peak_note = (f"{args.peak_tflops} TFLOP/s (--peak-tflops)" if args.peak_tflops else
                     "the data-sheet dense peak of the card for the variant's precision")
        lines += ["Pipeline variants (both stages through `Dehazer`; FLOPs counted once per size and batch; "
                  f"fraction of {peak_note}; launches = host-side kernel + graph launches, kernels = GPU kernels "
                  "seen, both per image):", "",
                  "| size | batch | variant | ms / image | img/s | launches / image | kernels / image | TFLOP/s | "
                  "of peak | PSNR vs fp32 (dB) | peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        flops_per_image = {}              # the networks treat images independently: FLOPs scale with the batch
        for size, batch in pairs:
            flops = None
            if args.flops:
                if size not in flops_per_image:
                    flops_per_image[size] = count_flops(args, size, 1)
                flops = flops_per_image[size] * batch
            groups = [args.variants] if cuda else [[v] for v in args.variants]
            for group in groups:
                failed = None
                try:
                    rows = run_case(args, kind="pipeline", size=size, batch=batch, variants=group, flops=flops)
                except CaseFailed as e:
                    rows, failed = e.rows, e       # the variants measured before the failure keep their rows
                for r in rows:
                    records.append(r)
                    lines.append(f"| {size} | {batch} | {r['variant']} | {r['ms_per_image']:.1f} | "
                                 f"{r['img_per_s']:.2f} | {_fmt(r.get('launches_per_image'), '{:.0f}')} | "
                                 f"{_fmt(r.get('kernels_per_image'), '{:.0f}')} | "
                                 f"{_fmt(r.get('tflop_s'), '{:.2f}')} | "
                                 f"{_fmt(r.get('fraction_of_peak') and 100 * r['fraction_of_peak'], '{:.1f} %')} | "
                                 f"{_fmt(r.get('psnr_vs_fp32'), '{:.1f}') or 'reference'} | "
                                 f"{r['peak_mib']:.0f} |")
                if failed is not None:
                    rest = group[len(rows):]
                    records.append(dict(kind="pipeline", size=size, batch=batch, variant=" ".join(rest),
                                        error=str(failed)))
                    lines.append(f"| {size} | {batch} | {', '.join(rest)} | {failed} | | | | | | | |")
                save(lines, records)
        lines.append("")

    if args.breakdown and pairs:
        what = ("GPU time of the kernels launched inside each module" if cuda else "wall time inside each module")
        lines += [f"Time by module class (one eager call after the warm-up; {what}, less that of the modules "
                  f"inside it; the {BREAKDOWN_ROWS} largest classes, the rest summed):", ""]
        for size, batch in pairs:
            failed = None
            try:
                rows = run_case(args, kind="breakdown", size=size, batch=batch, variants=args.breakdown)
            except CaseFailed as e:
                rows, failed = e.rows, e
            records += rows
            for v in args.breakdown:
                mine = [r for r in rows if r["variant"] == v]
                if not mine:
                    continue
                whole = sum(r["own_ms_per_image"] for r in mine)
                lines += [f"{size} x {size}, batch {batch}, `{v}`: {whole:.1f} ms / image in all", "",
                          "| module | calls / image | ms / image (own) | share |", "|---|---|---|---|"]
                rest = mine[BREAKDOWN_ROWS:]
                for r in mine[:BREAKDOWN_ROWS]:
                    lines.append(f"| {r['module']} | {r['calls_per_image']:.4g} | {r['own_ms_per_image']:.2f} | "
                                 f"{100 * r['share']:.1f} % |")
                if rest:
                    lines.append(f"| ({len(rest)} other classes) | {sum(r['calls_per_image'] for r in rest):.4g} | "
                                 f"{sum(r['own_ms_per_image'] for r in rest):.2f} | "
                                 f"{100 * sum(r['share'] for r in rest):.1f} % |")
                lines.append("")
            if failed is not None:
                records.append(dict(kind="breakdown", size=size, batch=batch, error=str(failed)))
                lines += [f"{size} x {size}, batch {batch}: {failed}", ""]
            save(lines, records)

    def first_calls(kind, size, variant, label, phases, folder_key, columns, cells):
        """One fresh process per phase, all sharing one temporary folder (``folder_key`` in the
        case; the first fills it, the later ones find what it left): a table row and a record
        each, or one row saying why a phase stopped, and the phases after it are skipped."""
        import tempfile
        with tempfile.TemporaryDirectory(prefix=f"dsrdmpd-{kind}-") as folder:
            for phase in phases:
                try:
                    r = run_case(args, kind=kind, size=size, variant=variant, **{label: phase, folder_key: folder})
                except CaseFailed as e:
                    records.append(dict(kind=kind, size=size, **{label: phase}, error=str(e)))
                    lines.append(f"| {size} | {phase} | {e} |" + " |" * (columns - 3))
                    break
                records.append(r)
                lines.append(f"| {size} | {phase} | " + " | ".join(cells(r)) + " |")
                save(lines, records)

    if args.compile_sizes:
        v = args.compile_variant
        if v not in VARIANTS or not VARIANTS[v].get("compile"):
            ap.error(f"--compile-variant must be a compile variant, got {v!r}")
        lines += [f"torch.compile ({v}, batch 1): first call in a fresh process with an empty inductor cache "
                  "(cold), then in another fresh process with the cache the first one filled (warm); "
                  "of the first call, Dynamo's phases: tracing the Python code, the backend (inductor's "
                  "compile, or loading it from the cache) and building guards:", "",
                  "| size | cache | first call (s) | tracing (s) | backend (s) | guards (s) | then ms / image |",
                  "|---|---|---|---|---|---|---|"]
        for size in args.compile_sizes:
            first_calls("compile", size, v, "cache", ("cold", "warm"), "cache_dir", 7, lambda r: [
                f"{r['first_call_s']:.1f}", *(f"{r[c]:.1f}" if c in r else "" for c in COMPILE_PHASES),
                f"{1000 * r['seconds']:.1f}"])
        lines.append("")
        save(lines, records)

    if args.aot_sizes:
        v = args.aot_variant
        if v not in VARIANTS or any(VARIANTS[v].get(k) for k in ("compile", "cuda_graphs")):
            ap.error(f"--aot-variant must be a variant without compile or graphs, got {v!r}")
        lines += [f"Ahead-of-time compiled pipeline ({v}, batch 1; `Dehazer(aot=DIR)`: three programs, stage 1, "
                  "the fusion terms and the network step the sampling steps share): the first call in a fresh "
                  "process with DIR empty (build: export, AOTInductor compile, load; summed over the programs), "
                  "then in another fresh process with the packages that build left (load):", "",
                  "| size | package | first call (s) | export (s) | compile (s) | load (s) | then ms / image | "
                  "eager fp32 ms / image | PSNR vs fp32 (dB) |", "|---|---|---|---|---|---|---|---|---|"]
        for size in args.aot_sizes:
            first_calls("aot", size, v, "package", ("build", "load"), "aot_dir", 9, lambda r: [
                f"{r['first_call_s']:.1f}", _fmt(r.get("export_s"), "{:.1f}"), _fmt(r.get("compile_s"), "{:.1f}"),
                _fmt(r.get("load_s"), "{:.2f}"), f"{1000 * r['seconds']:.1f}", f"{1000 * r['eager_fp32_seconds']:.1f}",
                _fmt(r["psnr_vs_fp32"], "{:.1f}")])
        lines.append("")
        save(lines, records)

    if args.train_size:
        cuda_note = (" (CUDA: the trainer's defaults, TF32 on, deterministic algorithms, fused Adam)" if cuda
                     else " (CPU: plain Adam, the trainer's default there)")
        lines += [f"Stage-2 training step ({args.train_size}x{args.train_size}, batch {args.train_batch}, "
                  f"Adam){cuda_note}:", "", "| path | s / step | it/s | peak |", "|---|---|---|---|"]
        cases = [("fast (cached stage 1, residual decoder only)", "train_fast", {}),
                 ("straightforward (stage 1 every step, full network)", "train_straightforward", {})]
        if cuda:     # the step options, most wanted first (a run cut short keeps the first rows)
            cases += [("fast, fused Adam + CUDA graph (train.cuda_graph: true)", "train_fast",
                       {"fused": True, "cuda_graph": True}),
                      ("fast, graph, not deterministic", "train_fast",
                       {"fused": True, "cuda_graph": True, "deterministic": False}),
                      ("fast, graph + Triton GroupNorm (train.fast_norm: true)", "train_fast",
                       {"fused": True, "cuda_graph": True, "fast_norm": True}),
                      ("fast, graph + Triton GroupNorm, not deterministic", "train_fast",
                       {"fused": True, "cuda_graph": True, "fast_norm": True, "deterministic": False}),
                      ("fast, not deterministic (train.deterministic: false)", "train_fast", {"deterministic": False}),
                      ("fast, graph + channels_last + bf16 (train.precision: bf16)", "train_fast",
                       {"fused": True, "cuda_graph": True, "channels_last": True, "precision": "bf16"}),
                      ("fast, true float32 (train.tf32: false)", "train_fast", {"tf32": False}),
                      ("fast, plain Adam (train.fused_optimizer: false)", "train_fast", {"fused": None})]
        measured = {}
        for label, kind, opts in cases:
            try:
                r = run_case(args, kind=kind, size=args.train_size, **opts)
            except CaseFailed as e:
                records.append(dict(kind=kind, size=args.train_size, **opts, error=str(e)))
                lines.append(f"| {label} | {e} | | |")
            else:
                records.append(r)
                lines.append(f"| {label} | {r['seconds']:.3f} | {r['it_per_s']:.3f} | {r['peak_mib']:.0f} |")
                if not opts:
                    measured[kind] = r["seconds"]
            if not opts and kind == "train_straightforward" and len(measured) == 2:
                lines.append(f"| speed-up | {measured['train_straightforward'] / measured['train_fast']:.2f}x | | |")
            save(lines, records)
        lines.append("")
        save(lines, records)

    if args.scene:
        v = scene_variant
        lines += [f"Tiled scenes (tile {args.tile}, overlap {args.overlap}, {args.tile_batch} tile(s) per call, "
                  f"variant {v}; one run each):", "", "| scene | tiles | seconds | peak |", "|---|---|---|---|"]
        for size in args.scene:
            n = len(tile_starts(padded_size(size, size)[0], args.tile, args.overlap)) ** 2
            try:
                r = run_case(args, kind="scene", size=size, variant=v)
            except CaseFailed as e:
                records.append(dict(kind="scene", size=size, variant=v, error=str(e)))
                lines.append(f"| {size}x{size} | {n} | {e} | |")
            else:
                records.append(r)
                lines.append(f"| {size}x{size} | {n} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")
            save(lines, records)
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
            file_mib = path.stat().st_size / 2 ** 20
            try:
                r = run_case(args, kind="raster", size=size, path=str(path), networks=args.raster_networks)
            except CaseFailed as e:
                records.append(dict(kind="raster", size=size, file_mib=file_mib, error=str(e)))
                lines.append(f"| {size}x{size} | {size * size / 1e6:.0f} | {file_mib:.0f} | {e} | | |")
            else:
                r["file_mib"] = file_mib
                records.append(r)
                lines.append(f"| {size}x{size} | {r['megapixels']:.0f} | {r['file_mib']:.0f} | {r['seconds']:.1f} | "
                             f"{r['seconds'] / r['megapixels']:.2f} | {r['peak_mib']:.0f} |")
            finally:
                path.unlink(missing_ok=True)
            save(lines, records)
        shutil.rmtree(folder, ignore_errors=True)      # a failed case may leave its output behind
        lines.append("")

    if args.scoring:
        lines += scoring_table(args.scoring, args.warmup, args.repeats, records)
        save(lines, records)

    save(lines, records)
    print("\n".join(lines))
    return 0


def scoring_table(sizes, warmup: int, repeats: int, records: list) -> list:
    """Markdown lines: per size and protocol, ms per image of SSIM's local-mean filtering on
    the CPU with the 2-D 11 x 11 window and with its two 1-D factors (what psnr_ssim uses),
    side by side in this process; one record per row appended to ``records``."""
    import torch
    from .metrics import _ssim_map, rgb_to_y, ssim_map_2d_window
    lines = [f"Scoring on the CPU ({torch.get_num_threads()} threads; one image, SSIM map only; median of "
             f"{repeats} after {warmup} warm-up):", "",
             "| size | protocol (input) | 2-D window (ms) | two 1-D passes (ms) | speed-up |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        a = torch.rand(1, 3, size, size, generator=g)
        b = (a + 0.1 * torch.randn(1, 3, size, size, generator=g)).clamp(0, 1)
        cases = (("paper (float32 RGB)", a, b, 5, 1.0),
                 ("standard (float64 RGB)", (a * 255).round().double(), (b * 255).round().double(), 0, 255.0),
                 ("y (float64 luma)", rgb_to_y(a), rgb_to_y(b), 0, 255.0))
        for name, x, y, pad, rng in cases:
            old = _timed(lambda: ssim_map_2d_window(x, y, pad, rng), "cpu", warmup, repeats)
            new = _timed(lambda: _ssim_map(x, y, pad, rng), "cpu", warmup, repeats)
            records.append({"kind": "scoring", "size": size, "protocol": name, "seconds_2d": old, "seconds": new})
            lines.append(f"| {size} | {name} | {1000 * old:.1f} | {1000 * new:.1f} | {old / new:.2f}x |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
