"""Paired datasets: pairing by name key, loading, augmentation, batch order."""
from .dataset import DataError, PairedImageDataset, StepBatchSampler, collate
from .pairing import PRESET_NAMES, PRESETS, ImagePair, PairingError, PairLayout, find_pairs, listed_pairs, split_pairs

__all__ = ["DataError", "PairedImageDataset", "StepBatchSampler", "collate", "PRESETS", "ImagePair",
           "PairingError", "PairLayout", "find_pairs", "listed_pairs", "split_pairs", "PRESET_NAMES"]
