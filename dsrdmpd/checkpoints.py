"""Loading the authors' checkpoints and saving / loading the project's own.

Every file is read with ``torch.load(weights_only=True)`` (tensors and plain containers
only: nothing in the file can run code), or as safetensors; a file that needs arbitrary
unpickling is refused (:class:`UntrustedCheckpointError`) unless the caller opts in with
``trust=True`` (``--trust-checkpoint``). NumPy arrays written by earlier versions of this
package (the training state's RNG) are read with the array-rebuilding globals allowed,
which cannot run code either. Weight tensors that are not finite are refused.

Official files use the attribute names of the authors' classes (``U_Net``,
``ResidualDiffusion(UnetRes)``); :func:`official_to_project_keys` maps them onto this
package's module names with an ordered list of regular-expression rules, one table per
stage. Official stage-2 files also carry coefficient buffers: those the sampler uses
are checked against the configured schedule, the rest (posterior terms of the
1000-step ancestral sampler, never used by the 5-step sampler) are dropped by name.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple, Union

import torch

from .atomicfile import atomic_path, remove_stale_temporaries

PathLike = Union[str, os.PathLike]
Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]

# ---------------------------------------------------------------- stage 1 key rules
STAGE1_RULES: List[Rule] = [
    (r"^Conv(\d)\.", lambda m: f"encoder.{int(m[1]) - 1}."),
    (r"^neck\.MLP_A\.", "bottleneck.mlp_a."),
    (r"^neck\.MLP_T\.", "bottleneck.mlp_t."),
    (r"^neck\.", "bottleneck."),
    (r"^Up(\d)\.up\.1\.", lambda m: f"decoder.{5 - int(m[1])}.up.conv."),
    (r"^Up(\d)\.up\.2\.", lambda m: f"decoder.{5 - int(m[1])}.up.bn."),
    (r"^Up_conv(\d)\.", lambda m: f"decoder.{5 - int(m[1])}.block."),
    (r"^eff(\d)\.", lambda m: f"decoder.{int(m[1]) - 1}.ess."),
    (r"^adjust_channel(\d)\.", lambda m: f"decoder.{4 - int(m[1])}.skip_proj."),
    (r"^Final_conv\.", "head."),
    # inside MSCA blocks
    (r"\.attention\.inc\.", ".attention.msm."),
    (r"\.attention\.adjust_channel\.", ".attention.fuse."),
    (r"\.attention\.cam\.module\.2\.", ".attention.channel_gate.fc1."),
    (r"\.attention\.cam\.module\.4\.", ".attention.channel_gate.fc2."),
    (r"\.residual_conv\.", ".shortcut."),
    # inside ESS
    (r"\.ess\.EAG\.grouped_conv_g\.", ".ess.gate.skip_branch."),
    (r"\.ess\.EAG\.grouped_conv_x\.", ".ess.gate.up_branch."),
    (r"\.ess\.EAG\.psi\.", ".ess.gate.psi."),
    (r"\.ess\.ECA\.", ".ess.eca."),
    (r"\.ess\.SE\.cSE\.", ".ess.scse.cse."),
    (r"\.ess\.SE\.sSE\.", ".ess.scse.sse."),
    (r"\.ess\.SE\.residual\.", ".ess.scse.residual."),
    (r"\.ess\.SA\.", ".ess.spatial."),
]

# ---------------------------------------------------------------- stage 2 key rules
STAGE2_RULES: List[Rule] = [
    (r"^model\.", ""),
    (r"^init_conv\.", "stem."),
    (r"^time_mlp\.1\.", "time_embed.fc1."),
    (r"^time_mlp\.3\.", "time_embed.fc2."),
    (r"^mid_block1\.", "middle.res1."),
    (r"^mid_block2\.", "middle.res2."),
    (r"^mid_attn\.", "middle.attn."),
    (r"^final_res_block_1\.", "residual_decoder.final_block."),
    (r"^final_conv_1\.", "residual_decoder.head."),
    (r"^final_res_block_2\.", "noise_decoder.final_block."),
    (r"^final_conv_2\.", "noise_decoder.head."),
    (r"^cff_layers_no_skip\.", "residual_decoder.fusions."),
    (r"^cff_layers\.", "noise_decoder.fusions."),
    (r"^downs\.(\d+)\.", r"encoder.\1.L"),
    (r"^ups_no_skip\.(\d+)\.", r"residual_decoder.levels.\1.L"),
    (r"^ups\.(\d+)\.", r"noise_decoder.levels.\1.L"),
    # level members (marked with the 'L' prefix above)
    (r"\.L0\.", ".res1."),
    (r"\.L1\.", ".res2."),
    (r"\.L2\.", ".attn."),
    (r"\.L3\.(1\.)?", lambda m: ".down.conv." if m.string.startswith("encoder") else ".up.conv."),
    # wrappers and block internals
    (r"\.attn\.fn\.fn\.", ".attn.fn."),
    (r"\.attn\.fn\.norm\.", ".attn.norm."),
    (r"\.fn\.to_out\.0\.", ".fn.to_out."),
    (r"\.fn\.to_out\.1\.", ".fn.out_norm."),
    (r"\.mlp\.1\.", ".time_proj."),
    (r"\.res_conv\.", ".shortcut."),
    (r"\.feature_conv\.", ".coarse_encoder."),
    (r"\.condition_conv\.", ".hazy_encoder."),
    (r"\.mul_conv", ".gate_conv"),
    (r"\.add_conv", ".shift_conv"),
]

# Official ResidualDiffusion buffers: checked against the schedule, then dropped.
STAGE2_CHECKED_BUFFERS = ("alphas_cumsum", "betas2_cumsum", "betas_cumsum")
# Official buffers the 5-step sampler never reads (posterior terms of the ancestral sampler).
STAGE2_DROPPED_BUFFERS = ("alphas", "one_minus_alphas_cumsum", "betas2", "betas", "posterior_mean_coef1",
                          "posterior_mean_coef2", "posterior_mean_coef3", "posterior_variance",
                          "posterior_log_variance_clipped")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and keys."""


class UntrustedCheckpointError(CheckpointError):
    """A file whose pickle references code (classes or functions beyond tensors and plain
    containers); loading it could run that code, so it needs the caller's explicit trust."""


TRUST_HINT = "--trust-checkpoint (trust=True in the Python API)"


def rename_key(key: str, rules: Iterable[Rule]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def official_to_project_keys(state: Mapping[str, torch.Tensor], stage: int) -> Dict[str, torch.Tensor]:
    """Map an official state dict (stage 1: ``U_Net``; stage 2: ``ResidualDiffusion``)
    onto project key names. Stage-2 coefficient buffers are left under their own names."""
    rules = STAGE1_RULES if stage == 1 else STAGE2_RULES
    buffers = set(STAGE2_CHECKED_BUFFERS + STAGE2_DROPPED_BUFFERS) if stage == 2 else set()
    out = {}
    for k, v in state.items():
        out[k if k in buffers else rename_key(k, rules)] = v
    return out


def _describe(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Strictly load ``state`` (project key names) into ``model``, casting floating tensors to
    the model's dtype (float16 files are fine). Raises CheckpointError listing missing,
    unexpected and wrong-shape keys."""
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
             for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if wrong:
            parts.append(f"wrong-shape keys ({len(wrong)}): {_describe(wrong)}")
        parts.append("check the model settings (dim, dim_mults, perceptual_decoder, input_condition) against the file")
        raise CheckpointError("\n  ".join(parts))
    cast = {k: (v.to(own[k].dtype) if v.is_floating_point() or own[k].is_floating_point() else v)
            for k, v in state.items()}
    model.load_state_dict(cast, strict=True)


def check_stage2_buffers(state: Mapping[str, torch.Tensor], schedule, source: str) -> None:
    """Compare an official file's schedule buffers with ours (catches timesteps / sum_scale mismatches)."""
    for name, ours in schedule.official_buffers().items():
        if name not in state:
            continue
        theirs = state[name].float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
            raise CheckpointError(
                f"checkpoint {source}: buffer {name!r} does not match the configured schedule "
                f"(timesteps={schedule.timesteps}, sum_scale={schedule.sum_scale}); check the stage-2 config")


def legacy_numpy_globals() -> list:
    """The globals that rebuild NumPy arrays and dtypes (the RNG state of training
    checkpoints written by earlier versions): they allocate an array and fill it with
    data, nothing else. Both module names of ``_reconstruct`` (NumPy 1 and 2) are listed."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


def unsafe_globals(path: PathLike) -> List[str]:
    """The globals a file's pickle references beyond what ``weights_only`` allows (read
    without unpickling anything)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (legacy torch.save format or not a torch file)
        return []
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in legacy_numpy_globals()}
    return [n for n in names if n not in allowed]


# how torch.save's files begin: its zip archive, or (the legacy format) a pickle's PROTO opcode
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def check_torch_file(path: Path) -> None:
    """Refuse, naming the file, what cannot be a torch.save file at all (an image, text, an
    empty file), before unpickling would fail in words that suggest ``trust``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if head.startswith(TORCH_FILE_STARTS):
        return
    hint = ("; it looks like a safetensors file: give it the .safetensors suffix"
            if len(head) > 8 and head[8:9] == b"{" else "")
    raise CheckpointError(f"checkpoint {path} is not a PyTorch file (neither torch.save's zip archive nor a "
                          f"pickle: it starts with {head[:8]!r}){hint}")


def read_checkpoint(path: PathLike, trust: bool = False) -> object:
    """The object stored in a checkpoint, read on the CPU without running code from it.

    ``.safetensors`` files become project checkpoints (:func:`read_safetensors`); torch
    files are read with ``weights_only=True``. A file that needs more (a pickled class or
    function) raises :class:`UntrustedCheckpointError` naming the file, the globals it
    references and the opt-in; with ``trust=True`` it is unpickled in full (the caller
    vouches for where it came from)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    check_torch_file(path)
    try:
        with torch.serialization.safe_globals(legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            names = unsafe_globals(path)
            refs = f"it references {', '.join(names)}" if names else _unpickler_reason(exc)
            raise UntrustedCheckpointError(
                f"checkpoint {path} is not plain tensor data ({refs}): unpickling it could run code, so it was not "
                f"loaded; only if you trust its source, allow it with {TRUST_HINT}") from None
    except Exception as exc:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)   # trusted by the caller
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}") from None


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's weights_only message that says what was refused."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split(". Please use")[0]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict holding NaN or infinite values, naming the first such tensor."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint {source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or "
                                  f"infinity); the file is damaged or the training diverged")


PROJECT_FORMAT = "dsrdmpd"


def is_project_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == PROJECT_FORMAT


SAFETENSORS_VERSION = "1"


def save_safetensors(state: Mapping[str, torch.Tensor], path: PathLike, stage: int, config: Mapping[str, Any],
                     weights: str = "model", source: str = "") -> None:
    """One stage's weights (project key names) as safetensors, atomically. The metadata
    holds the format, its version, the stage, which weights these are ('model' or 'ema'),
    the stage's config section as JSON and, optionally, the file they came from."""
    from safetensors.torch import save_file
    check_finite(state, str(path))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": PROJECT_FORMAT, "format_version": SAFETENSORS_VERSION, "stage": str(stage),
            "weights": weights, "config": json.dumps(dict(config), sort_keys=True)}
    if source:
        meta["source"] = source
    remove_stale_temporaries(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_safetensors(path: PathLike) -> Dict[str, Any]:
    """A safetensors file written by :func:`save_safetensors`, as a project checkpoint
    ``{'format', 'stage', 'config': {'stage<N>': ...}, 'model' or 'ema': tensors}``."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {type(exc).__name__}: {_first_line(exc)}") \
            from None
    if meta.get("format") != PROJECT_FORMAT or meta.get("stage") not in ("1", "2"):
        raise CheckpointError(f"safetensors file {path} has no dsrdmpd metadata (format, stage): write it with "
                              f"dsrdmpd-convert")
    if meta.get("format_version") != SAFETENSORS_VERSION:
        raise CheckpointError(f"safetensors file {path} has format version {meta.get('format_version')!r}; this "
                              f"package reads version {SAFETENSORS_VERSION}")
    stage, weights = int(meta["stage"]), meta.get("weights", "model")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"safetensors file {path}: its config metadata is not JSON ({exc})") from None
    obj = {"format": PROJECT_FORMAT, "version": 1, "stage": stage, "config": {f"stage{stage}": config},
           "model": None, "ema": None}
    obj["ema" if weights == "ema" else "model"] = tensors
    return obj


def save_atomic(obj: object, path: PathLike) -> None:
    """torch.save through :func:`dsrdmpd.atomicfile.atomic_path` (temporary file, fsync,
    umask's mode, rename): a crash never leaves a half-written file under the final name."""
    remove_stale_temporaries(path)          # left by a writer that was killed
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def stage_state_dict(obj: object, stage: int, path: PathLike, weights: str = "model") -> Dict[str, torch.Tensor]:
    """Extract a project-key state dict for ``stage`` from any supported checkpoint object.

    Accepted: project checkpoints (``weights`` = 'model' or 'ema'), official stage-1 plain
    state dicts, official stage-2 ``{'model': ..., 'ema': ...}`` files, and bare state dicts
    of either naming.
    """
    if is_project_checkpoint(obj):
        if obj.get("stage") != stage:
            raise CheckpointError(f"checkpoint {path} holds stage {obj.get('stage')}, expected stage {stage}")
        key = "ema" if weights == "ema" else "model"
        if obj.get(key) is None:
            raise CheckpointError(f"checkpoint {path} has no {key!r} weights")
        check_finite(obj[key], str(path))
        return dict(obj[key])
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(obj).__name__}, not a state dict")
    if stage == 1 and isinstance(obj.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} looks like a stage-2 file ({{'model': ...}}, as the authors' "
                              f"model-N.pt); stage 1 expects the MCESS-UNet state dict (.pth)")
    if stage == 2 and any(str(k).startswith(("Conv1.", "encoder.0.conv1.")) for k in obj):
        raise CheckpointError(f"checkpoint {path} looks like a stage-1 (MCESS-UNet) file; stage 2 expects the "
                              f"authors' model-N.pt or a dsrdmpd stage-2 checkpoint")
    if stage == 2 and "model" in obj and isinstance(obj["model"], dict):
        if weights == "ema":
            ema = obj.get("ema")
            if not isinstance(ema, dict):
                raise CheckpointError(f"checkpoint {path} has no 'ema' entry")
            # ema-pytorch state: 'ema_model.<ResidualDiffusion keys>' (+ 'online_model.*', counters)
            sd = {k[len("ema_model."):]: v for k, v in ema.items() if k.startswith("ema_model.")}
        else:
            sd = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} is not a state dict (non-tensor entries: {_describe(bad)})")
    check_finite(sd, str(path))
    return official_to_project_keys(sd, stage)
