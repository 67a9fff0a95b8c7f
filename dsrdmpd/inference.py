"""Inference API: the two-stage pipeline on tensors.

    from dsrdmpd.inference import Dehazer
    dehazer = Dehazer.from_checkpoints("stage1.pth", "model-30.pt", device="cuda")
    result = dehazer(hazy)            # hazy: (B, 3, H, W) or (3, H, W), float in [0, 1], any H, W >= 1
    result.coarse, result.restored    # (B, 3, H, W); restored in [0, 1]

Sizes that break the networks' rules (multiples of 16, at least 64) are padded on the
bottom/right (reflect where the image is large enough, else edge replication) and the
outputs are cropped back. The start noise of each image is drawn from its own CPU
generator seeded with ``seed``, at the padded size, so results do not depend on the
device or on batch-mates.

Large scenes: with ``tile`` set, the padded image is cut into overlapping tiles of
``tile`` x ``tile`` pixels (stride ``tile - overlap``, the last tile flush with the edge;
``overlap`` defaults to 64 pixels, 32 for 64-pixel tiles: :func:`default_overlap`);
each tile runs through both stages, ``tile_batch`` tiles per network call, and the
results are blended with feathered (linearly ramped) weights across each overlap, so
seams do not show and network memory stays bounded by the tile size. A scene that fits
in one tile gives exactly the untiled result; with several tiles, each tile takes its
window of a block-keyed noise field (:func:`dsrdmpd.diffusion.window_noise`), so that
a scene streamed from disk window by window (:mod:`dsrdmpd.raster`) gets the very same
result as the scene tiled in memory.

Speed options (all off by default; the default path is the reference float32 one):
``precision='fp32'`` is true float32 on GPUs too (TensorFloat-32 convolutions and
matrix products, which PyTorch allows for cuDNN convolutions by default, are switched off
for the call); ``precision='tf32'`` allows them (faster on Ampere and later cards,
about 3 decimal digits per product); ``precision='bf16'`` runs both networks under bfloat16 autocast (the sampler's
arithmetic stays float32; 'bf16-stage1' only stage 1, which is far less sensitive),
``channels_last`` stores activations NHWC (meant for GPU convolutions), ``compile`` wraps
both networks with ``torch.compile``, its compiled code kept in ``compile_cache`` (a folder,
default ``$DSRDMPD_COMPILE_CACHE``; :mod:`dsrdmpd.compile_cache`) so a later process with
the same folder starts without compiling again. ``fast_norm`` runs GroupNorm (+ scale/shift + SiLU) through
the split-reduction kernels of :mod:`dsrdmpd.models.norm` on CUDA (the CPU keeps PyTorch's);
``cuda_graphs`` captures stage 1 and the whole sampler once per input shape and replays it
(:mod:`dsrdmpd.cuda_graphs`; at most ``max_graphs`` graphs, least recently used dropped;
CUDA only, eta = 0, not with ``compile``). Standardised conv weights are computed once per
weight version (:class:`dsrdmpd.models.unet_blocks.WeightStandardizedConv2d`; exact).
``aot`` (a folder) runs stage 1 and each sampling step's network through ahead-of-time
compiled packages built once per (batch, height, width, precision, channels-last, fast)
and weights, kept in that folder and loaded by later processes in seconds
(:mod:`dsrdmpd.aot_pipeline`, :mod:`dsrdmpd.aot`; its first use per size compiles for
minutes; eta = 0, else eager; not with ``compile`` or ``cuda_graphs``; at most
``max_graphs`` packages of each program held in memory; the fast GroupNorm is not traced,
the compiler fuses PyTorch's).
``tile_batch`` > 1 runs several tiles per network call. Everything runs under
``torch.inference_mode``; the outputs are copied out of it (plain tensors).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import operator
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .aot_pipeline import AOTPipeline
from .builders import load_stage1, load_stage2
from .choices import PRECISIONS
from .cuda_graphs import GraphRunner
from .compile_cache import use_compile_cache
from .config import DEFAULTS, ConfigError, load_config
from .diffusion import ResidualDiffusion, start_noise, window_noise
from .machine import cpu_has_bf16_kernels
from .models import MCESSUNet
from .models.mcess_unet import STAGE1_MIN_SIZE, STAGE1_MULTIPLE, is_stage1_size
from .models.norm import set_fast_norm
from .models.unet_blocks import set_weight_cache




@dataclass
class DehazeResult:
    coarse: torch.Tensor     # (B, 3, H, W) stage-1 output, unclamped
    restored: torch.Tensor   # (B, 3, H, W) final output in [0, 1]


def padded_size(h: int, w: int, multiple: int = STAGE1_MULTIPLE, minimum: int = STAGE1_MIN_SIZE) -> Tuple[int, int]:
    up = lambda n: max(minimum, -(-n // multiple) * multiple)
    return up(h), up(w)


def pad_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Pad (B, C, h, w) on the bottom/right to ``size``: reflect when each pad is smaller
    than the side, else replicate."""
    h, w = x.shape[-2:]
    ph, pw = size[0] - h, size[1] - w
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


DEFAULT_OVERLAP = 64      # tile overlap in pixels when none is given


def default_overlap(tile: Optional[int]) -> int:
    """The overlap used when none is given: :data:`DEFAULT_OVERLAP` where it is smaller than
    the tile (every tile size but 64), else half the tile."""
    return DEFAULT_OVERLAP if tile is None or DEFAULT_OVERLAP < tile else tile // 2


def _whole(value: Any, what: str) -> int:
    """``value`` as a Python int (any integer type, numpy's too; not bool), else ConfigError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be a whole number, got {value!r}") from None


def check_tiling(tile: int, overlap: int) -> None:
    """ConfigError unless ``tile`` is a valid tile size (a multiple of 16, at least 64) and
    ``overlap`` lies in [0, tile); both any integer type."""
    tile, overlap = _whole(tile, "tile size"), _whole(overlap, "tile overlap")
    if not is_stage1_size(tile):
        raise ConfigError(f"tile size {tile} must be a multiple of {STAGE1_MULTIPLE} and at least {STAGE1_MIN_SIZE}")
    if not 0 <= overlap < tile:
        raise ConfigError(f"tile overlap {overlap} must be in [0, tile size {tile})")


def _to_stderr(line: str) -> None:
    print(f"dsrdmpd: {line}", file=sys.stderr, flush=True)


class SlowPrecisionWarning(UserWarning):
    """A precision this device runs far slower than float32 (bfloat16 on a CPU without oneDNN bf16)."""


class Dehazer:
    """Both stages, ready to run. Models are put in eval mode on ``device``."""

    def __init__(self, stage1: MCESSUNet, stage2: ResidualDiffusion, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, eta: float = 0.0, fast: bool = True, steps: Optional[int] = None,
                 tile: Optional[int] = None, overlap: Optional[int] = None, tile_batch: int = 1,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                 fast_norm: bool = False, cuda_graphs: bool = False, max_graphs: int = 4,
                 compile_cache: Optional[str] = None, aot: Union[None, str, "os.PathLike"] = None):
        self.device = torch.device(device)
        self.stage1 = stage1.to(self.device).eval()
        self.stage2 = stage2.to(self.device).eval()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
        self.precision, self.channels_last = precision, bool(channels_last)
        if precision.startswith("bf16") and self.device.type == "cpu" and not cpu_has_bf16_kernels():
            warnings.warn(f"precision {precision!r} on this CPU: PyTorch has no bfloat16 convolution kernels for it "
                          "and falls back to its reference convolution, an order of magnitude slower than 'fp32'; "
                          "use precision 'fp32' on this machine", SlowPrecisionWarning, stacklevel=2)
        if self.channels_last:
            self.stage1.to(memory_format=torch.channels_last)
            self.stage2.to(memory_format=torch.channels_last)
        if aot is not None and (compile or cuda_graphs):
            raise ConfigError(f"aot (ahead-of-time compiled pipelines) runs without {'compile' if compile else 'cuda_graphs'}:"
                              f" leave one of them out")
        if compile:
            use_compile_cache(compile_cache)
            self.stage1.compile()
            self.stage2.net.compile()
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ConfigError(f"eta must be a finite number >= 0, got {eta!r}")
        most = getattr(stage2, "num_timesteps", 10 ** 9)       # the diffusion's training steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most):
            raise ConfigError(f"steps must be an integer in [1, {most}] (or None: the model's "
                              f"{stage2.sampling_timesteps}), got {steps!r}")
        self.seed, self.eta, self.fast = check_seed(seed), float(eta), fast
        self._modules_of: Tuple[Tuple[torch.nn.Module, ...], Tuple[torch.nn.Module, ...]] = ((), ())
        for net in (self.stage1, self.stage2):
            set_weight_cache(set_fast_norm(net, fast_norm), True)
        self.graphs = (self._graph_runner(max_graphs)
                       if cuda_graphs and self.device.type == "cuda" and not compile else None)
        self.aot = AOTPipeline(self, aot, max_graphs, notify=_to_stderr) if aot is not None else None
        self._aot_batch: Dict[Tuple[int, int], int] = {}     # (H, W) -> largest batch run through aot
        self.steps = stage2.sampling_timesteps if steps is None else steps
        self.overlap_given = overlap            # None: default_overlap of whichever tile size runs
        if overlap is None:
            overlap = default_overlap(tile)
        if tile is not None:
            check_tiling(tile, overlap)
        self.tile, self.overlap, self.tile_batch = tile, overlap, max(1, int(tile_batch))

    @classmethod
    def from_checkpoints(cls, stage1: str, stage2: str, config: Union[None, str, Dict[str, Any]] = None,
                         device: Union[str, torch.device] = "cpu", weights: str = "model", trust: bool = False,
                         **kwargs) -> "Dehazer":
        """Load both stages. ``config``: a dict or YAML path (str or Path) whose ``stage1`` / ``stage2``
        sections give the sizes; None reads them off the checkpoints. ``weights``: 'model' or
        'ema' for stage 2. Sampling options default to the config's ``sampling`` section.
        Files are read without unpickling code; ``trust=True`` allows a file that needs it
        (only for files from a source you trust)."""
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        s1 = load_stage1(stage1, None if config is None else config.get("stage1"), trust=trust)
        s2 = load_stage2(stage2, None if config is None else config.get("stage2"), weights=weights, trust=trust)
        return cls._with_sampling(s1, s2, config, device, kwargs)

    @classmethod
    def from_pretrained(cls, folder, config: Union[None, str, Dict[str, Any]] = None,
                        device: Union[str, torch.device] = "cpu", weights: str = "model",
                        hashes: Union[None, str, Dict[str, str]] = None, **kwargs) -> "Dehazer":
        """Load both stages from a weights folder written by ``dsrdmpd-convert`` (safetensors;
        layout in :mod:`dsrdmpd.weights_folder`), after checking the files against ``hashes``
        (a ``sha256sum``-format file or {path: sha256}; default: the folder's SHA256SUMS, if
        present). ``config`` overrides the folder's config.json."""
        from .weights_folder import load_weights_folder
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        s1, s2, cfg = load_weights_folder(folder, weights, config, hashes)
        return cls._with_sampling(s1, s2, cfg, device, kwargs)

    @classmethod
    def _with_sampling(cls, s1, s2, config, device, kwargs) -> "Dehazer":
        sampling = {**DEFAULTS["sampling"], **((config or {}).get("sampling") or {})}
        opts = {"seed": sampling["seed"], "eta": sampling["eta"], "fast": sampling["fast"], **kwargs}
        return cls(s1, s2, device=device, **opts)

    @torch.no_grad()
    def coarse(self, hazy: torch.Tensor) -> torch.Tensor:
        """Stage 1 only on an already padded (B, 3, H, W) batch."""
        return self.stage1(hazy)

    def _graph_runner(self, max_graphs: int, warmup: int = 2) -> GraphRunner:
        """The CUDA-graph runner of both stages and the sampler (it asks for the current stages
        before each call)."""
        return GraphRunner(self._run_eager, self._networks, max_graphs, warmup)

    def _networks(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """Both stages as they are now (the runners ask before every call: a swapped stage is seen)."""
        return self.stage1, self.stage2

    def _autocast(self, stage: int):
        if self.precision == "bf16" or (self.precision == "bf16-stage1" and stage == 1):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _float32_mode(self):
        """TensorFloat-32 on CUDA only with precision='tf32'; PyTorch's flags are restored after."""
        if self.device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def _run(self, x: torch.Tensor, noise: torch.Tensor):
        """Both stages on padded (B, 3, H, W) tiles with their start noise; float32 out
        (replayed from a CUDA graph with ``cuda_graphs``, equal to the eager run)."""
        if self.graphs is not None and self.eta == 0:
            return self.graphs(x, noise, extra=(self.precision, self.channels_last, self.steps, self.fast))
        if self.aot is not None and self.eta == 0:
            return self._run_aot(x, noise)
        return self._run_eager(x, noise)

    def _run_aot(self, x: torch.Tensor, noise: torch.Tensor):
        """Through the compiled packages of this size. A batch smaller than the largest one run
        at its size (a folder's last batch, a scene's last tiles) is filled up to it with
        copies of its last image, whose results are dropped: one set of packages serves them
        all (each image's result does not depend on its batch-mates beyond float32 rounding)."""
        schedule = getattr(self.stage2, "schedule", None)
        if schedule is not None:
            schedule.sampling_times(self.steps)        # the time grid as plain ints, computed before any tracing
        b, size = x.shape[0], tuple(x.shape[-2:])
        full = max(b, self._aot_batch.get(size, 0))
        if full > b:
            x, noise = (torch.cat([t, t[-1:].expand(full - b, *t.shape[1:])]) for t in (x, noise))
        c, r = self.aot(x, noise, extra=dict(precision=self.precision, channels_last=self.channels_last,
                                             fast=bool(self.fast)))
        self._aot_batch[size] = full         # only once it ran (a failed build does not pin the size to it)
        return c[:b], r[:b]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this Dehazer's memory format (channels-last or contiguous): the layout is
        ours, not the caller's, so a channels-last or strided input runs as a contiguous one."""
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _run_eager(self, x: torch.Tensor, noise: torch.Tensor):
        x = self._layout(x)
        with self._autocast(1):
            c = self.stage1(x).float()
        with self._autocast(2):
            if self.eta > 0:                   # each image its own step noise: no global RNG, no batch-mates
                r = torch.cat([self.stage2.sample(c[i:i + 1], x[i:i + 1], noise=noise[i:i + 1], steps=self.steps,
                                                  eta=self.eta, fast=self.fast, generator=step_generator(noise[i]))
                               for i in range(c.shape[0])])
            else:
                r = self.stage2.sample(c, x, noise=noise, steps=self.steps, eta=self.eta, fast=self.fast)
        return c.contiguous(), r.float().contiguous()

    def __call__(self, hazy: torch.Tensor, seed: Optional[int] = None,
                 noise: Optional[torch.Tensor] = None) -> DehazeResult:
        """Dehaze ``hazy``: (B, 3, H, W) or one (3, H, W) image, floating point in [0, 1].

        Runs in float32 (other float dtypes are cast) with the models in eval mode; returns
        plain tensors (no autograd graph, no inference-mode flag) of the input's rank and
        floating dtype, on this Dehazer's device (on the CPU with ``tile``). ``seed``
        (default: the Dehazer's) seeds each image's start noise; ``noise`` replaces it:
        (B, 3, Hp, Wp) at the padded size :func:`padded_size`. Global state (grad mode, RNG,
        default dtype, backend flags, the models' train / eval mode) is left as it was."""
        single = isinstance(hazy, torch.Tensor) and hazy.dim() == 3
        check_input(hazy)
        seed = check_seed(self.seed if seed is None else seed)
        x = hazy.unsqueeze(0) if single else hazy
        if noise is not None and single and noise.dim() == 3:
            noise = noise.unsqueeze(0)
        dtype = hazy.dtype
        if x.shape[0] == 0:                              # empty batch: nothing to run
            empty = torch.empty(x.shape, dtype=dtype, device=self.device if self.tile is None else "cpu")
            return DehazeResult(empty, empty.clone())
        with self._call_state():
            c, r = self._dehaze(x, seed, noise)
        # copied out of inference mode: plain contiguous tensors in the caller's dtype
        c, r = (t.to(dtype=dtype, copy=True, memory_format=torch.contiguous_format) for t in (c, r))
        return DehazeResult(c[0], r[0]) if single else DehazeResult(c, r)

    @contextlib.contextmanager
    def _call_state(self):
        """The models in eval mode and their dtype (float32; float64 for float64 copies) as
        the default dtype during a call; the caller's modes and default dtype restored after."""
        nets = (self.stage1, self.stage2)
        walked, modules = self._modules_of      # (nets, their modules) from an earlier call: walking costs ~2 ms
        if len(walked) != 2 or any(a is not b for a, b in zip(walked, nets)) or any(net.training for net in nets):
            modules = tuple(m for net in nets for m in net.modules())     # first call, other nets, or train()
            self._modules_of = nets, modules
        training = [m for m in modules if m.training]        # usually none: nothing to set, nothing to undo
        default_dtype = torch.get_default_dtype()
        try:
            for m in training:
                m.training = False
            torch.set_default_dtype(self._network_dtype())
            with self._float32_mode():
                yield
        finally:
            torch.set_default_dtype(default_dtype)
            for m in training:
                m.training = True

    def _network_dtype(self) -> torch.dtype:
        """The dtype new tensors inside the networks need (timestep embeddings)."""
        first = next(itertools.chain(self.stage2.parameters(), self.stage1.parameters()), None)
        return torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32

    @torch.inference_mode()
    def _dehaze(self, hazy: torch.Tensor, seed: int, noise: Optional[torch.Tensor]):
        """Both stages on a checked (B, 3, H, W) batch; (coarse, restored) float32, cropped."""
        h, w = hazy.shape[-2:]
        size = padded_size(h, w)
        want = (hazy.shape[0], 3, *size)
        if noise is not None and tuple(noise.shape) != want:
            raise ValueError(f"start noise must have the padded shape {want}, got {tuple(noise.shape)}")
        if self.tile is None:
            if noise is None:
                noise = start_noise(want, seed)
            x = pad_to(hazy.to(self.device, torch.float32), size)
            c, r = self._run(x, noise.to(self.device))
        else:
            x = pad_to(hazy.float(), size)          # the whole scene stays on the CPU
            c, r = self._tiled(x, self.tile_plan(h, w), seed, noise)
        return c[..., :h, :w], r[..., :h, :w]

    def tile_plan(self, h: int, w: int, tile: Optional[int] = None) -> "TilePlan":
        """The tiles of an h x w scene (``tile`` defaults to this Dehazer's; another tile size
        takes the default overlap for it unless this Dehazer was given one)."""
        tile = tile or self.tile
        overlap = self.overlap if tile == self.tile or self.overlap_given is not None else default_overlap(tile)
        return TilePlan.make(h, w, tile, overlap)

    def tile_noise(self, plan: "TilePlan", y: int, x: int, seed: Optional[int] = None) -> torch.Tensor:
        """(1, 3, th, tw) start noise of the tile at (y, x): the untiled noise when one tile
        covers the scene, else the tile's window of the block-keyed noise field."""
        seed = self.seed if seed is None else seed
        if len(plan.windows) == 1:
            return start_noise((1, 3, *plan.padded), seed)[..., y:y + plan.tile_h, x:x + plan.tile_w]
        return window_noise(seed, y, x, plan.tile_h, plan.tile_w)

    @torch.inference_mode()
    def run_tiles(self, tiles: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both stages on a batch of padded tiles (N, 3, th, tw) in [0, 1] with their start
        noise; returns (coarse, restored) on the CPU, float32 (models in eval mode, as in a call)."""
        with self._call_state():
            c, r = self._run(tiles.to(self.device, torch.float32), noise.to(self.device))
        return c.cpu(), r.cpu()

    def _tiled(self, x: torch.Tensor, plan: "TilePlan", seed: int, noise: Optional[torch.Tensor]):
        b = x.shape[0]
        th, tw = plan.tile_h, plan.tile_w

        def tile_noise(i, y, xx):
            if noise is not None:
                return noise[i:i + 1, :, y:y + th, xx:xx + tw]
            return self.tile_noise(plan, y, xx, seed)
        if len(plan.windows) == 1:                       # one tile covers the scene: plain run
            ns = torch.cat([tile_noise(i, 0, 0) for i in range(b)])
            c, r = self._run(x[..., :th, :tw].to(self.device), ns.to(self.device))
            return c.cpu(), r.cpu()
        weight = plan.weight()
        acc_c = torch.zeros_like(x)
        acc_r = torch.zeros_like(x)
        norm = torch.zeros((1, 1, *plan.padded))        # the same windows for every image
        for y, xx in plan.windows:
            norm[:, :, y:y + th, xx:xx + tw] += weight
        jobs = [(i, y, xx) for i in range(b) for (y, xx) in plan.windows]
        for k in range(0, len(jobs), self.tile_batch):
            chunk = jobs[k:k + self.tile_batch]
            xs = torch.cat([x[i:i + 1, :, y:y + th, xx:xx + tw] for i, y, xx in chunk]).to(self.device)
            ns = torch.cat([tile_noise(i, y, xx) for i, y, xx in chunk]).to(self.device)
            c, r = self._run(xs, ns)
            for j, (i, y, xx) in enumerate(chunk):
                acc_c[i:i + 1, :, y:y + th, xx:xx + tw] += c[j:j + 1].cpu() * weight
                acc_r[i:i + 1, :, y:y + th, xx:xx + tw] += r[j:j + 1].cpu() * weight
        return acc_c / norm, acc_r / norm

    dehaze = __call__


@dataclass
class TilePlan:
    """Overlapping tiles of an h x w scene padded to ``padded`` (bottom/right): tile size
    (tile_h, tile_w), top-left corners ``windows`` in row-major order, the blend overlap,
    and the padding mode (reflect, or replicate for scenes smaller than their padding)."""
    height: int
    width: int
    padded: Tuple[int, int]
    tile_h: int
    tile_w: int
    overlap: int
    windows: list
    pad_mode: str

    @classmethod
    def make(cls, h: int, w: int, tile: int, overlap: int) -> "TilePlan":
        check_tiling(tile, overlap)
        hp, wp = padded_size(h, w)
        th, tw = min(tile, hp), min(tile, wp)
        windows = [(y, x) for y in tile_starts(hp, th, overlap) for x in tile_starts(wp, tw, overlap)]
        mode = "reflect" if hp - h < h and wp - w < w else "replicate"
        return cls(h, w, (hp, wp), th, tw, overlap, windows, mode)

    def weight(self) -> torch.Tensor:
        return feather_weights(self.tile_h, self.tile_w, self.overlap)


def check_input(hazy: torch.Tensor) -> None:
    """A batch the networks can use: a floating (B, 3, H, W) or (3, H, W) tensor with
    values, finite, in [0, 1]. Raises TypeError / ValueError naming the problem."""
    if not isinstance(hazy, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of hazy images, got {type(hazy).__name__}")
    if hazy.dim() not in (3, 4) or hazy.shape[-3] != 3 or hazy.shape[-1] < 1 or hazy.shape[-2] < 1:
        raise ValueError(f"expected hazy images of shape (B, 3, H, W) or (3, H, W) in [0, 1], got {tuple(hazy.shape)}")
    if not hazy.is_floating_point():
        hint = " (divide uint8 by 255)" if hazy.dtype == torch.uint8 else ""
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {hazy.dtype}{hint}")
    if hazy.device.type == "meta":
        raise ValueError("hazy images are on the meta device: they hold no values to dehaze")
    if hazy.numel() == 0:
        return
    hazy = hazy.detach()
    if not bool(torch.isfinite(hazy).all()):
        raise ValueError("hazy images contain NaN or infinite values")
    lo, hi = float(hazy.min()), float(hazy.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        hint = " (0-255 values? divide by 255)" if hi > 2 else ""
        raise ValueError(f"hazy images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


SEED_RANGE = (-2 ** 63, 2 ** 64)     # what torch.Generator.manual_seed takes


def check_seed(seed) -> int:
    """``seed`` as an int: an integer (Python, NumPy or one-element integer tensor) in
    [-2**63, 2**64); TypeError / ValueError otherwise (a float or string is not rounded)."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}") from None
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got bool {seed!r}")
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ValueError(f"seed {value} is outside [-2**63, 2**64)")
    return value


def step_generator(noise: torch.Tensor) -> torch.Generator:
    """The CPU generator of one image's (or tile's) extra noise when eta > 0, seeded from
    its start noise (C, H, W): reproducible, independent of batch-mates and of the global RNG."""
    data = noise.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, person=b"dsrdmpd-eta").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


def tile_starts(length: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of size ``tile`` covering [0, length), stride tile - overlap,
    the last one flush with the end."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def feather_weights(h: int, w: int, overlap: int) -> torch.Tensor:
    """(1, 1, h, w) blending weights: linear ramps over ``overlap`` pixels at every edge
    (never zero), 1 inside. Normalised by their sum, so where tiles do not overlap the
    tile's own output comes through unchanged."""
    def ramp(n):
        r = torch.ones(n)
        k = min(overlap, n // 2)
        if k > 0:
            edge = (torch.arange(k, dtype=torch.float32) + 1) / (k + 1)
            r[:k], r[n - k:] = edge, edge.flip(0)
        return r
    return (ramp(h)[:, None] * ramp(w)[None, :])[None, None]
