"""The rules of a batch run's output folder, in one place.

* One run per folder at a time: :meth:`RunFolder.lock` takes a kernel lock
  (``fcntl.flock``) on ``<out>/.lock``. The lock file is never deleted (deleting it would
  let two runs hold locks on two different files); the kernel drops the lock when the
  process ends, however it ends. A second run gets :class:`RunFolderError` naming the
  folder and the holder's pid and host.
* The run's fingerprint: everything that decides the outputs (the checkpoints' SHA-256,
  weights, seed, steps, eta, tiling, precision, bands, scale, resize, protocol, the
  config, the package version) is written to ``<out>/run.json``; every record carries its
  digest. ``--resume`` on a folder made with another fingerprint is refused, naming the
  fields that differ. A fresh run (no ``--resume``) clears the earlier records, under the
  lock, and writes its own ``run.json``; earlier images are overwritten as items are done.
* Records: ``.records/<sha256 of the item name>.json`` (the name's length never matters;
  the name is inside). An unreadable record (truncated, empty, not an object) or one with
  another fingerprint means "not done"; unreadable ones are named in a warning.
* Names that differ only in case (``A.png``, ``a.png``) are one file on the usual macOS and
  Windows file systems: :func:`ignores_case` asks the output folder itself, and the run
  refuses inputs whose outputs would collide there (``evaluation.check_output_names``).
* Temporaries left by a killed writer (``.<name>.<random>.tmp<ext>``, and the
  ``.<name>.<random>.partial.tif`` files of earlier versions) are removed under the lock.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .atomicfile import TEMP_MARK, write_text_atomic
from .weights_folder import sha256_file

RECORDS = ".records"
LOCK = ".lock"
RUN_FILE = "run.json"
OUTPUT_SUBFOLDERS = ("restored", "coarse", "panels", RECORDS)
# Temporaries of dsrdmpd.atomicfile (.<stem>.<mkstemp's 8 characters>.tmp<ext>, possibly followed by
# '.cog.tif' for the COG rewrite) and the '.partial.tif' files earlier versions of raster.py left.
# Folder-wide, as the names of the files a killed run was writing are not known here.
STALE = re.compile(rf"^\..*\.[A-Za-z0-9_]{{8}}({re.escape(TEMP_MARK)}(\..*)?|\.partial\.tif(\.cog\.tif)?)$")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (locked, or made with another fingerprint)."""


def digest(fingerprint: Dict[str, Any]) -> str:
    """A short, stable id of a fingerprint (sha256 of its sorted JSON, 16 hex digits)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def record_name(item_name: str) -> str:
    """File name of an item's record: fixed length whatever the item's name."""
    return hashlib.sha256(item_name.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json"


def ignores_case(folder) -> bool:
    """Whether ``folder`` (or, if it does not exist yet, its nearest existing parent) treats
    names that differ only in case as one file (macOS and Windows file systems usually do;
    so do FAT / exFAT mounts and case-folding ext4 folders). Asked by creating a probe file
    there, named as a temporary (one left by a kill inside a run folder is cleared under its
    lock). False where the folder cannot be looked at or written to."""
    try:
        folder = Path(folder).absolute()
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        fd, probe = tempfile.mkstemp(prefix=".dsrdmpd-case-probe.", suffix=TEMP_MARK, dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        probe = Path(probe)
        return probe.with_name(probe.name.upper()).exists()
    finally:
        os.unlink(probe)


class RunFolder:
    """An output folder of a batch run; see the module docstring for its rules."""

    def __init__(self, path):
        self.path = Path(path)
        self.records = self.path / RECORDS
        self._fd: Optional[int] = None

    # -- the lock ---------------------------------------------------------------------------
    def lock(self, option: str = "--output") -> None:
        """Take the folder's lock (creating the folder) or raise RunFolderError naming the
        holder (and ``option``, the command-line option that chose the folder)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            if holder == self.holder_id():
                raise RunFolderError(f"{self.path}: this process is already using this folder (an earlier run "
                                     f"object still holds it: close() it, or let it finish)") from None
            raise RunFolderError(f"{self.path}: another run is using this folder ({holder}); wait for it "
                                 f"to end or choose another {option}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder_id()}\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def holder_id() -> str:
        """How the lock file names its holder: 'pid 1234 on host'."""
        return f"pid {os.getpid()} on {socket.gethostname()}"

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._fd is not None

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor releases the flock; the file stays
            self._fd = None

    def __del__(self):                  # an object dropped without unlock() lets the folder go
        try:
            self.unlock()
        except Exception:               # (interpreter shutdown)
            pass

    # -- preparing a run (under the lock) ---------------------------------------------------
    def remove_stale_files(self, subfolders: Sequence[str] = OUTPUT_SUBFOLDERS) -> List[Path]:
        """Delete temporaries and partial rasters a killed run left in the folder and its
        ``subfolders``; returns them."""
        removed = []
        for folder in (self.path, *(self.path / s for s in subfolders)):
            if folder.is_dir():
                for p in folder.iterdir():
                    if STALE.match(p.name) and p.is_file():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed

    def read_fingerprint(self) -> Optional[Dict[str, Any]]:
        path = self.path / RUN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return data.get("fingerprint") if isinstance(data, dict) else None

    def prepare(self, fingerprint: Dict[str, Any], resume: bool) -> None:
        """Check (``resume``) or start (fresh) the folder for a run with ``fingerprint``;
        call with the lock held. Removes stale temporaries either way."""
        self.remove_stale_files()
        old = self.read_fingerprint()
        if resume and old is not None and old != fingerprint:
            fields = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in fields[:4])
            raise RunFolderError(f"{self.path}: --resume with other settings than the run that made this folder "
                                 f"({shown}{' ...' if len(fields) > 4 else ''}); resume with the same settings, "
                                 f"or start afresh without --resume (or use another --output)")
        if not resume:
            shutil.rmtree(self.records, ignore_errors=True)
        write_text_atomic(self.path / RUN_FILE, json.dumps({"fingerprint": fingerprint, "id": digest(fingerprint)},
                                                           indent=1, sort_keys=True) + "\n")

    # -- records ----------------------------------------------------------------------------
    def record_path(self, item_name: str) -> Path:
        return self.records / record_name(item_name)

    def write_record(self, item_name: str, row: Dict[str, Any], run_id: str, process: int = 0) -> None:
        write_text_atomic(self.record_path(item_name), json.dumps({**row, "name": item_name, "run": run_id,
                                                                   "process": process}))

    def read_record(self, item_name: str, run_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The item's record, or None when it is missing, unreadable (named in a warning),
        of another item, or (``run_id`` given) of a run with another fingerprint."""
        path = self.record_path(item_name)
        if not path.is_file():
            return None
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            warnings.warn(f"{path}: unreadable record of {item_name!r} ({type(exc).__name__}); the item counts as "
                          f"not done", stacklevel=2)
            return None
        if not isinstance(row, dict) or row.get("name") != item_name:
            warnings.warn(f"{path}: not a record of {item_name!r}; the item counts as not done", stacklevel=2)
            return None
        if run_id is not None and row.get("run") != run_id:
            return None
        return row


def make_fingerprint(*, checkpoints: Sequence[Any], weights: str, seed: int, steps: int, eta: float, fast: bool,
                     tile: Optional[int], overlap: int, precision: str, config: Optional[Dict[str, Any]],
                     protocol: str, resize: Optional[int], raster: Optional[Dict[str, Any]] = None,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What decides a batch run's outputs, as plain JSON data."""
    from . import __version__
    fp: Dict[str, Any] = {
        "checkpoints_sha256": [sha256_file(p) for p in checkpoints],
        "weights": weights, "seed": int(seed), "steps": int(steps), "eta": float(eta), "fast": bool(fast),
        "tile": tile, "overlap": int(overlap) if tile else None, "precision": precision,
        "config_sha256": None if config is None else
        hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "protocol": protocol, "resize": resize, "version": __version__,
    }
    fp.update(raster or {})
    fp.update(extra or {})
    return fp



def check_outputs_apart(out, inputs: Sequence[Any]) -> None:
    """Refuse a run whose output tree (``out`` and the folders written inside it, resolved:
    symlinks followed) holds one of its ``inputs``: it would read its own outputs, and could
    write over its inputs (``--input X/restored --output X``)."""
    out = Path(out)
    trees = {out.resolve(), *((out / s).resolve() for s in OUTPUT_SUBFOLDERS)}
    for src in inputs:
        real = Path(src).resolve()
        for tree in trees:
            if real == tree or tree in real.parents:
                raise RunFolderError(f"--output {out} (resolved: {tree}) holds the input {src} (resolved: {real}); "
                                     f"a run may not read its inputs from its own output tree or write over "
                                     f"them: choose an output folder outside the inputs")
