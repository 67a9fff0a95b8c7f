"""Paired hazy / GT dataset with optional augmentation, and a step-indexed batch order.

Images come out as float32 (3, H, W) in [0, 1]; ``resize`` (the authors' stage-1 recipe:
512, bilinear on tensors) is applied before cropping. Mode conversions (grayscale replicated
to RGB, alpha dropped, palette expanded, 16-bit scaled) are those of
``dsrdmpd.imageio.read_image``. Augmentation (random crop, flips) is off by default, as in
the paper; when on, the random choices of sample i at epoch e derive from (seed, e, i)
only, so runs are reproducible and resume exactly, with any number of workers.
"""
from __future__ import annotations

import warnings
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ..imageio import read_image
from .pairing import ImagePair


class DataError(ValueError):
    """Bad training / test data; the message names the file(s)."""


RESIZE_MODES = ("bilinear", "bicubic", "area")


def resize_tensor(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size). 'bilinear' is the authors' stage-1 training
    resize: ``transforms.Resize(512)`` applied after ``ToTensor``, which in their torchvision
    resampled tensors without antialiasing (= F.interpolate, align_corners=False)."""
    if mode == "area":
        out = F.interpolate(x[None], size=(size, size), mode="area")[0]
    else:
        out = F.interpolate(x[None], size=(size, size), mode=mode, align_corners=False, antialias=False)[0]
    return out.clamp(0, 1) if mode == "bicubic" else out   # bicubic overshoots; the others stay in range


class PairedImageDataset(Dataset):
    def __init__(self, pairs: Sequence[ImagePair], crop: Optional[int] = None, flip: bool = False,
                 resize: Optional[int] = None, seed: int = 0, multiple: int = 1, resize_mode: str = "bilinear"):
        if not pairs:
            raise DataError("empty dataset: no image pairs")
        if resize_mode not in RESIZE_MODES:
            raise DataError(f"data.resize_mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        self.pairs = list(pairs)
        self.crop, self.flip, self.resize, self.seed, self.multiple = crop, flip, resize, seed, multiple
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, i: int):
        pair = self.pairs[i]
        hazy, gt = read_image(pair.hazy), read_image(pair.gt)
        for img in (hazy, gt):
            if img.conversion:
                warnings.warn(f"{img.path}: {img.conversion}", stacklevel=2)
        if hazy.tensor.shape != gt.tensor.shape:
            raise DataError(f"size mismatch: {pair.hazy} is {tuple(hazy.tensor.shape[1:])} but {pair.gt} is "
                            f"{tuple(gt.tensor.shape[1:])}")
        return hazy.tensor, gt.tensor

    def __getitem__(self, item) -> dict:
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        hazy, gt = self.load_pair(i)
        if self.resize:
            hazy, gt = (resize_tensor(x, self.resize, self.resize_mode) for x in (hazy, gt))
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + i) % (2 ** 63))
        if self.crop:
            h, w = hazy.shape[-2:]
            if h < self.crop or w < self.crop:
                raise DataError(f"{self.pairs[i].hazy}: image {h}x{w} is smaller than the crop size {self.crop}")
            top = int(torch.randint(0, h - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(0, w - self.crop + 1, (1,), generator=g))
            hazy = hazy[:, top:top + self.crop, left:left + self.crop]
            gt = gt[:, top:top + self.crop, left:left + self.crop]
        if self.flip:
            if torch.rand((), generator=g) < 0.5:
                hazy, gt = hazy.flip(-1), gt.flip(-1)
            if torch.rand((), generator=g) < 0.5:
                hazy, gt = hazy.flip(-2), gt.flip(-2)
        h, w = hazy.shape[-2:]
        if self.multiple > 1 and (h % self.multiple or w % self.multiple):
            raise DataError(f"{self.pairs[i].hazy}: training size {h}x{w} is not a multiple of {self.multiple}; "
                            f"set data.crop or data.resize")
        return {"hazy": hazy.contiguous(), "gt": gt.contiguous(), "index": i, "name": self.pairs[i].hazy.name}


class StepBatchSampler(Sampler[list]):
    """Batches as a pure function of the global step: epoch e uses the permutation of
    ``randperm(n, seed + e)``, cut into ``n // batch_size`` batches (drop last). Starting at
    ``start_step`` continues exactly where an interrupted run stopped. Items are
    (index, epoch) so that augmentation draws depend on the epoch too. With ``world``
    processes, process ``rank`` takes global batches rank, rank + world, ..."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_step: int = 0, total_steps: Optional[int] = None,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        if batch_size > n:
            raise DataError(f"batch size {batch_size} is larger than the dataset ({n} pairs)")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world = rank, world
        self.steps_per_epoch = n // batch_size

    def batch_at(self, step: int) -> list:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(self.n))
        return [(i, epoch) for i in order[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()]

    def __iter__(self) -> Iterator[list]:
        step = self.start_step + self.rank
        while self.total_steps is None or step < self.total_steps:
            yield self.batch_at(step)
            step += self.world

    def __len__(self) -> int:
        if self.total_steps is None:
            return self.steps_per_epoch
        return max(0, -(-(self.total_steps - self.start_step - self.rank) // self.world))


def collate(batch: List[dict]) -> dict:
    shapes = {tuple(b["hazy"].shape) for b in batch}
    if len(shapes) > 1:
        names = ", ".join(f"{b['name']} {tuple(b['hazy'].shape[1:])}" for b in batch)
        raise DataError(f"images of different sizes in one batch ({names}); set data.crop or data.resize, "
                        f"or use batch_size 1")
    return {"hazy": torch.stack([b["hazy"] for b in batch]), "gt": torch.stack([b["gt"] for b in batch]),
            "index": torch.tensor([b["index"] for b in batch]), "name": [b["name"] for b in batch]}
