"""Residual diffusion (RDDM): schedules, training loss and sampler."""
from .residual_diffusion import ResidualDiffusion, start_noise, to_signed, to_unit
from .schedule import RDDMSchedule

__all__ = ["ResidualDiffusion", "RDDMSchedule", "start_noise", "to_signed", "to_unit"]
