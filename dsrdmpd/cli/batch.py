"""What dehaze and evaluate share: building the Dehazer, running the items (split
across processes under ``accelerate launch``), merging, and the exit status."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence

from ..evaluation import Item, clear_records, collect_rows, run_items, write_results
from .errors import ItemsFailed
from .options import dehazer_options, load_dehazer, model_config, model_source, resolve_device


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
    group = ProcessGroup()
    try:
        return _run_batch(group, args, items, title, protocol, resize, raster)
    finally:
        group.close()


def _run_batch(group: ProcessGroup, args, items, title, protocol, resize, raster) -> Dict[str, float]:
    cfg = model_config(args)
    device = resolve_device(args.device, group.local_rank)
    dehazer = load_dehazer(args, cfg, device, **dehazer_options(args))
    out: Path = args.output
    if group.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            clear_records(out)
    group.barrier()
    run_items(dehazer, items, out, protocol, resize, args.save_coarse, args.panels, resume=args.resume,
              rank=group.rank, world=group.world, raster=raster)
    group.barrier()
    if group.rank != 0:
        return {}
    done, failed = collect_rows(items, out)
    notes = [f"Checkpoints: {model_source(args)} ({args.weights} weights); "
                         f"seed {dehazer.seed}; {dehazer.steps} sampling steps"
                         + (f"; resized to {resize} (PIL bilinear, as the authors)" if resize else "") + "."]
    means = write_results(done, out, protocol, title, notes, failed)
    print((out / "summary.md").read_text().split("Per image:")[0].strip())
    if failed:
        raise ItemsFailed(f"{len(failed)} of {len(items)} item(s) failed ({', '.join(str(r['name']) for r in failed[:5])}"
                          f"{' ...' if len(failed) > 5 else ''}): reasons in {out / 'summary.md'}")
    return means
