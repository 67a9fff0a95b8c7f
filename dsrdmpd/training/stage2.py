"""Stage-2 trainer: residual diffusion on top of a frozen stage 1 (SPEC.md).

Adam(lr 8e-5), L1 on the residual (``pred_res``), iteration-based (300K in the paper),
batch 1, EMA of the network weights (ema-pytorch, decay 0.995, every 10 steps: the
official trainer's settings, although its loop never updated the EMA, so validation and
testing use the raw weights by default, as the authors' test script did; as in
ema-pytorch, the copy just follows the model for the first ``ema_update_after_step`` = 100
steps, then averages with a decay that warms up towards 0.995), periodic
validation with 5-step sampling and sample panels
(hazy | stage 1 | stage 2 | GT). Timesteps and noise come from a CPU generator saved in
the checkpoint. With ``precompute_coarse`` (and no augmentation) each training image's
stage-1 output is computed once and reused; stage 1 always runs per image, so the cached
and uncached runs are identical.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Tuple

import torch
from ema_pytorch import EMA

from ..builders import build_stage2, load_stage1
from ..config import ConfigError
from ..diffusion import ResidualDiffusion
from ..inference import pad_to, padded_size
from .common import padded_forward
from .trainer import BaseTrainer

STAGE2_TRAIN_DEFAULTS = {"steps": 300_000, "batch_size": 1, "lr": 8e-5, "seed": 0, "mixed_precision": "no",
                         "grad_accum": 1, "ema_decay": 0.995, "ema_update_every": 10, "ema_update_after_step": 100,
                         "val_every": 1000,
                         "save_every": 1000, "log_every": 50, "grad_clip": None, "precompute_coarse": True,
                         "val_weights": "model", "stage1_checkpoint": None, "sample_seed": 0}


class Stage2Trainer(BaseTrainer):
    stage = 2
    size_multiple = 8           # stage 2's rule; stage 1 pads and crops back
    length_key = "steps"
    train_defaults = STAGE2_TRAIN_DEFAULTS
    # a constant learning rate and batches a function of the step alone: a longer (or shorter)
    # run repeats the shorter one's steps exactly, so train.steps may change at a resume
    BOOKKEEPING_KEYS = BaseTrainer.BOOKKEEPING_KEYS + ("train.steps",)
    train_options = BaseTrainer.train_options + ("cache_on_cpu", "stage1_use_config", "zero_init_residual_head")

    def build(self) -> None:
        ckpt = self.tcfg.get("stage1_checkpoint")
        if not ckpt:
            raise ConfigError("train.stage1_checkpoint is not set: stage 2 trains on top of a trained stage 1")
        self.stage1 = load_stage1(ckpt, self.cfg.get("stage1") if self.tcfg.get("stage1_use_config") else None,
                                  trust=self.trust)
        self.stage1.requires_grad_(False).eval().to(self.accelerator.device)
        self.cfg["stage1"] = {"dim": self.stage1.dim}
        self.model = build_stage2(self.cfg.get("stage2"))
        if self.tcfg.get("zero_init_residual_head", False):
            # the residual decoder starts by predicting a zero residual: stage 2 starts as an
            # exact copy of stage 1's output and training can only move it from there
            head = self.model.net.residual_decoder.head
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        if self.model.objective == "pred_res":
            # pred_res trains the residual decoder only: the noise decoder gets no gradient
            # (as in the official code) and is not run at all here.
            self.model.net.noise_decoder.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer(params, float(self.tcfg["lr"]))
        self.ema = EMA(self.model.net, beta=float(self.tcfg["ema_decay"]),
                       update_every=int(self.tcfg["ema_update_every"]),
                       update_after_step=int(self.tcfg["ema_update_after_step"]), include_online_model=False)
        self.ema.to(self.accelerator.device)
        self.generators["loss"] = torch.Generator().manual_seed(self.seed * 1000 + self.accelerator.process_index)
        augment = bool(self.cfg["data"].get("crop") or self.cfg["data"].get("flip"))
        self.cache_coarse = bool(self.tcfg["precompute_coarse"]) and not augment
        if self.tcfg["precompute_coarse"] and augment:
            warnings.warn("train.precompute_coarse is ignored with crop/flip augmentation (the stage-1 output of "
                          "an augmented image differs from the augmented stage-1 output)")
        self.coarse_cache: Dict[int, torch.Tensor] = {}

    def total_steps(self) -> int:
        return int(self.tcfg["steps"])

    @torch.no_grad()
    def coarse_for(self, hazy: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Stage-1 outputs of a batch, one image at a time (cached per image if enabled)."""
        outs = []
        for img, idx in zip(hazy, indices.tolist()):
            if self.cache_coarse and idx in self.coarse_cache:
                outs.append(self.coarse_cache[idx].to(hazy.device))
                continue
            c = padded_forward(self.stage1, img[None])[0]
            if self.cache_coarse:
                self.coarse_cache[idx] = c.cpu() if self.tcfg.get("cache_on_cpu", False) else c
            outs.append(c)
        return torch.stack(outs)

    def step_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        """(gt, coarse, hazy, t, noise): t and the noise drawn from the saved CPU generator."""
        dev = self.accelerator.device
        hazy, gt = batch["hazy"].to(dev), batch["gt"].to(dev)
        coarse = self.coarse_for(hazy, batch["index"])
        b = gt.shape[0]
        g = self.generators["loss"]
        t = torch.randint(0, self.model_unwrapped.num_timesteps, (b,), generator=g)
        noise = torch.randn(gt.shape, generator=g)
        return self.device_inputs(gt, coarse, hazy, t, noise)

    def loss_from(self, gt: torch.Tensor, coarse: torch.Tensor, hazy: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.model(gt, coarse, hazy, t=t, noise=noise)

    @property
    def model_unwrapped(self) -> ResidualDiffusion:
        return self.accelerator.unwrap_model(self.model)

    def after_optimizer_step(self) -> None:
        self.ema.update()

    def val_metric_names(self) -> List[str]:
        return ["psnr_stage2", "ssim_stage2", "psnr_stage1", "ssim_stage1"]

    def sampler_model(self, weights: str) -> ResidualDiffusion:
        base = self.model_unwrapped
        if weights != "ema":
            return base
        s = base.schedule
        return ResidualDiffusion(self.ema.ema_model, s.timesteps, base.sampling_timesteps, base.objective,
                                 s.sum_scale).to(self.accelerator.device).eval()

    @torch.no_grad()
    def restore_outputs(self, hazy: torch.Tensor) -> Dict[str, torch.Tensor]:
        h, w = hazy.shape[-2:]
        x = pad_to(hazy, padded_size(h, w))
        c = self.stage1(x)
        diffusion = self.sampler_model(self.val_weights())
        r = diffusion.sample(c, x, seed=int(self.tcfg.get("sample_seed", 0)))
        return {"stage1": c[..., :h, :w], "stage2": r[..., :h, :w]}

    def val_weights(self) -> str:
        return str(self.tcfg["val_weights"])      # 'model' or 'ema', checked with the config

    def weights_for_inference(self) -> Dict[str, Any]:
        ema = {k: v.detach().cpu().clone() for k, v in self.ema.ema_model.state_dict().items()}
        return {"model": self.unwrapped_state(), "ema": ema}

    def extra_state(self) -> Dict[str, Any]:
        return {"ema_state": self.ema.state_dict()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema_state"])
