"""dsrdmpd.profiling: the top-kernels line and the time of each module class."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dsrdmpd import profiling


def test_top_kernels_line_ranks_by_gpu_time_per_image():
    line = profiling.top_kernels({"small": 10.0, "big_gemm_kernel": 60.0, "norm": 30.0}, batch=2, n=2, width=6)
    assert line == "big_ge 30 60%; norm 15 30%"
    assert profiling.top_kernels({}, batch=1) == ""


class _Sleep(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = _Sleep(0.05)

    def forward(self, x):
        time.sleep(0.02)
        return self.inner(self.conv(x))


def test_module_breakdown_gives_each_class_its_own_time():
    """Own time = the range's time less the module ranges inside it: the outer module's
    own 20 ms does not include its child's 50 ms; work between module calls (30 ms) is
    '(outside modules)'; calls are counted per forward; the own times add up to the whole.
    Sleeps are lower bounds (a slow machine only adds); the upper bounds (30 ms above what
    is slept, short of the 140 ms that counting the children would give) keep each time out
    of the others' rows."""
    outer = _Outer()
    x = torch.rand(1, 3, 8, 8)

    def call():
        y = outer(x)
        time.sleep(0.03)
        outer(y)

    rows = {r["module"]: r for r in profiling.module_breakdown(call, [outer], cuda=False)}
    assert set(rows) == {"_Outer", "_Sleep", "Conv2d", "(outside modules)"}
    assert (rows["_Outer"]["calls"], rows["_Sleep"]["calls"], rows["Conv2d"]["calls"]) == (2, 2, 2)
    assert rows["(outside modules)"]["calls"] == 1
    assert 0.1e6 <= rows["_Sleep"]["self_us"] == rows["_Sleep"]["total_us"]
    assert 0.04e6 <= rows["_Outer"]["self_us"] < 0.13e6                      # 2 x 20 ms, not the child's 2 x 50
    assert rows["_Outer"]["total_us"] >= rows["_Outer"]["self_us"] + rows["_Sleep"]["self_us"]
    assert 0.03e6 <= rows["(outside modules)"]["self_us"] < 0.13e6          # 30 ms, not the modules' 170
    whole = rows["(outside modules)"]["total_us"]
    assert sum(r["self_us"] for r in rows.values()) == pytest.approx(whole, rel=1e-6)


def test_module_breakdown_removes_its_hooks_even_when_the_call_fails():
    outer = _Outer()

    def bad():
        outer(torch.rand(1, 5, 8, 8))              # wrong channel count: the conv raises

    with pytest.raises(RuntimeError):
        profiling.module_breakdown(bad, [outer], cuda=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in outer.modules())


class _Raises(nn.Module):
    def forward(self, x):
        raise ValueError("no")


class _Catches(nn.Module):
    """Calls a child that raises, catches it, then a child that sleeps 50 ms."""

    def __init__(self):
        super().__init__()
        self.bad, self.slow = _Raises(), _Sleep(0.05)

    def forward(self, x):
        try:
            self.bad(x)
        except ValueError:
            pass
        return self.slow(x)


def test_a_forward_that_raises_inside_a_caught_call_closes_its_range():
    """A child's forward that raises (its caller catches it) still closes its own range: the
    sleeping sibling's 50 ms stay the sibling's, the caller's own time stays small."""
    m = _Catches()
    rows = {r["module"]: r for r in profiling.module_breakdown(lambda: m(torch.rand(2)), [m], cuda=False)}
    assert rows["_Raises"]["calls"] == 1 and rows["_Sleep"]["calls"] == 1
    assert rows["_Sleep"]["self_us"] >= 0.05e6
    assert rows["_Catches"]["self_us"] < 0.03e6
    whole = rows["(outside modules)"]["total_us"]
    assert sum(r["self_us"] for r in rows.values()) == pytest.approx(whole, rel=1e-6)
