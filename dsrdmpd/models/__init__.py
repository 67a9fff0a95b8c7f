"""Networks of both stages."""
from .mcess_unet import MCESSUNet, check_stage1_size, init_stage1_weights
from .perceptual import ConditionalFeatureFusion
from .rdmpd_unet import ResidualDiffusionUNet

__all__ = ["MCESSUNet", "ResidualDiffusionUNet", "ConditionalFeatureFusion", "check_stage1_size",
           "init_stage1_weights"]
