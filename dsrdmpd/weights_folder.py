"""A folder holding both stages as safetensors: what ``dsrdmpd-convert`` writes and
``Dehazer.from_pretrained`` / ``--weights-dir`` read (the layout a model-hub repository
would have)::

    FOLDER/
      config.json                     {"format": "dsrdmpd-weights", "format_version": 1,
                                       "config": {"stage1": {...}, "stage2": {...}}, "sources": {...}}
      stage1/model.safetensors        stage-1 weights (MCESS-UNet, project key names)
      stage2/model.safetensors        stage-2 network, raw weights
      stage2/model.ema.safetensors    stage-2 network, EMA copy (when the source had one)
      SHA256SUMS                      "<sha256>  <path>" per file (``sha256sum -c`` reads it)

Each safetensors file also carries its stage's config as metadata, so it loads on its
own as well (``load_stage1`` / ``load_stage2``). When a hashes file is given (by default
the folder's ``SHA256SUMS``, if present) every file it lists is checked before
anything is loaded; a mismatch names the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .atomicfile import write_text_atomic
from .checkpoints import CheckpointError, PathLike

FOLDER_FORMAT, FOLDER_VERSION = "dsrdmpd-weights", 1
CONFIG_NAME, HASHES_NAME = "config.json", "SHA256SUMS"
STAGE_FILES = {("stage1", "model"): "stage1/model.safetensors",
               ("stage2", "model"): "stage2/model.safetensors",
               ("stage2", "ema"): "stage2/model.ema.safetensors"}


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_hashes(folder: PathLike, hashes: Dict[str, str]) -> Path:
    """``SHA256SUMS`` in ``sha256sum`` format (paths relative to the folder, sorted)."""
    path = Path(folder) / HASHES_NAME
    write_text_atomic(path, "".join(f"{h}  {name}\n" for name, h in sorted(hashes.items())))
    return path


def read_hashes(path: PathLike) -> Dict[str, str]:
    """{relative path: sha256} from a ``sha256sum``-format file; a malformed line is an error
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hashes file not found: {path}")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(f"hashes file {path} line {n}: expected '<sha256>  <path>', got {line.strip()!r}")
        out[parts[1].strip().lstrip("*")] = digest
    return out


def verify_hashes(folder: PathLike, hashes: Union[PathLike, Dict[str, str]]) -> None:
    """Check every file a hashes file (or dict) lists, relative to ``folder``."""
    folder = Path(folder)
    expected = read_hashes(hashes) if not isinstance(hashes, dict) else hashes
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the hashes but missing")
        actual = sha256_file(path)
        if actual != digest.lower():
            raise CheckpointError(f"{path}: SHA-256 {actual} does not match the recorded {digest.lower()} "
                                  f"(damaged or replaced file)")


def read_folder_config(folder: PathLike) -> Dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a dsrdmpd weights folder (no {CONFIG_NAME}; write one with "
                                f"dsrdmpd-convert)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise CheckpointError(f"{path}: not a dsrdmpd weights folder config (format {FOLDER_FORMAT!r} expected)")
    if meta.get("format_version") != FOLDER_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')!r}; this package reads "
                              f"version {FOLDER_VERSION}")
    return meta


def stage_paths(folder: PathLike, weights: str = "model") -> Tuple[Path, Path]:
    """(stage-1 file, stage-2 file for ``weights``) of a weights folder."""
    folder = Path(folder)
    s1, s2 = folder / STAGE_FILES[("stage1", "model")], folder / STAGE_FILES[("stage2", weights)]
    for p in (s1, s2):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing from the weights folder {folder}")
    return s1, s2


def load_weights_folder(folder: PathLike, weights: str = "model", config: Optional[Dict[str, Any]] = None,
                        hashes: Union[None, PathLike, Dict[str, str]] = None):
    """(stage 1, stage 2, the folder's config) from a weights folder, after checking the
    hashes (``hashes``, else the folder's SHA256SUMS if there is one). ``config``: a full
    config whose stage sections replace the folder's."""
    from .builders import load_stage1, load_stage2
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"weights folder not found: {folder}")
    meta = read_folder_config(folder)
    if hashes is None and (folder / HASHES_NAME).is_file():
        hashes = folder / HASHES_NAME
    if hashes is not None:
        verify_hashes(folder, hashes)
    s1_path, s2_path = stage_paths(folder, weights)
    cfg = {**(meta.get("config") or {}), **(config or {})}
    stage1 = load_stage1(s1_path, (config or {}).get("stage1"))
    stage2 = load_stage2(s2_path, (config or {}).get("stage2"), weights=weights)
    return stage1, stage2, cfg
