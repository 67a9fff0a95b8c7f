"""What dehaze and evaluate share: checking the output folder against the inputs,
building the Dehazer, the run folder's lock and fingerprint, running the items (split
across processes under ``accelerate launch``), merging, and the exit status.

Order of a run: output paths against inputs (before anything is loaded), the config
(errors once, up front), the folder's lock (rank 0 only; the others learn the result),
the Dehazer and its settings, the fingerprint (``--resume`` checks it), then the items.
SIGTERM is turned into an interruption, so a terminated run ends like Ctrl-C."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Sequence

from ..config import ConfigError
from ..evaluation import Item, collect_rows, run_items, write_results
from ..inference import Dehazer
from ..processes import on_main
from ..runfolder import RunFolder, check_outputs_apart, digest, make_fingerprint
from .errors import ItemsFailed
from .options import dehazer_options, load_dehazer, model_config, model_files, model_source, resolve_device


class ProcessGroup:
    """This process's place among those ``accelerate launch`` (or torchrun) started, read
    from RANK / WORLD_SIZE / LOCAL_RANK; one process when launched directly. Processes
    only need to wait for each other (a gloo barrier, CPU or GPU alike)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.dist = None
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.dist = dist

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the main process only and give every process its result; an
        exception it raises is raised in every process (:func:`dsrdmpd.processes.on_main`)."""
        return on_main(fn, self.rank)

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def run_batch(args, items: Sequence[Item], title: str, protocol: str = "paper", resize=None,
              raster=None) -> Dict[str, float]:
    """Dehaze (and score, where items have GT) ``items`` into ``args.output``; returns the
    means. Raises ItemsFailed after writing the results when some items failed."""
    check_outputs_apart(args.output, [p for i in items for p in (i.hazy, i.gt) if p is not None])
    group = ProcessGroup()
    restore = _sigterm_as_interrupt()
    try:
        return _run_batch(group, args, items, title, protocol, resize, raster)
    finally:
        restore()
        group.close()


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM raises KeyboardInterrupt (so writers clean up and the exit says 'interrupted');
    returns the function that puts the old handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)


def check_dehazer(dehazer: Dehazer) -> None:
    """Settings the checkpoint and config combine into, checked once before the first item."""
    total = getattr(dehazer.stage2, "num_timesteps", dehazer.steps)
    if not 1 <= dehazer.steps <= total:
        raise ConfigError(f"{dehazer.steps} sampling steps: must be between 1 and the {total} diffusion steps "
                          f"the stage-2 model was trained with")
    if not 0 <= dehazer.seed < 2 ** 63:
        raise ConfigError(f"seed {dehazer.seed}: must be in [0, 2^63)")
    if not float(dehazer.eta) >= 0 or float(dehazer.eta) == float("inf"):
        raise ConfigError(f"sampling.eta {dehazer.eta}: must be a finite number >= 0")


def raster_fingerprint(raster) -> Dict[str, Any]:
    if raster is None:
        return {}
    return {"bands": raster.bands, "scale": str(raster.scale), "keep_other_bands": raster.keep_other_bands,
            "cog": raster.cog, "max_raster_pixels": raster.max_pixels}


def _run_batch(group: ProcessGroup, args, items, title, protocol, resize, raster) -> Dict[str, float]:
    cfg = model_config(args)
    opts = dehazer_options(args)    # its usage errors (--seed, --compile-cache) before the output folder is touched
    out: Path = args.output
    folder = RunFolder(out)
    group.on_main(folder.lock)
    try:
        return _run_locked(group, folder, cfg, opts, args, items, title, protocol, resize, raster)
    finally:
        folder.unlock()


def _run_locked(group: ProcessGroup, folder: RunFolder, cfg, opts, args, items, title, protocol, resize, raster):
    out: Path = args.output
    device = resolve_device(args.device, group.local_rank)
    dehazer = load_dehazer(args, cfg, device, **opts)
    check_dehazer(dehazer)

    def prepare() -> str:
        fingerprint = make_fingerprint(
            checkpoints=model_files(args), weights=args.weights, seed=dehazer.seed,
            steps=dehazer.steps, eta=dehazer.eta, fast=dehazer.fast, tile=dehazer.tile, overlap=dehazer.overlap,
            precision=dehazer.precision, config=cfg, protocol=protocol, resize=resize,
            raster=raster_fingerprint(raster),
            extra={"max_untiled_pixels": args.max_untiled_pixels if dehazer.tile is None else None,
                   # an untiled run's --overlap still shapes its auto-tiled images and rasters; the
                   # key only when given, so that earlier run folders keep their fingerprint
                   **({"untiled_overlap": int(dehazer.overlap_given)}
                      if dehazer.tile is None and dehazer.overlap_given is not None else {}),
                   "fast_norm": bool(getattr(args, "fast_norm", False)),
                   "channels_last": bool(args.channels_last)})
        # --batch (like --tile-batch, --device and the number of processes) is not part of the
        # fingerprint: it only groups images into pipeline calls; each image keeps its own start
        # noise, so its result does not depend on it beyond float32 rounding (tests/test_batching.py),
        # and a run may be resumed with another --batch.
        folder.prepare(fingerprint, args.resume)
        return digest(fingerprint)
    run_id = group.on_main(prepare)
    run_items(dehazer, items, out, protocol, resize, args.save_coarse, args.panels, resume=args.resume,
              rank=group.rank, world=group.world, raster=raster, run_id=run_id, max_pixels=args.max_pixels,
              max_untiled_pixels=args.max_untiled_pixels, batch=args.batch)
    group.barrier()
    if group.rank != 0:
        return {}
    done, failed = collect_rows(items, out, run_id)
    notes = [f"Checkpoints: {model_source(args)} ({args.weights} weights); "
                         f"seed {dehazer.seed}; {dehazer.steps} sampling steps"
                         + (f"; resized to {resize} (PIL bilinear, as the authors)" if resize else "") + "."]
    means = write_results(done, out, protocol, title, notes, failed)
    print((out / "summary.md").read_text().split("Per image:")[0].strip())
    if failed:
        raise ItemsFailed(f"{len(failed)} of {len(items)} item(s) failed ({', '.join(str(r['name']) for r in failed[:5])}"
                          f"{' ...' if len(failed) > 5 else ''}): reasons in {out / 'summary.md'}")
    return means
