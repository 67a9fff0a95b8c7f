"""Writing a file so that nothing half-written ever stands under its final name.

Every file this package writes (images, rasters, records, tables, checkpoints) goes
through :func:`atomic_path`: the writer fills a temporary file in the destination's
folder (same extension, so format-sniffing writers keep working), which is then flushed
to disk (``fsync``), given the mode a plain ``open()`` would have given it (``0o666``
minus the process umask; ``mkstemp`` alone would leave ``0600``), renamed over the
destination, and the folder entry itself is synced. A writer that fails or is killed
leaves at most a temporary file named ``.<name>.<random>.tmp<ext>``, which
:func:`remove_stale_temporaries` clears.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
TEMP_MARK = ".tmp"
TEMP_STEM = 100         # characters of the name kept in a temporary's name (a 255-byte name stays legal)


def default_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_name_pattern(path: PathLike) -> str:
    """Glob pattern of the temporaries :func:`atomic_path` makes for ``path``."""
    p = Path(path)
    return f".{p.stem[:TEMP_STEM]}.*{TEMP_MARK}{p.suffix}"


def remove_stale_temporaries(path: PathLike) -> int:
    """Delete temporaries left for ``path`` by a killed writer; returns how many. Call it only
    where no other process can be writing the same file (e.g. under the run folder's lock)."""
    p = Path(path)
    n = 0
    if p.parent.is_dir():
        for stale in p.parent.glob(temporary_name_pattern(p)):
            stale.unlink(missing_ok=True)
            n += 1
    return n


def fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike, mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception the
    file written there is synced, given ``mode`` (default: the umask's) and renamed over
    ``path``. On an exception (or a kill) the temporary is removed (or left for
    :func:`remove_stale_temporaries`) and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem[:TEMP_STEM]}.", suffix=f"{TEMP_MARK}{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name in the same folder (same extension), then
    sync and rename it over ``path``: readers never see a partly written file."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    write_atomic(path, lambda p: p.write_bytes(data))


def write_text_atomic(path: PathLike, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
