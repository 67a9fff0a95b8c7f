"""A persistent cache for ``torch.compile``, so that its cost is paid once per machine.

``use_compile_cache(folder)`` (or the environment variable ``DSRDMPD_COMPILE_CACHE``)
points inductor's on-disk caches at ``folder`` before the first compile: the FX-graph
cache (compiled kernels and wrappers), AOTAutograd's cache and Triton's kernel cache
(``folder/triton``). A later process with the same folder, torch version and shapes loads
the compiled code instead of compiling it again. It must run before the first
``torch.compile`` call of the process: inductor keeps the folder it started with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .config import ConfigError

ENV = "DSRDMPD_COMPILE_CACHE"


def use_compile_cache(folder: Union[None, str, Path] = None) -> Optional[Path]:
    """Use ``folder`` (default: ``$DSRDMPD_COMPILE_CACHE``; neither: inductor's default
    temporary folder, returns None) for torch.compile's caches; returns the folder.
    A folder that cannot be created or written is a ConfigError naming it."""
    folder = folder or os.environ.get(ENV)
    if not folder:
        return None
    path = Path(folder).expanduser().resolve()
    try:
        (path / "triton").mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise ConfigError(f"compile cache {path}: cannot use it as a folder ({exc.strerror or exc})") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path
