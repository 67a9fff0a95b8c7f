"""Ahead-of-time compiled pipelines (AOTInductor): compiled code without a compile per process.

``AOTRunner(fn, modules, folder)`` runs ``fn(x, noise) -> tuple of tensors`` (the Dehazer's
eta = 0 pipeline: stage 1 and the whole sampler) through a package built once per input
shape and options: ``torch.export`` traces ``fn`` at that shape, AOTInductor compiles the
trace, weights included, into one ``.pt2`` file in ``folder``, and every later call, in
this process or in any later one, loads that file (seconds) instead of compiling again
(``torch.compile`` repeats its tracing in every new process, cache or not).

A package's name carries a digest of everything its code depends on (:func:`package_fields`):
the weights (SHA-256 of every parameter and buffer), the input shapes and dtypes, the
caller's options (the Dehazer's precision, channels-last, steps, fast), the device (CUDA:
the card's name and compute capability; CPU: the vector instruction set torch uses) and the
torch version. A package is therefore loaded only where and for what it was built; anything
else builds its own. Packages are written atomically (a killed build leaves no package),
and processes that want the same missing package build it once: the first takes the lock
``.<name>.lock`` in the folder, the others wait for it and then load what it built. Beside each package, ``<name>.json`` says in words what it was
built for and how long the build took (for people; never read back).

A package is compiled native code, and loading it runs that code. The folder is held to the
rules of a folder of programs: it and each package must belong to the user running this
and be writable by nobody else (checked before every load: a ConfigError names the file
otherwise), and only files named by a key are loaded. Give it a folder of your own; never
one somebody else filled.

Loaded packages stay in memory, each with its own copy of the weights: at most
``max_loaded``, least recently used dropped. The weights' versions and addresses
(:func:`dsrdmpd.cuda_graphs.weights_key`, cheap) are checked on every call; when they
change, the digest is recomputed and the packages of the new weights are found or built.
Inputs are made contiguous before a call (a package is traced with contiguous inputs).
"""
from __future__ import annotations

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
from typing import Any, Callable, Dict, Iterable, Iterator, Tuple, Union

import torch
from torch import nn

from .atomicfile import atomic_path, write_text_atomic
from .config import ConfigError
from .cuda_graphs import weights_key

FORMAT = 1               # bump when what a package holds or how it is traced changes
SUFFIX = ".pt2"


def check_code_path(path: Union[str, os.PathLike]) -> Path:
    """``path`` (a folder of compiled code, or a package in it) as a Path, if it belongs to
    this user and nobody else may write it; ConfigError naming it otherwise. POSIX only
    (elsewhere nothing is checked)."""
    path = Path(path)
    if os.name != "posix":
        return path
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path}: belongs to another user (uid {info.st_uid}); compiled code is only loaded "
                          f"from your own files")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: others may write it (mode {stat.filemode(info.st_mode)}); compiled code is only "
                          f"loaded from files that only you can write (chmod go-w)")
    return path


def code_folder(folder: Union[str, os.PathLike]) -> Path:
    """The package folder, created if missing and checked with :func:`check_code_path`."""
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise ConfigError(f"compiled-pipeline folder {path}: cannot use it as a folder "
                          f"({exc.strerror or exc})") from None
    return check_code_path(path)


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """SHA-256 (hex) of the names, dtypes, shapes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def device_label(device: torch.device) -> str:
    """What compiled code for ``device`` depends on: the card's name and compute capability,
    or the CPU's architecture and the vector instruction set torch uses on it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm_{major}{minor}"
    return f"{device.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


def package_fields(tensors: Tuple[torch.Tensor, ...], digest: str, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Everything a package's code depends on (its name is a digest of this)."""
    return {"format": FORMAT, "torch": torch.__version__, "device": device_label(tensors[0].device),
            "inputs": [[list(t.shape), str(t.dtype)] for t in tensors], "weights": digest, "options": extra}


def package_name(fields: Dict[str, Any]) -> str:
    """'pipeline-<batch>x<height>x<width>-<digest of fields>.pt2' (readable shape, exact key)."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    shape = "x".join(str(n) for n in fields["inputs"][0][0][:1] + fields["inputs"][0][0][2:])
    return f"pipeline-{shape}-{key}{SUFFIX}"


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


def load_package(path: Path, device: torch.device) -> Callable[..., Any]:
    """The compiled program in package ``path``, on ``device`` (its CUDA index)."""
    kwargs = {}
    if device.type == "cuda" and "device_index" in inspect.signature(torch._inductor.aoti_load_package).parameters:
        kwargs["device_index"] = device.index if device.index is not None else torch.cuda.current_device()
    return torch._inductor.aoti_load_package(str(path), **kwargs)


@contextmanager
def build_lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive lock on ``folder/.<name>.lock`` (waits for another process's build of the
    same package; the lock file stays, deleting it would let two builders in)."""
    import fcntl                     # POSIX; imported here so that the module loads anywhere
    fd = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class AOTRunner:
    """Build-once, load-anywhere wrapper around ``fn(x, noise)`` (see the module docstring).

    ``builds`` / ``loads`` count packages built and loaded by this runner; ``timings[name]``
    holds the seconds each took (export_s, compile_s, load_s). ``notify(line)`` is told
    before a build starts (builds take minutes)."""

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]], modules: Iterable[nn.Module],
                 folder: Union[str, os.PathLike], max_loaded: int = 4,
                 notify: Callable[[str], None] = lambda line: None):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.fn, self.modules = fn, tuple(modules)
        self.folder, self.max_loaded, self.notify = code_folder(folder), max_loaded, notify
        self.programs: "OrderedDict[str, Callable[..., Any]]" = OrderedDict()
        self.builds = self.loads = 0
        self.timings: Dict[str, Dict[str, float]] = {}
        self._weights, self._digest = None, ""

    def package_for(self, tensors: Tuple[torch.Tensor, ...], extra: Dict[str, Any]) -> Tuple[Path, Dict[str, Any]]:
        """The package file for these inputs and options under the current weights, and its fields."""
        weights = weights_key(self.modules)
        if weights != self._weights:
            self.programs.clear()
            self._digest, self._weights = weights_digest(self.modules), weights
        fields = package_fields(tensors, self._digest, extra)
        return self.folder / package_name(fields), fields

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
        return tuple(program(*tensors))

    def _obtain(self, path: Path, fields: Dict[str, Any], tensors: Tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        times = self.timings.setdefault(path.name, {})
        with build_lock(self.folder, path.name):
            if not path.exists():
                shape = tuple(tensors[0].shape)
                self.notify(f"building the compiled pipeline for batch {shape[0]}, {shape[2]} x {shape[3]} "
                            f"into {path} (once per size and options; minutes)")
                t0 = time.perf_counter()
                try:
                    program = export_program(self.fn, self.modules, tensors)
                    t1 = time.perf_counter()
                    with atomic_path(path) as tmp:
                        compile_package(program, tmp)
                except Exception as exc:     # torch's messages run to pages (the whole traced graph)
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise AOTBuildError(f"{path}: building the compiled pipeline failed ({type(exc).__name__}: "
                                        f"{first}); run without --aot / aot") from exc
                times.update(export_s=t1 - t0, compile_s=time.perf_counter() - t1)
                # what the package is for, in words (never read back: the name is the key)
                write_text_atomic(path.with_suffix(".json"), json.dumps({**fields, **times}, indent=1) + "\n")
                self.builds += 1
        t0 = time.perf_counter()
        program = load_package(check_code_path(path), tensors[0].device)
        times["load_s"] = time.perf_counter() - t0
        self.loads += 1
        return program
