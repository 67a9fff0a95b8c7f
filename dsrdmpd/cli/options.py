"""Option groups shared by the commands, defined once, and what they resolve to.

Nothing here imports torch at module level (the values offered come from
:mod:`dsrdmpd.choices`): a command parses its arguments, and answers ``--help`` or a
usage error, in a fraction of a second; the models load after."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

from ..choices import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UNTILED_PIXELS, PRECISIONS, PROTOCOLS
from ..config import load_config
from ..data import PRESET_NAMES
from .errors import UsageError

if TYPE_CHECKING:
    import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for a help text that names its
    own default, nor for None, an empty list or a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == []    # (0 is a value)
        if "(default" in text or empty or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return ap


def add_safe_loading_options(g) -> None:
    """--weights-dir and --trust-checkpoint, for every command that loads both stages."""
    g.add_argument("--weights-dir", type=Path, help="a weights folder written by dsrdmpd-convert (both stages as "
                                                     "safetensors; its SHA256SUMS is checked), instead of "
                                                     "--stage1/--stage2")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need arbitrary unpickling (this can run code from the file: only "
                        "for files from a source you trust; the authors' files and ours never need it)")


def add_model_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("models (--stage1 and --stage2, or --weights-dir)")
    g.add_argument("--stage1", help="stage-1 checkpoint (the authors' .pth or ours)")
    g.add_argument("--stage2", help="stage-2 checkpoint (the authors' model-N.pt or ours)")
    add_safe_loading_options(g)
    g.add_argument("--config", help="YAML config with the model sizes and sampling settings "
                                    "(default: sizes read off the checkpoints)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set sampling.seed=3 (needs --config)")
    g.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="stage-2 weights: raw ('model', what the authors' test script loads) or the EMA copy")


def add_run_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("running")
    g.add_argument("--device", default="auto", help="'auto' (a CUDA GPU if present, else the CPU), 'cpu', "
                                                    "'cuda', 'cuda:1', ...; under accelerate launch each process "
                                                    "takes its own GPU")
    g.add_argument("--seed", type=int, default=None, help="start-noise seed (default: config sampling.seed, 0)")
    g.add_argument("--tile", type=int, default=None, help="tile size for large scenes (multiple of 16, >= 64)")
    g.add_argument("--overlap", type=int, default=None,
                   help="tile overlap in pixels (feathered blend; default 64, 32 with --tile 64)")
    g.add_argument("--tile-batch", type=positive_int, default=1, help="tiles per network call")
    g.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="images of the same size per pipeline call (tiled images and satellite rasters run "
                        "alone); each image's result is its own whatever N (README: Batches)")
    g.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32: true float32 (the reference); tf32: TensorFloat-32 products on GPUs; bf16: bfloat16 "
                        "autocast for both networks, bf16-stage1: stage 1 only (faster on GPUs; see the README for "
                        "the accuracy cost)")
    g.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convolutions on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile both networks (the first image is slow)")
    g.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="with --compile: keep the compiled code in DIR, so that a later run with the same torch and "
                        "sizes loads it instead of compiling (default: $DSRDMPD_COMPILE_CACHE, else none)")
    g.add_argument("--aot", metavar="DIR", default=None,
                   help="run both stages through ahead-of-time compiled packages kept in DIR (a folder of your "
                        "own): the first run of each batch and size builds them (minutes), later runs load them "
                        "in seconds (README: Ahead-of-time compiled pipelines)")
    g.add_argument("--fast-norm", action="store_true", help="split-reduction GroupNorm on CUDA (CPU: PyTorch's)")
    g.add_argument("--cuda-graphs", action="store_true", help="CUDA: capture both stages once per size, then replay")
    g.add_argument("--max-pixels", type=parse_pixels, default=DEFAULT_MAX_PIXELS,
                   help="refuse (per item, from the file's header, before decoding) images of more pixels "
                        "(0: no limit); dsrdmpd-dehaze's satellite rasters have --max-raster-pixels")
    g.add_argument("--max-untiled-pixels", type=parse_pixels, default=DEFAULT_MAX_UNTILED_PIXELS,
                   help="without --tile, images of more pixels run in 512 x 512 tiles (0: only when an image "
                        "runs out of memory whole, which is retried tiled either way)")


def whole_number_from(least: int):
    """An argparse type: an integer >= ``least``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"{n}: must be at least {least}")
        return n
    return parse


positive_int, non_negative_int = whole_number_from(1), whole_number_from(0)


def key_rule_problem(text: str) -> str | None:
    """What is wrong with a name-key rule (a regular expression with exactly one group, the
    key), or None."""
    import re
    try:
        groups = re.compile(text).groups
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    return None if groups == 1 else f"needs exactly one group '(...)', the key; it has {groups}"


def key_rule(text: str) -> str:
    """A name-key rule (argparse type): a regular expression with exactly one group."""
    problem = key_rule_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def parse_pixels(text: str) -> int | None:
    """A pixel count (0 or less: no limit -> None); '100e6' and '4096*4096' are accepted."""
    try:
        parts = [float(p) for p in text.lower().split("*")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel count such as 100000000 or 4096*4096") from None
    n = 1.0
    for p in parts:
        n *= p
    if n != n or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite pixel count")
    return int(n) if n > 0 else None


def add_dataset_options(group) -> None:
    """--data-root, --preset, --split and the preset's own options, in an argument group."""
    group.add_argument("--data-root", help="dataset root (with --preset and --split)")
    group.add_argument("--preset", default="rsid", choices=list(PRESET_NAMES),
                       help="dataset layout (README 'Datasets'); 'paired' with --hazy-subdir/--gt-subdir/--*-key")
    group.add_argument("--split", default="test", help="the dataset's split to use (test, valid, test_a, ...)")
    group.add_argument("--hazy-subdir", help="with --preset paired: hazy folder under the root ('{split}' allowed)")
    group.add_argument("--gt-subdir", help="with --preset paired: GT folder under the root ('{split}' allowed)")
    group.add_argument("--list-file", help="with --preset realblur: list file under the root (default "
                                           "RealBlur_J_{split}_list.txt; RealBlur_R_{split}_list.txt for -R)")


def dataset_split_pairs(args) -> list:
    """The (hazy, GT) pairs of ``args.split`` of the dataset that add_dataset_options describes;
    --hazy-key / --gt-key (each command declares its own) name the files of --preset paired."""
    data = {"preset": args.preset, "root": args.data_root, "list_file": args.list_file}
    if args.preset == "paired":
        data.update(hazy_key=args.hazy_key, gt_key=args.gt_key, hazy_dir=args.hazy_subdir, gt_dir=args.gt_subdir)
    from ..data import split_pairs
    return split_pairs(data, args.split)


def add_output_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("output")
    g.add_argument("--output", required=True, type=Path, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue a killed run in the same output folder: "
                                                         "finished items are kept, the rest is done")
    g.add_argument("--save-coarse", action="store_true", help="also write the stage-1 outputs to coarse/")
    g.add_argument("--panels", type=non_negative_int, default=0, help="write side-by-side panels for the first N images")


def add_protocol_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("scoring")
    g.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper",
                   help="metric protocol (README: 'paper' is the authors' metric code)")
    g.add_argument("--resize", type=positive_int, default=None,
                   help="resize hazy and GT to N x N first, as the authors' test scripts did (512)")


def resolve_device(name: str, local_index: int = 0) -> "torch.device":
    """'auto' -> this process's GPU if CUDA is present, else the CPU; other names are
    checked, and an unavailable one is an error that says what is available."""
    import torch
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if name == "auto":
        return torch.device(f"cuda:{local_index % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (available here: {', '.join(available)})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name!r} is not available on this machine (available: {', '.join(available)})")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported (available: {', '.join(available)})")
    return dev


def model_config(args) -> Dict[str, Any] | None:
    """The --config (with --set) of a command with :func:`add_model_options`, or None; also
    checks that the models are given one way: --stage1 and --stage2, or --weights-dir."""
    if args.weights_dir is not None and (args.stage1 or args.stage2):
        raise UsageError("give either --weights-dir or --stage1/--stage2, not both")
    if args.weights_dir is None and not (args.stage1 and args.stage2):
        raise UsageError("give --stage1 and --stage2 (checkpoint files) or --weights-dir (a converted weights folder)")
    if args.overrides and not args.config:
        raise UsageError("--set needs --config (without a config the model sizes are read off the checkpoints)")
    return load_config(args.config, args.overrides) if args.config else None


def model_source(args) -> str:
    """Where the models came from, for summaries."""
    if args.weights_dir is not None:
        return f"weights folder `{args.weights_dir}`"
    return f"stage 1 `{args.stage1}`, stage 2 `{args.stage2}`"


def model_files(args) -> list:
    """The checkpoint files a run reads (for its fingerprint): --stage1/--stage2, or the
    weights folder's files."""
    if args.weights_dir is not None:
        from ..weights_folder import stage_paths
        return list(stage_paths(args.weights_dir, args.weights))
    return [p for p in (args.stage1, args.stage2) if p]


def load_dehazer(args, cfg: Dict[str, Any] | None, device, **opts):
    """The Dehazer of --stage1/--stage2 (read safely; --trust-checkpoint opts out) or --weights-dir."""
    from ..inference import Dehazer
    if args.weights_dir is not None:
        return Dehazer.from_pretrained(args.weights_dir, cfg, device=device, weights=args.weights, **opts)
    return Dehazer.from_checkpoints(args.stage1, args.stage2, cfg, device=device, weights=args.weights,
                                    trust=args.trust_checkpoint, **opts)


def dehazer_options(args) -> Dict[str, Any]:
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed {args.seed}: must be in [0, 2^63)")
    compile_cache = getattr(args, "compile_cache", None)
    if compile_cache and not args.compile:
        raise UsageError("--compile-cache is for --compile runs: add --compile, or leave it out")
    aot = getattr(args, "aot", None)
    for flag, given in (("--compile", args.compile), ("--cuda-graphs", getattr(args, "cuda_graphs", False))):
        if aot and given:
            raise UsageError(f"--aot runs ahead-of-time compiled pipelines, without {flag}: leave one of them out")
    opts = dict(tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch, precision=args.precision,
                channels_last=args.channels_last, compile=args.compile, compile_cache=compile_cache)
    opts.update(fast_norm=getattr(args, "fast_norm", False), cuda_graphs=getattr(args, "cuda_graphs", False))
    if aot:
        opts["aot"] = aot
    if args.seed is not None:
        opts["seed"] = args.seed
    return opts
