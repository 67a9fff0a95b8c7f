"""Convert checkpoints (the authors' ``.pth`` / ``model-N.pt``, this package's ``.pt``) into a
weights folder of safetensors files (:mod:`dsrdmpd.weights_folder`).

Each source is loaded the safe way (``weights_only``; a file that needs arbitrary
unpickling only with ``trust=True``), checked (keys, shapes, schedule buffers, finite
values), written as safetensors with its stage config as metadata, read back and compared
tensor by tensor, and hashed (SHA-256, recorded in ``SHA256SUMS``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .atomicfile import write_text_atomic
from .builders import load_stage
from .checkpoints import CheckpointError, PathLike, read_safetensors, save_safetensors
from .weights_folder import (CONFIG_NAME, FOLDER_FORMAT, FOLDER_VERSION, HASHES_NAME, STAGE_FILES, read_hashes,
                             sha256_file, write_hashes)


def _net_state(model: torch.nn.Module, stage: int) -> Dict[str, torch.Tensor]:
    net = model.net if stage == 2 else model
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _has_ema(path: PathLike, trust: bool) -> bool:
    from .checkpoints import is_project_checkpoint, read_checkpoint
    obj = read_checkpoint(path, trust=trust)
    if is_project_checkpoint(obj):
        return obj.get("ema") is not None
    return isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj.get("model"), dict)


def verify_round_trip(path: Path, state: Dict[str, torch.Tensor]) -> None:
    """Reload a written safetensors file and compare every tensor (name, dtype, shape, values)."""
    obj = read_safetensors(path)
    back = obj["model"] if obj["model"] is not None else obj["ema"]
    if set(back) != set(state):
        raise CheckpointError(f"{path}: round trip lost or added tensors ({sorted(set(back) ^ set(state))[:5]})")
    for k, v in state.items():
        if back[k].dtype != v.dtype or not torch.equal(back[k], v):
            raise CheckpointError(f"{path}: tensor {k!r} differs after the round trip")


def convert_checkpoints(output: PathLike, stage1: Optional[PathLike] = None, stage2: Optional[PathLike] = None,
                        config: Optional[Dict[str, Any]] = None, trust: bool = False,
                        report: Callable[[str], None] = print) -> Dict[str, str]:
    """Write ``output/`` (see :mod:`dsrdmpd.weights_folder`) from a stage-1 and/or stage-2
    checkpoint; ``config`` (a full config) gives the model sizes, else they are read off
    the files. Returns {relative path: sha256} of every file written (also in SHA256SUMS,
    merged with what the folder already listed); ``report`` gets one line per file."""
    if stage1 is None and stage2 is None:
        raise CheckpointError("nothing to convert: give a stage-1 and/or a stage-2 checkpoint")
    out = Path(output)
    jobs = []
    if stage1 is not None:
        jobs.append((1, "model", stage1))
    if stage2 is not None:
        jobs.append((2, "model", stage2))
        if _has_ema(stage2, trust):
            jobs.append((2, "ema", stage2))
    folder_cfg = _existing_config(out)
    hashes = read_hashes(out / HASHES_NAME) if (out / HASHES_NAME).is_file() else {}
    for stage, weights, src in jobs:
        model, cfg = load_stage(src, stage, (config or {}).get(f"stage{stage}"), weights, trust)
        state = _net_state(model, stage)
        name = STAGE_FILES[(f"stage{stage}", weights)]
        path = out / name
        save_safetensors(state, path, stage, cfg, weights=weights, source=Path(src).name)
        verify_round_trip(path, state)
        hashes[name] = sha256_file(path)
        folder_cfg["config"][f"stage{stage}"] = cfg
        folder_cfg["sources"][name] = str(src)
        report(f"{hashes[name]}  {path}  (stage {stage}, {weights} weights, {len(state)} tensors, from {src})")
    if config and config.get("sampling"):
        folder_cfg["config"]["sampling"] = config["sampling"]
    write_text_atomic(out / CONFIG_NAME, json.dumps(folder_cfg, indent=2, sort_keys=True) + "\n")
    write_hashes(out, hashes)
    report(f"wrote {out / CONFIG_NAME} and {out / HASHES_NAME} (check with: cd {out} && sha256sum -c {HASHES_NAME})")
    return hashes


def _existing_config(out: Path) -> Dict[str, Any]:
    """The folder's config.json to update (converting one stage at a time), or a new one."""
    path = out / CONFIG_NAME
    if path.is_file():
        from .weights_folder import read_folder_config
        meta = read_folder_config(out)
        meta.setdefault("config", {})
        meta.setdefault("sources", {})
        return meta
    return {"format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "config": {}, "sources": {}}
