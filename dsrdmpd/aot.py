"""Ahead-of-time compiled pipelines (AOTInductor): compiled code without a compile per process.

``AOTRunner(fn, modules, folder)`` runs ``fn(*tensors) -> tuple of tensors`` (one program of
the Dehazer's eta = 0 pipeline: stage 1, the fusion terms or one network step;
:mod:`dsrdmpd.aot_pipeline`) through a package built once per input shape and options: ``torch.export`` traces ``fn`` at that shape, AOTInductor compiles the
trace, weights included, into one ``.pt2`` file in ``folder``, and every later call, in
this process or in any later one, loads that file (seconds) instead of compiling again
(``torch.compile`` repeats its tracing in every new process, cache or not).

A package's name carries a digest of everything its code depends on (:func:`package_fields`):
the program's name, this package's code (its version and a SHA-256 of its sources), the
weights (SHA-256 of every parameter and buffer), the input shapes and dtypes, the caller's
options (the Dehazer's precision, channels-last and, for the step, fast), the device (CUDA: the card's name and
compute capability; and the CPU that runs the host code, compiled for it alone: model,
instruction set, a digest of its feature flags) and the torch version. A package is
therefore loaded only where and for what it was built; anything else builds its own.
Packages are written atomically (a killed build leaves at most a temporary, removed by the
next build of that package), and processes that want the same missing package build it
once: the first takes the lock ``.<name>.lock`` in the folder, the others wait for it
(saying so) and then load what it built. Beside each package, ``<name>.json`` says in
words what it was built for and how long the build took (for people; never read back).
A build keeps torch's compile caches in ``folder/.cache``.

A package is compiled native code, and loading it runs that code. The folder is held to the
rules of a folder of programs (as ssh holds its keys): it must belong to the user running
this and be writable by nobody else, and no folder above it may be replaceable by another
user (:func:`check_code_folder`, before every load); a package is opened without following
symbolic links, and the open file is checked (this user's, only they may write it) and
loaded, so that what is checked is what runs (:func:`open_package`). A build uses
compile caches inside the folder, not inductor's shared default in /tmp (:func:`private_caches`).
Violations are ConfigErrors naming the file. Give it a folder of your own; never one
somebody else filled.

Loaded packages stay in memory, each with its own copy of the weights: at most
``max_loaded``, least recently used dropped. The weights' versions and addresses
(:func:`dsrdmpd.cuda_graphs.weights_key`, cheap) of the modules (a callable: swapped
modules are seen) are checked on every call; when they change, the digest is recomputed
and the packages of the new weights are found or built. Writes through ``.data`` (no
version bump; ema-pytorch's way) are not seen: make a new runner (Dehazer) after them.
Inputs are made contiguous before a call (a package is traced with contiguous inputs).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import os
import platform
import stat
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, Tuple, Union

import torch
from torch import nn

from . import __version__
from .atomicfile import atomic_path, remove_stale_temporaries, write_text_atomic
from .config import ConfigError
from .cuda_graphs import module_source, weights_key
from .machine import cpu_model
from .messages import first_line

FORMAT = 2               # bump when what a package holds or how it is traced changes (2: one program per part)
SUFFIX = ".pt2"


def _check_private(path: Path, info: os.stat_result) -> None:
    """ConfigError unless ``info`` (of ``path``) belongs to this user and nobody else may write it."""
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path}: belongs to another user (uid {info.st_uid}); compiled code is only loaded "
                          f"from your own files")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: others may write it (mode {stat.filemode(info.st_mode)}); compiled code is only "
                          f"loaded from files that only you can write (chmod go-w)")


def check_code_folder(folder: Union[str, os.PathLike]) -> Path:
    """``folder`` (of compiled code) as a Path, if it is safe to load code from: it belongs to
    this user and nobody else may write it, and no folder above it can be renamed or
    replaced by somebody else (each belongs to this user or root and is writable by nobody
    else, unless it has the sticky bit, as /tmp has). ConfigError naming the folder
    otherwise. POSIX only (elsewhere nothing is checked)."""
    folder = Path(folder)
    if os.name != "posix":
        return folder
    _check_private(folder, folder.stat())
    for above in folder.resolve().parents:
        info = above.stat()
        if info.st_uid not in (0, os.getuid()):
            raise ConfigError(f"{folder}: the folder above it, {above}, belongs to another user (uid {info.st_uid}); "
                              f"compiled code is only loaded from folders only you (or root) control")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise ConfigError(f"{folder}: others may write the folder above it, {above} (mode "
                              f"{stat.filemode(info.st_mode)}), and so replace this one; compiled code is only loaded "
                              f"from folders only you control")
    return folder


def open_package(path: Path) -> BinaryIO:
    """``path`` opened for reading without following a symbolic link, then the open file
    checked (a regular file that belongs to this user and only they may write): what is
    loaded is what was checked, whatever happens to the name meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path}: is a symbolic link; compiled code is only loaded from your own files") from None
        raise ConfigError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    f = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if os.name == "posix":
            _check_private(path, info)
    except BaseException:
        f.close()
        raise
    return f


def code_folder(folder: Union[str, os.PathLike]) -> Path:
    """The package folder, created (only its owner may enter it) if missing, and checked
    with :func:`check_code_folder`."""
    path = Path(folder).expanduser().resolve()
    try:
        for missing in reversed([path, *path.parents]):
            if not missing.exists():
                missing.mkdir(mode=0o700)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise ConfigError(f"compiled-pipeline folder {path}: cannot use it as a folder "
                          f"({exc.strerror or exc})") from None
    return check_code_folder(path)


@contextmanager
def private_caches(folder: Path) -> Iterator[None]:
    """torch's compile caches (inductor's and Triton's) in ``folder/.cache`` for the block,
    not in inductor's default ``/tmp/torchinductor_<user>``, which another local user could
    have made first and filled: a build takes compiled pieces from them. The environment
    is put back after."""
    cache = folder / ".cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    check_code_folder(cache)
    names = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache / "triton"}
    saved = {name: os.environ.get(name) for name in names}
    try:
        os.environ.update({name: str(value) for name, value in names.items()})
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """SHA-256 (hex) of the names, dtypes, shapes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_digest(root: Union[None, str, os.PathLike] = None) -> str:
    """SHA-256 of this package's version and Python sources (those under ``root``, default:
    this package's folder): the code a package traced, so that a changed model, sampler or
    Dehazer builds new packages instead of running old ones."""
    root = Path(root or Path(__file__).resolve().parent)
    h = hashlib.sha256(f"dsrdmpd {__version__}\n".encode())
    for source in sorted(root.rglob("*.py")):
        h.update(f"{source.relative_to(root).as_posix()}\n".encode())
        h.update(source.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def cpu_label() -> str:
    """The CPU compiled host code is built for (inductor compiles with -march=native): its
    architecture, model, the vector instruction set torch uses and a digest of its feature
    flags (Linux: /proc/cpuinfo), so that a package is not loaded on a CPU that lacks an
    instruction it uses (a crash, not an error)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].strip() for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return f"{platform.machine()}:{cpu_model()}:{torch.backends.cpu.get_cpu_capability()}:{digest}"


def device_label(device: torch.device) -> str:
    """What compiled code for ``device`` depends on: on CUDA the card's name and compute
    capability, and the CPU that runs the host code (:func:`cpu_label`)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm_{major}{minor}:{cpu_label()}"
    return f"{device.type}:{cpu_label()}"


def package_fields(tensors: Tuple[torch.Tensor, ...], digest: str, extra: Dict[str, Any],
                   program: str = "pipeline") -> Dict[str, Any]:
    """Everything a package's code depends on (its name is a digest of this); ``program``
    names what it computes."""
    return {"format": FORMAT, "program": program, "torch": torch.__version__, "code": code_digest(),
            "device": device_label(tensors[0].device), "inputs": [[list(t.shape), str(t.dtype)] for t in tensors],
            "weights": digest, "options": extra}


def package_name(fields: Dict[str, Any]) -> str:
    """'<program>-<batch>x<height>x<width>-<digest of fields>.pt2' (readable program and
    shape of the first input, exact key)."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    shape = "x".join(str(n) for n in fields["inputs"][0][0][:1] + fields["inputs"][0][0][2:])
    return f"{fields['program']}-{shape}-{key}{SUFFIX}"


class AOTBuildError(RuntimeError):
    """Export or compilation of a package failed (nothing is left under the package's name)."""


class _Traced(nn.Module):
    """``fn`` with the modules it reads registered, so that export lifts their weights."""

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]], modules: Tuple[nn.Module, ...]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.fn(*inputs))


def export_program(fn: Callable[..., Tuple[torch.Tensor, ...]], modules: Tuple[nn.Module, ...],
                   inputs: Tuple[torch.Tensor, ...]) -> "torch.export.ExportedProgram":
    """``fn`` traced by ``torch.export`` at the shapes of ``inputs`` (outside inference mode,
    on plain copies of the inputs, gradients off)."""
    with torch.inference_mode(False), torch.no_grad():
        inputs = tuple(t.clone() for t in inputs)
        return torch.export.export(_Traced(fn, modules), inputs, strict=False)


def compile_package(program: "torch.export.ExportedProgram", path: Path) -> None:
    """AOTInductor: ``program`` compiled into the package file ``path`` (a name ending in .pt2)."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def load_package(package: BinaryIO, device: torch.device) -> Callable[..., Any]:
    """The compiled program in the open package file ``package``, on ``device`` (its CUDA index)."""
    kwargs = {}
    if device.type == "cuda" and "device_index" in inspect.signature(torch._inductor.aoti_load_package).parameters:
        kwargs["device_index"] = device.index if device.index is not None else torch.cuda.current_device()
    return torch._inductor.aoti_load_package(package, **kwargs)


@contextmanager
def build_lock(folder: Path, name: str, notify: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on ``folder/.<name>.lock``: waits (saying so) for another process's
    build of the same package. The lock file stays: deleting it would let two builders in."""
    import fcntl                     # POSIX; imported here so that the module loads anywhere
    lock = folder / f".{name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notify(f"waiting for another process's build of {folder / name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        raise ConfigError(f"{lock}: cannot lock it ({exc.strerror or exc}); put the compiled pipelines on a "
                          f"local disk") from None
    try:
        yield
    finally:
        os.close(fd)


class AOTRunner:
    """Build-once, load-anywhere wrapper around ``fn(*tensors)`` (see the module docstring).

    ``builds`` / ``loads`` count packages built and loaded by this runner, ``calls`` the
    calls through them; ``timings[name]``
    holds the seconds each took (export_s, compile_s, load_s). ``notify(line)`` is told
    before a build starts (builds take minutes). ``program`` (a file-name word) and ``what``
    (words for messages) name what ``fn`` computes."""

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]],
                 modules: Union[Iterable[nn.Module], Callable[[], Iterable[nn.Module]]],
                 folder: Union[str, os.PathLike], max_loaded: int = 4,
                 notify: Callable[[str], None] = lambda line: None, program: str = "pipeline",
                 what: str = "pipeline"):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.program, self.what = program, what
        self.fn, self._modules = fn, module_source(modules)
        self.folder, self.max_loaded, self.notify = code_folder(folder), max_loaded, notify
        self.programs: "OrderedDict[str, Callable[..., Any]]" = OrderedDict()
        self.builds = self.loads = self.calls = 0
        self.timings: Dict[str, Dict[str, float]] = {}
        self._weights, self._digest = None, ""
        self._named: Dict[Tuple, Tuple[Path, Dict[str, Any]]] = {}    # (inputs, options) -> package, fields

    @property
    def modules(self) -> Tuple[nn.Module, ...]:
        """The modules ``fn`` reads (asked afresh: they may have been swapped)."""
        return self._modules()

    def package_for(self, tensors: Tuple[torch.Tensor, ...], extra: Dict[str, Any]) -> Tuple[Path, Dict[str, Any]]:
        """The package file for these inputs and options under the current weights, and its
        fields (worked out once per input shapes and options while the weights stay: a
        sampler calls its step program with the same ones at every step)."""
        weights = weights_key(self.modules)
        if weights != self._weights:
            self.programs.clear()
            self._named.clear()
            self._digest, self._weights = weights_digest(self.modules), weights
        sig = (tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors), json.dumps(extra, sort_keys=True))
        named = self._named.get(sig)
        if named is None:
            fields = package_fields(tensors, self._digest, extra, self.program)
            named = self._named[sig] = (self.folder / package_name(fields), fields)
        return named

    def __call__(self, *tensors: torch.Tensor, extra: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        tensors = tuple(t.contiguous() for t in tensors)
        path, fields = self.package_for(tensors, extra)
        program = self.programs.get(path.name)
        if program is None:
            program = self._obtain(path, fields, tensors)
            while len(self.programs) >= self.max_loaded:
                self.programs.popitem(last=False)
            self.programs[path.name] = program
        else:
            self.programs.move_to_end(path.name)
        self.calls += 1
        return tuple(program(*tensors))

    def _obtain(self, path: Path, fields: Dict[str, Any], tensors: Tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        times = self.timings.setdefault(path.name, {})
        check_code_folder(self.folder)                 # again: it may have changed since the runner was made
        with build_lock(self.folder, path.name, self.notify):
            remove_stale_temporaries(path)             # a killed build's (no other builder runs: we hold the lock)
            if not os.path.lexists(path):
                shape = tuple(tensors[0].shape)
                self.notify(f"building the compiled {self.what} for batch {shape[0]}, {shape[2]} x {shape[3]} "
                            f"into {path} (once per size and options; minutes)")
                t0 = time.perf_counter()
                try:
                    program = export_program(self.fn, self.modules, tensors)
                    t1 = time.perf_counter()
                    with private_caches(self.folder), atomic_path(path, mode=0o644) as tmp:
                        compile_package(program, tmp)
                except Exception as exc:
                    raise AOTBuildError(f"{path}: building the compiled {self.what} failed ({first_line(exc)}); "
                                        f"run without --aot / aot") from exc
                times.update(export_s=t1 - t0, compile_s=time.perf_counter() - t1)
                # what the package is for, in words (never read back: the name is the key)
                write_text_atomic(path.with_suffix(".json"), json.dumps({**fields, **times}, indent=1) + "\n")
                self.builds += 1
        t0 = time.perf_counter()
        with open_package(path) as package:
            try:
                program = load_package(package, tensors[0].device)
            except Exception as exc:        # a damaged or truncated file
                raise ConfigError(f"{path}: cannot load this compiled {self.what} ({first_line(exc)}); "
                                  f"delete it, and the next run builds it again") from None
        times["load_s"] = time.perf_counter() - t0
        self.loads += 1
        return program
