"""The Dehazer's eta = 0 pipeline as ahead-of-time compiled programs (``Dehazer(aot=DIR)``).

Three programs, each an :class:`dsrdmpd.aot.AOTRunner` package in DIR, built once per input
shape and options and loaded by every later process:

* ``stage1``: hazy (B, 3, H, W) in [0, 1] -> coarse (B, 3, H, W), float32;
* ``terms``: the network input (B, 9, H, W) of the first step -> the perceptual decoder's
  fusion terms, one per decoder level (what the fast sampler computes once and caches);
  absent without the perceptual decoder or with ``fast`` off;
* ``step``: one network evaluation, (network input, t (B,) int64, the fusion terms) -> the
  residual prediction before clamping; all sampling steps run this one program.

The sampler's loop and its updates between the steps run in Python, exactly as in the eager
path (:meth:`ResidualDiffusion.sample` with ``network=``). One program per part rather than
one with the five steps unrolled: the network is compiled once instead of five times
(AOTInductor compiles every op of the graph it gets), so a build takes well under half
as long, and a Dehazer with another step count reuses the packages. Each program is traced
as the eager path runs it (the Dehazer's precision and channels-last, PyTorch's GroupNorm:
:func:`dsrdmpd.models.norm.native_norm`), so results equal the eager path to the compiler's
float rounding.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .aot import AOTRunner
from .models.norm import native_norm


class AOTPipeline:
    """``pipeline(x, noise, extra) -> (coarse, restored)`` through the compiled programs of
    ``dehazer``'s stages (asked for afresh on every call: a swapped stage is seen)."""

    def __init__(self, dehazer: Any, folder, max_loaded: int = 4, notify: Callable[[str], None] = lambda line: None):
        self.dehazer = dehazer
        make = lambda fn, modules, program, what: AOTRunner(fn, modules, folder, max_loaded, notify,  # noqa: E731
                                                            program=program, what=what)
        self.runners: Dict[str, AOTRunner] = {
            "stage1": make(self._stage1, lambda: (dehazer.stage1,), "stage1", "stage 1"),
            "terms": make(self._terms, self._fusion_modules, "terms", "fusion terms of stage 2"),
            "step": make(self._step, self._step_modules, "step", "stage-2 network step"),
        }

    # what the runners report, over all three
    @property
    def builds(self) -> int:
        return sum(r.builds for r in self.runners.values())

    @property
    def loads(self) -> int:
        return sum(r.loads for r in self.runners.values())

    @property
    def timings(self) -> Dict[str, Dict[str, float]]:
        """package name -> seconds of export_s, compile_s, load_s (those it took)."""
        return {name: t for r in self.runners.values() for name, t in r.timings.items()}

    @property
    def modules(self) -> Tuple[torch.nn.Module, ...]:
        """Both stages as they are now."""
        return self.dehazer.stage1, self.dehazer.stage2

    def _fusion_modules(self):
        fusions = self.dehazer.stage2.net.residual_decoder.fusions
        return () if fusions is None else (fusions,)

    def _step_modules(self):
        """What a network step reads: with ``fast``, all but the noise decoder and the fusion
        layers (their terms come in as inputs)."""
        net = self.dehazer.stage2.net
        if not self.dehazer.fast:
            return (net,)
        parts = [m for name, m in net.named_children() if name not in ("noise_decoder", "residual_decoder")]
        return tuple(parts + [m for name, m in net.residual_decoder.named_children() if name != "fusions"])

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """The eager path's memory format for ``x`` (the runners pass contiguous tensors)."""
        return self.dehazer._layout(x)

    # the traced functions (each as the eager path computes it)
    def _stage1(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        d = self.dehazer
        with native_norm(d.stage1), d._autocast(1):
            return (d.stage1(self._layout(x)).float(),)

    def _terms(self, x_in: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        d = self.dehazer
        with native_norm(d.stage2), d._autocast(2):
            cache = d.stage2.net.fusion_cache(self._layout(x_in))
        return tuple(cache[i] for i in sorted(cache))

    def _step(self, x_in: torch.Tensor, t: torch.Tensor, *terms: torch.Tensor) -> Tuple[torch.Tensor]:
        d = self.dehazer
        cache = dict(enumerate(terms)) if d.fast else None
        with native_norm(d.stage2), d._autocast(2):
            out, _ = d.stage2.net(self._layout(x_in), t, need_noise_decoder=not d.fast, fusion_cache=cache)
        return (out,)

    def __call__(self, x: torch.Tensor, noise: torch.Tensor, extra: Dict[str, Any]):
        """Both stages and the eta = 0 sampler on padded (B, 3, H, W) images; float32 out.
        ``extra``: the Dehazer's options (precision, channels_last, fast); each program's key
        takes those it depends on (the step count is none of them: the timestep is an input)."""
        d = self.dehazer
        layout = {k: extra[k] for k in ("precision", "channels_last")}
        (c,) = self.runners["stage1"](x, extra=layout)
        with_terms = extra["fast"] and bool(self._fusion_modules())

        def network(x_in: torch.Tensor, t: torch.Tensor, cache: Optional[dict]) -> torch.Tensor:
            if with_terms and not cache:                  # the first step: the terms, once per call
                # contiguous once here, not by the step runner at every step (channels-last)
                cache.update(enumerate(t.contiguous() for t in self.runners["terms"](x_in, extra=layout)))
            terms = [cache[i] for i in sorted(cache)] if with_terms else []
            return self.runners["step"](x_in, t, *terms, extra={**layout, "fast": extra["fast"]})[0]

        x = self._layout(x)
        with d._autocast(2):
            r = d.stage2.sample(self._layout(c), x, noise=noise, steps=d.steps, eta=0.0, fast=d.fast,
                                network=network)
        return c.contiguous(), r.float().contiguous()
