"""Rebuild the weights of the compact parity fixtures (recipe ``seeded-v1``, defined in
tests/fixtures/official/README.md) and write them as the authors' checkpoint files.

A compact fixture stores no weight tensors: only the official parameter names and shapes
plus a seed. The authors' code computed the expected outputs with exactly these weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch

RECIPE = "seeded-v1"


def _seeded_value(name: str, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name == "num_batches_tracked":
        return torch.tensor(0)
    if name == "running_var":
        value = 0.5 + torch.rand(shape, generator=g)
    elif name == "running_mean":
        value = 0.2 * (torch.rand(shape, generator=g) - 0.5)
    elif name in ("g", "gamma") or (name == "weight" and len(shape) == 1):
        value = 1 + 0.1 * torch.randn(shape, generator=g)
    elif len(shape) >= 2:
        value = torch.randn(shape, generator=g) / math.sqrt(3 * math.prod(shape[1:]))
    else:
        value = 0.02 * torch.randn(shape, generator=g)
    return value.half().float()   # exactly float16-representable


def rebuild_weights(spec: Mapping) -> Dict[str, torch.Tensor]:
    """An official-key state dict from ``{'recipe', 'seed', 'entries': [(key, shape), ...]}``."""
    if spec.get("recipe") != RECIPE:
        raise ValueError(f"unknown weight recipe {spec.get('recipe')!r} (this helper knows {RECIPE!r})")
    seed = int(spec["seed"])
    out = {}
    for i, (key, shape) in enumerate(spec["entries"]):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[key] = _seeded_value(key.rsplit(".", 1)[-1], tuple(int(s) for s in shape), g)
    return out


def official_state_dict(spec: Mapping) -> Dict[str, torch.Tensor]:
    """The full official state dict: rebuilt weights plus the stored stage-2 buffers, if any."""
    return {**rebuild_weights(spec), **{k: v.clone() for k, v in spec.get("buffers", {}).items()}}


def fixture_state_dict(fx: Mapping) -> Dict[str, torch.Tensor]:
    """Official state dict of a stage fixture file (``weights`` and, for stage 2, ``buffers``)."""
    return official_state_dict({**fx["weights"], "buffers": fx.get("buffers", {})})


def write_official_checkpoints(chain: Path, out_dir: Path, stage2_half: bool = False) -> Tuple[Path, Path]:
    """Write the chain fixture's weights as the authors' released files: stage 1 a plain
    state dict of float16 tensors (``.pth``), stage 2 ``{'step': 0, 'model': state_dict}``
    (float32, or float16 weights with ``stage2_half``; buffers stay float32)."""
    spec = torch.load(chain / "weights.pt", map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    s1 = {k: (v.half() if v.is_floating_point() else v) for k, v in rebuild_weights(spec["stage1"]).items()}
    s2 = rebuild_weights(spec["stage2"])
    if stage2_half:
        s2 = {k: (v.half() if v.is_floating_point() else v) for k, v in s2.items()}
    s2.update({k: v.clone() for k, v in spec["stage2"].get("buffers", {}).items()})
    p1, p2 = out_dir / "stage1_official.pth", out_dir / "stage2_official.pt"
    torch.save(s1, p1)
    torch.save({"step": 0, "model": s2}, p2)
    return p1, p2
