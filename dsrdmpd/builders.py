"""Build both stages from a config and load them from checkpoints (official or ours).

Stage configs are the ``stage1`` / ``stage2`` sections of a config (see
``dsrdmpd.config.DEFAULTS``). When a loader is given no config, the model sizes are read
off the checkpoint itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoints import (PROJECT_FORMAT, STAGE2_CHECKED_BUFFERS, STAGE2_DROPPED_BUFFERS, CheckpointError,
                          PathLike, check_stage2_buffers, is_project_checkpoint, load_into, read_checkpoint,
                          save_atomic, save_safetensors, stage_state_dict)
from .config import DEFAULTS, ConfigError, check_keys, validate_config
from .diffusion import ResidualDiffusion
from .models import MCESSUNet, ResidualDiffusionUNet


def build_stage1(cfg: Optional[Dict[str, Any]] = None) -> MCESSUNet:
    check_keys("stage1", cfg or {}, DEFAULTS["stage1"], strict=True)
    cfg = validate_config({"stage1": {**DEFAULTS["stage1"], **(cfg or {})}})["stage1"]
    return MCESSUNet(dim=int(cfg["dim"]))


def build_stage2(cfg: Optional[Dict[str, Any]] = None) -> ResidualDiffusion:
    check_keys("stage2", cfg or {}, DEFAULTS["stage2"], strict=True)
    cfg = validate_config({"stage2": {**DEFAULTS["stage2"], **(cfg or {})}})["stage2"]
    if str(cfg["loss_type"]).lower() != "l1":
        raise ConfigError(f"stage2.loss_type {cfg['loss_type']!r} is not supported: the paper (and this package) "
                          f"train with 'l1'")
    net = ResidualDiffusionUNet(int(cfg["dim"]), tuple(int(m) for m in cfg["dim_mults"]),
                                bool(cfg["perceptual_decoder"]), bool(cfg["input_condition"]))
    return ResidualDiffusion(net, int(cfg["timesteps"]), int(cfg["sampling_timesteps"]), cfg["objective"],
                             float(cfg["sum_scale"]))


def infer_stage1_config(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Read the stage-1 width off a project-key state dict."""
    try:
        return {"dim": int(sd["encoder.0.conv1.weight"].shape[0])}
    except KeyError:
        raise CheckpointError("cannot infer the stage-1 width: no 'Conv1.conv1.weight' / 'encoder.0.conv1.weight'") from None


def infer_stage2_config(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Read dim, dim_mults, the decoder and input variants (and, for official files, T and sum_scale)
    off a project-key state dict."""
    try:
        dim = int(sd["stem.weight"].shape[0])
        levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("encoder.")})
        mults = [int(sd[f"encoder.{i}.down.conv.weight"].shape[0]) // dim for i in levels]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the stage-2 sizes from the checkpoint (no {exc})") from None
    cfg = {"dim": dim, "dim_mults": mults,
           "perceptual_decoder": any(k.startswith("residual_decoder.fusions.") for k in sd),
           "input_condition": int(sd["stem.weight"].shape[1]) == 9}
    if "betas2" in sd:   # official file: T and sum_scale from its schedule (betas2 sums to sum_scale)
        cfg["timesteps"] = int(sd["betas2"].shape[0])
        cfg["sum_scale"] = round(float(sd["betas2"].double().sum()), 6)
    return cfg


def _split_buffers(sd: Dict[str, torch.Tensor]):
    buffers = {k: sd[k] for k in STAGE2_CHECKED_BUFFERS + STAGE2_DROPPED_BUFFERS if k in sd}
    weights = {k: v for k, v in sd.items() if k not in buffers}
    return weights, buffers


def load_stage(path: PathLike, stage: int, cfg: Optional[Dict[str, Any]] = None, weights: str = "model",
               trust: bool = False):
    """(model in eval mode on the CPU, its complete stage config) from any supported file;
    see :func:`load_stage1` / :func:`load_stage2`."""
    obj = read_checkpoint(path, trust=trust)
    sd = stage_state_dict(obj, stage, path, weights)
    if cfg is None:
        infer = infer_stage1_config if stage == 1 else infer_stage2_config
        cfg = obj["config"][f"stage{stage}"] if is_project_checkpoint(obj) else infer(sd)
    cfg = resolved_stage_config(stage, {f"stage{stage}": cfg})
    if stage == 1:
        model = build_stage1(cfg)
        load_into(model, sd, str(path))
    else:
        net_sd, buffers = _split_buffers(sd)
        model = build_stage2(cfg)
        check_stage2_buffers(buffers, model.schedule, str(path))
        load_into(model.net, net_sd, str(path))
    return model.eval(), cfg


def load_stage1(path: PathLike, cfg: Optional[Dict[str, Any]] = None, weights: str = "model",
                trust: bool = False) -> MCESSUNet:
    """Stage 1 from an official ``.pth`` (plain state dict, float16 allowed), a project
    checkpoint or a project safetensors file; returned in eval mode on the CPU. ``trust``:
    see :func:`dsrdmpd.checkpoints.read_checkpoint`."""
    return load_stage(path, 1, cfg, weights, trust)[0]


def load_stage2(path: PathLike, cfg: Optional[Dict[str, Any]] = None, weights: str = "model",
                trust: bool = False) -> ResidualDiffusion:
    """Stage 2 from an official ``model-N.pt`` ({'model': ResidualDiffusion state, ...}), a
    project checkpoint or a project safetensors file; ``weights`` = 'model' (raw, as the
    paper's test script) or 'ema'. ``trust``: see :func:`dsrdmpd.checkpoints.read_checkpoint`."""
    return load_stage(path, 2, cfg, weights, trust)[0]


def stage_checkpoint(stage: int, model_state: Dict[str, torch.Tensor], config: Dict[str, Any],
                     ema_state: Optional[Dict[str, torch.Tensor]] = None, **extra) -> Dict[str, Any]:
    """A project checkpoint: {'format', 'stage', 'config', 'model', 'ema', ...extra}."""
    return {"format": PROJECT_FORMAT, "version": 1, "stage": stage, "config": config,
            "model": model_state, "ema": ema_state, **extra}


def resolved_stage_config(stage: int, config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The complete ``stage<N>`` section (defaults filled in) of a full config."""
    section = (config or {}).get(f"stage{stage}") or {}
    return {**DEFAULTS[f"stage{stage}"], **section}


def save_stage(model: torch.nn.Module, path: PathLike, stage: int, config: Dict[str, Any], **extra) -> None:
    """Save a model (stage 1: MCESSUNet; stage 2: ResidualDiffusion or its net) atomically:
    a ``.safetensors`` path gets safetensors with the stage's config as metadata (``extra``
    may give ``weights='ema'`` and ``source``), any other path a project ``.pt`` checkpoint."""
    net = model.net if stage == 2 and hasattr(model, "net") else model
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        save_safetensors(state, path, stage, resolved_stage_config(stage, config), **extra)
    else:
        save_atomic(stage_checkpoint(stage, state, config, **extra), path)
