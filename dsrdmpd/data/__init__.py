"""Paired datasets: pairing by name key, loading, augmentation, batch order.

Names are imported from their modules on first use (PEP 562), so that the pairing rules
and presets (``pairing``, no torch) load without the torch dataset (``dataset``)."""
from __future__ import annotations

import importlib

_HOMES = {"DataError": "dataset", "PairedImageDataset": "dataset", "StepBatchSampler": "dataset",
          "collate": "dataset", "PRESETS": "pairing", "ImagePair": "pairing", "PairingError": "pairing",
          "PairLayout": "pairing", "find_pairs": "pairing", "listed_pairs": "pairing", "split_pairs": "pairing",
          "PRESET_NAMES": "pairing"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
