"""Where a call's time goes, from ``torch.profiler``: kernel launches and the kernels with
the most GPU time (:func:`count_launches`, :func:`top_kernels`), and the time of each kind
of module (:func:`module_breakdown`). Used by the benchmark; nothing here changes results."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

LABEL = "module:"          # the prefix of the profiler ranges :func:`module_breakdown` opens
UNATTRIBUTED = "(GPU time in no range)"


def count_launches(fn: Callable[[], object], kernel_us: Optional[Dict[str, float]] = None):
    """(host-side kernel and graph launch calls, GPU kernels seen) in one call of ``fn``
    (CUDA); with a dict ``kernel_us``, each kernel name's GPU time (us) is added into it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = kernels = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            # CUPTI's copy and fill records ("Memcpy DtoD ...", "Memset ...") are not kernels
            kernels += not e.name.startswith(("Memcpy", "Memset"))
            if kernel_us is not None:
                kernel_us[e.name] = kernel_us.get(e.name, 0.0) + e.time_range.elapsed_us()
        elif "LaunchKernel" in e.name or "GraphLaunch" in e.name:
            launches += 1
    return launches, kernels


def top_kernels(kernel_us: Dict[str, float], batch: int, n: int = 8, width: int = 70) -> str:
    """The ``n`` kernels with the most GPU time as one line, ``"name us/image share; ..."``
    (us per image; share of all GPU time), names cut to ``width`` characters."""
    total = sum(kernel_us.values()) or 1.0
    top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(f"{name[:width]} {us / batch:.0f} {100 * us / total:.0f}%" for name, us in top)


def module_breakdown(fn: Callable[[], object], roots: Iterable[nn.Module], cuda: bool) -> List[dict]:
    """Each module class's share of one call of ``fn``: a profiler range is opened around
    every forward of every module under ``roots``, and each range's own time (its time less
    that of the module ranges directly inside it) is summed per class. On CUDA the time is
    GPU time (the kernels launched inside the range), on the CPU the range's wall time.
    Work outside any module (the sampler's updates, ``torch.cat`` of inputs) is the row
    ``(outside modules)``; on CUDA, GPU time the profiler links to no range (kernels launched
    without an op around them) the row ``(GPU time in no range)``. Returns rows ``{"module", "calls", "self_us", "total_us"}``,
    most time first; their ``self_us`` add up to the call's total. Runs the modules'
    forwards eagerly: a CUDA graph replay has no modules to see."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    open_ranges: List[record_function] = []

    def enter(module, _inputs):
        r = record_function(LABEL + type(module).__name__)
        r.__enter__()
        open_ranges.append(r)

    def leave(module, _inputs, _output):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for root in roots:
        for m in root.modules():
            # always_call: the range is closed when the forward raises too (a caller may catch it)
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            with record_function(LABEL + "(outside modules)"):
                fn()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
        while open_ranges:                                  # a forward that raised
            open_ranges.pop().__exit__(None, None, None)

    def total(e) -> float:
        return e.device_time_total if cuda else e.cpu_time_total

    def nearest_ranges(e):
        """The module ranges directly inside ``e`` (through any ops between)."""
        for ch in e.cpu_children:
            if ch.name.startswith(LABEL):
                yield ch
            else:
                yield from nearest_ranges(ch)

    calls: Dict[str, int] = defaultdict(int)
    own: Dict[str, float] = defaultdict(float)
    inclusive: Dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith(LABEL) and e.device_type == torch.autograd.DeviceType.CPU:
            name = e.name[len(LABEL):]
            t = total(e)
            calls[name] += 1
            inclusive[name] += t
            own[name] += t - sum(total(ch) for ch in nearest_ranges(e))
    rows = [dict(module=k, calls=calls[k], self_us=own[k], total_us=inclusive[k]) for k in calls]
    if cuda:
        # kernels the profiler links to no CPU op inside the ranges (a Triton kernel launched
        # from Python has no aten op around it) would drop out of every row: shown as their own
        kernels = sum(e.time_range.elapsed_us() for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
        missing = kernels - sum(r["self_us"] for r in rows)
        if missing > 0:
            rows.append(dict(module=UNATTRIBUTED, calls=0, self_us=missing, total_us=missing))
    return sorted(rows, key=lambda r: -r["self_us"])
