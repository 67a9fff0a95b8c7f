"""Residual diffusion (RDDM): schedules, training loss and sampler."""
from .residual_diffusion import NOISE_BLOCK, ResidualDiffusion, start_noise, to_signed, to_unit, window_noise
from .schedule import RDDMSchedule

__all__ = ["NOISE_BLOCK", "ResidualDiffusion", "RDDMSchedule", "start_noise", "to_signed", "to_unit", "window_noise"]
