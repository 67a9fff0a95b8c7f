"""Stage-1 trainer: the official MCESS-UNet recipe (SPEC.md).

Loss L1 + MSE + 2 * L1 on the 0-255 scale (= 511 L1 + MSE on [0, 1]); Adam(lr 2e-4,
betas (0.5, 0.999)); cosine annealing over the epochs down to 1e-6, stepped per epoch;
BatchNorm init N(1, 0.02); validation PSNR / SSIM each epoch; best + last checkpoints.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..builders import build_stage1
from ..models import init_stage1_weights
from ..models.mcess_unet import STAGE1_MULTIPLE
from .common import padded_forward
from .step_options import set_group_lr
from .trainer import BaseTrainer

STAGE1_TRAIN_DEFAULTS = {"epochs": 200, "batch_size": 6, "lr": 2e-4, "betas": [0.5, 0.999], "lr_min": 1e-6,
                         "seed": 0, "mixed_precision": "no", "grad_accum": 1, "log_every": 10, "grad_clip": None}


def stage1_loss(out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Official stage-1 loss: L1 + MSE + 2 * L1(out * 255, gt * 255)."""
    return F.l1_loss(out, gt) + F.mse_loss(out, gt) + 2 * F.l1_loss(out * 255, gt * 255)


class Stage1Trainer(BaseTrainer):
    stage = 1
    size_multiple = STAGE1_MULTIPLE
    length_key = "epochs"
    train_defaults = STAGE1_TRAIN_DEFAULTS

    def build(self) -> None:
        self.model = build_stage1(self.cfg.get("stage1"))
        init_stage1_weights(self.model)
        self.optimizer = self.make_optimizer(self.model.parameters(), float(self.tcfg["lr"]),
                                             betas=tuple(self.tcfg["betas"]))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=int(self.tcfg["epochs"]), eta_min=float(self.tcfg["lr_min"]))

    def total_steps(self) -> int:
        return int(self.tcfg["epochs"]) * self.steps_per_epoch

    def step_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return self.device_inputs(batch["hazy"], batch["gt"])

    def loss_from(self, hazy: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            out = self.model(hazy)
        return stage1_loss(out.float(), gt)

    def end_of_epoch(self) -> None:
        self.scheduler.step()

    def val_metric_names(self) -> List[str]:
        return ["psnr_stage1", "ssim_stage1"]

    @torch.no_grad()
    def restore_outputs(self, hazy: torch.Tensor) -> Dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {"stage1": padded_forward(model, hazy)}

    def extra_state(self) -> Dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def apply_configured_rates(self, saved: Dict[str, Any]) -> None:
        """As the base class, for the cosine schedule too: where ``train.lr``, ``lr_min`` or
        ``epochs`` changed, the schedule becomes this run's (base, floor, length) and the rate
        its value at the epoch reached; betas as the base class."""
        super().apply_configured_rates(saved)
        lr, lr_min, epochs = float(self.tcfg["lr"]), float(self.tcfg["lr_min"]), int(self.tcfg["epochs"])
        if (float(saved["lr"]), float(saved["lr_min"]), int(saved["epochs"])) == (lr, lr_min, epochs):
            return
        sched = self.scheduler
        sched.base_lrs, sched.eta_min, sched.T_max = [lr] * len(sched.base_lrs), lr_min, epochs
        now = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * sched.last_epoch / epochs)) / 2
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            set_group_lr(group, now)
        sched._last_lr = [now] * len(sched.base_lrs)
