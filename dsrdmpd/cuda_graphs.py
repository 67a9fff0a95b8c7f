"""CUDA graphs for a fixed-shape function of two tensors (the Dehazer: stage 1 + sampler).

``GraphRunner(fn)`` captures ``fn(x, noise) -> tuple of tensors`` once per key (the input
and noise shapes, dtype, memory format and device, plus the caller's ``extra`` key, e.g.
precision) and afterwards replays it: copy the inputs into the graph's static buffers,
replay, and clone the outputs out (so a result is never overwritten by the next replay).
Tiles of a scene and same-size images in a folder therefore reuse one graph.

Capture follows PyTorch's recipe: warm-up calls on a side stream (cuDNN and cuBLAS pick
their kernels, lazily built caches such as the standardised weights fill), then one
capture under ``torch.cuda.graph``. Every graph has its own private memory pool, which
holds all intermediate tensors of one call: memory is bounded by ``max_graphs`` times the
pool of the largest call (about one eager call's peak each); the least recently used
graph is dropped, with its pool, when a new key would exceed ``max_graphs``.

A graph reads parameters at the addresses they had at capture. ``weights_key`` (every
parameter's and buffer's version and address, and the standardised-weight caches) of the
modules (a callable of no arguments, asked before each replay, follows modules that are
swapped) is checked before each replay; when it changes (``load_state_dict``, an optimizer step,
``.to()``) all graphs are dropped and recaptured. The function must be free of
host-side randomness and synchronisation (the Dehazer uses graphs only with eta = 0).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Tuple, TypeVar, Union

import torch
from torch import nn

from .models.layout import memory_format_of

# What the capture forbids: "thread_local" restricts the capturing thread only. Under
# PyTorch's default, "global", CUDA refuses other threads' unsafe calls too (cudaHostAlloc
# among them, which a DataLoader's pin-memory thread makes while staging the next batch)
# and invalidates the capture. Inductor captures its graphs in "thread_local" too.
CAPTURE_MODE = "thread_local"
T = TypeVar("T")


@dataclass
class CapturedGraph:
    graph: "torch.cuda.CUDAGraph"
    inputs: Tuple[torch.Tensor, ...]        # static input buffers, copied into before replay
    outputs: Tuple[torch.Tensor, ...]       # static outputs, overwritten by every replay
    keepalive: Tuple[torch.Tensor, ...]     # tensors the graph reads that no module owns for sure


def require_cuda(tensors: Iterable[torch.Tensor]) -> None:
    """ValueError unless every tensor is on a CUDA device."""
    if not all(t.is_cuda for t in tensors):
        raise ValueError("CUDA graphs need CUDA tensors")


def warm_up(body: Callable[[], object], times: int) -> None:
    """``body()`` run ``times`` times on a side stream, as PyTorch's capture recipe asks
    (cuDNN and cuBLAS choose their kernels, lazy caches fill); the current stream then
    waits for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            body()
    torch.cuda.current_stream().wait_stream(side)


def record(body: Callable[[], T]) -> Tuple["torch.cuda.CUDAGraph", T]:
    """``body()``'s GPU work captured in a new CUDA graph (``CAPTURE_MODE``): the graph, and
    what ``body`` returned, tensors in the graph's memory pool that every replay rewrites.
    Nothing runs during the capture; the first replay computes the first result."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
        out = body()
    return graph, out


def weights_key(modules: Iterable[nn.Module]) -> Tuple:
    """(version, address) of every parameter and buffer of ``modules``: changes whenever a
    weight is replaced or written in place through the tensor itself."""
    return tuple((t._version, t.data_ptr()) for m in modules
                 for t in list(m.parameters()) + list(m.buffers()))


def module_source(modules: Union[Iterable[nn.Module], Callable[[], Iterable[nn.Module]]]
                  ) -> Callable[[], Tuple[nn.Module, ...]]:
    """``modules`` as a function of no arguments: a callable is asked at every use (so that a
    runner follows modules its owner swaps, e.g. ``dehazer.stage2 = other``); a collection
    is fixed once."""
    if callable(modules):
        return lambda: tuple(modules())
    fixed = tuple(modules)
    return lambda: fixed


def _cached_weights(modules: Iterable[nn.Module]) -> Tuple[torch.Tensor, ...]:
    return tuple(m.__dict__["_ws_cache"][1] for mod in modules for m in mod.modules()
                 if "_ws_cache" in m.__dict__)


class GraphRunner:
    """Capture-once, replay-many wrapper around ``fn(x, noise)`` on CUDA tensors."""

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]],
                 modules: Union[Iterable[nn.Module], Callable[[], Iterable[nn.Module]]] = (),
                 max_graphs: int = 4, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn, self._modules = fn, module_source(modules)
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: "OrderedDict[Hashable, CapturedGraph]" = OrderedDict()
        self.captures = 0                      # how many graphs were captured (tests, reports)
        self._weights = None

    @property
    def modules(self) -> Tuple[nn.Module, ...]:
        """The modules whose weights the graphs read (asked afresh: they may have been swapped)."""
        return self._modules()

    def key(self, *tensors: torch.Tensor, extra: Hashable = ()) -> Hashable:
        return tuple((tuple(t.shape), t.dtype, str(t.device), memory_format_of(t)) for t in tensors) + (extra,)

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self.graphs.clear()

    def __call__(self, *tensors: torch.Tensor, extra: Hashable = ()) -> Tuple[torch.Tensor, ...]:
        require_cuda(tensors)
        weights = weights_key(self.modules)
        if weights != self._weights:
            self.clear()
            self._weights = weights
        key = self.key(*tensors, extra=extra)
        entry = self.graphs.get(key)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            entry = self._capture(tensors)
            self.graphs[key] = entry
            self._weights = weights_key(self.modules)    # warm-up may fill lazy caches
        else:
            self.graphs.move_to_end(key)
        for buf, t in zip(entry.inputs, tensors):
            buf.copy_(t)
        entry.graph.replay()
        return tuple(o.clone(memory_format=torch.preserve_format) for o in entry.outputs)

    def _capture(self, tensors: Tuple[torch.Tensor, ...]) -> CapturedGraph:
        inputs = tuple(t.clone(memory_format=torch.preserve_format) for t in tensors)
        body = functools.partial(self.fn, *inputs)
        warm_up(body, self.warmup)
        graph, outputs = record(body)
        self.captures += 1
        return CapturedGraph(graph, inputs, tuple(outputs), _cached_weights(self.modules))
