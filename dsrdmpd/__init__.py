"""dsrdmpd: reference implementation of DS-RDMPD (IEEE TGRS 2025), two-stage
remote-sensing image dehazing: MCESS-UNet (stage 1) + residual diffusion with a
perceptual decoder (stage 2)."""

__version__ = "0.1.0"
