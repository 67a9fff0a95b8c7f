"""Trainers for both stages (accelerate-based, resumable)."""
from .stage1 import Stage1Trainer, stage1_loss
from .stage2 import Stage2Trainer

__all__ = ["Stage1Trainer", "Stage2Trainer", "stage1_loss"]
