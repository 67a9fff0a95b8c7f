"""Ahead-of-time compiled pipelines (dsrdmpd.aot): keys, files, locks, trust, and the Dehazer's
use of them.

A real AOTInductor build of the pipeline takes minutes on this CPU, so the Dehazer tests
trace it for real with ``torch.export`` and replace only the compile with a stand-in: the
"package" file holds a token, and loading it gives the traced program's ``.module()``,
which runs the traced operations. One test builds and loads a real package of a small
function; tests/test_cuda_fast.py builds the whole pipeline for real on a GPU.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from dsrdmpd import aot
from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.config import ConfigError
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.norm import FastNorm, GroupNormAct, set_fast_norm

posix_only = pytest.mark.skipif(os.name != "posix", reason="file ownership and modes are POSIX")


class StandIn:
    """compile_package / load_package stand-ins: the package file holds a token naming the
    traced program, kept here; loading gives its ``.module()``."""

    def __init__(self, delay: float = 0.0):
        self.programs, self.compiles, self.delay = {}, 0, delay

    def compile(self, program, path):
        time.sleep(self.delay)
        token = uuid.uuid4().hex
        self.programs[token] = program
        Path(path).write_text(token)
        self.compiles += 1

    def load(self, package, device):
        return self.programs[package.read().decode()].module()


@pytest.fixture
def stand_in(monkeypatch):
    s = StandIn()
    monkeypatch.setattr(aot, "compile_package", s.compile)
    monkeypatch.setattr(aot, "load_package", s.load)
    return s


def toy():
    """A conv and a two-output function of (x, noise) that reads it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)

    def fn(x, noise):
        return conv(x) + noise, x.mean(1, keepdim=True)
    return conv, fn


def inputs(b=1, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)


def packages(folder: Path):
    return sorted(p.name for p in folder.glob(f"*{aot.SUFFIX}"))


def test_a_package_is_built_once_and_later_runners_load_it(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    r = aot.AOTRunner(fn, (conv,), tmp_path)
    out = r(x, n, extra={"precision": "fp32"})
    for got, want in zip(out, fn(x, n)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (r.builds, r.loads, stand_in.compiles) == (1, 1, 1)
    r(x, n, extra={"precision": "fp32"})                    # held in memory: neither built nor loaded again
    assert (r.builds, r.loads) == (1, 1)
    fresh = aot.AOTRunner(fn, (conv,), tmp_path)             # another process, in effect
    again = fresh(x, n, extra={"precision": "fp32"})
    assert (fresh.builds, fresh.loads, stand_in.compiles) == (0, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(again, out))
    [name] = packages(tmp_path)
    assert name.startswith("pipeline-1x16x16-")
    note = (tmp_path / name).with_suffix(".json").read_text()
    assert aot.weights_digest((conv,)) in note and '"export_s"' in note and '"precision": "fp32"' in note


def test_the_key_covers_options_shapes_and_weights(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    r = aot.AOTRunner(fn, (conv,), tmp_path)
    r(x, n, extra={"steps": 5})
    r(x, n, extra={"steps": 4})
    assert r.builds == 2
    x2, n2 = inputs(2, 16, 32)
    r(x2, n2, extra={"steps": 5})
    assert r.builds == 3
    saved = conv.weight.clone()
    conv.weight.mul_(-2)                                     # new weights: a new package, which reads them
    out = r(x, n, extra={"steps": 5})
    assert r.builds == 4
    torch.testing.assert_close(out[0], fn(x, n)[0], rtol=0, atol=1e-6)
    conv.weight.copy_(saved)                                 # the old weights again: their package, from disk
    loads = r.loads
    out = r(x, n, extra={"steps": 5})
    assert r.builds == 4 and r.loads == loads + 1
    torch.testing.assert_close(out[0], fn(x, n)[0], rtol=0, atol=1e-6)
    assert len(packages(tmp_path)) == 4


def test_every_field_changes_the_name():
    x, n = inputs()
    base = aot.package_fields((x, n), "ab" * 32, {"precision": "fp32", "steps": 5})
    names = {aot.package_name(base)}
    changed = [dict(base, format=base["format"] + 1), dict(base, torch=base["torch"] + "x"),
               dict(base, code="ef" * 32),
               dict(base, device=base["device"] + "x"), dict(base, weights="cd" * 32),
               dict(base, inputs=[[[1, 3, 16, 16], "torch.float64"], base["inputs"][1]]),
               dict(base, options={"precision": "tf32", "steps": 5}),
               dict(base, options={"precision": "fp32", "steps": 4})]
    names |= {aot.package_name(f) for f in changed}
    assert len(names) == 1 + len(changed)
    assert aot.package_name(dict(base)) == aot.package_name(base)        # deterministic
    assert base["device"] == f"cpu:{aot.cpu_label()}" and base["torch"] == torch.__version__
    assert base["code"] == aot.code_digest()


def test_the_code_digest_follows_every_source_file(tmp_path):
    import shutil
    src = Path(aot.__file__).resolve().parent
    copy = tmp_path / "dsrdmpd"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert aot.code_digest(copy) == aot.code_digest(src)
    sampler = copy / "diffusion" / "residual_diffusion.py"
    sampler.write_text(sampler.read_text().replace("pred_res = out.clamp(-1, 1)", "pred_res = out.clamp(-2, 2)"))
    assert aot.code_digest.__wrapped__(copy) != aot.code_digest(src)       # past the per-process cache


def test_weights_digest_sees_every_parameter_and_buffer():
    a, b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    assert aot.weights_digest((a,)) == aot.weights_digest((b,))
    b.running_mean[1] = 1e-7                                  # a buffer
    assert aot.weights_digest((a,)) != aot.weights_digest((b,))
    b = nn.BatchNorm2d(3)
    with torch.no_grad():
        b.weight[2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))    # one ulp in one parameter
    assert aot.weights_digest((a,)) != aot.weights_digest((b,))
    assert aot.weights_digest((a,)) != aot.weights_digest((nn.BatchNorm2d(3).double(),))
    assert aot.weights_digest((a, b)) != aot.weights_digest((b, a))


def test_swapped_modules_are_followed(tmp_path, stand_in):
    """A runner given its modules as a callable (the Dehazer's way) sees a module swapped for
    another: a new package, built from the module it now runs."""
    conv, fn = toy()
    other = nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    held = {"conv": conv}

    def through_held(x, noise):
        return held["conv"](x) + noise, x.mean(1, keepdim=True)
    r = aot.AOTRunner(through_held, lambda: (held["conv"],), tmp_path)
    x, n = inputs()
    r(x, n, extra={})
    held["conv"] = other
    out = r(x, n, extra={})
    assert r.builds == 2
    torch.testing.assert_close(out[0], through_held(x, n)[0], rtol=0, atol=1e-6)


def test_at_most_max_loaded_programs_are_held(tmp_path, stand_in):
    conv, fn = toy()
    r = aot.AOTRunner(fn, (conv,), tmp_path, max_loaded=2)
    sizes = (16, 32, 48)
    for s in sizes:
        r(*inputs(1, s, s), extra={})
    assert len(r.programs) == 2 and r.builds == 3
    r(*inputs(1, 32, 32), extra={})                          # held: 32 is now the most recently used
    r(*inputs(1, 16, 16), extra={})                          # dropped before: loaded again, not built
    assert r.builds == 3 and r.loads == 4
    assert [name.split("-")[1] for name in r.programs] == ["1x32x32", "1x16x16"]
    with pytest.raises(ValueError, match="max_loaded"):
        aot.AOTRunner(fn, (conv,), tmp_path, max_loaded=0)


def test_a_failed_build_leaves_nothing_and_says_so_in_one_line(tmp_path, stand_in, monkeypatch):
    conv, fn = toy()
    x, n = inputs()

    def broken(program, path):
        Path(path).write_text("half a package")
        raise RuntimeError("compiler crashed\n" + "graph line\n" * 1000)
    monkeypatch.setattr(aot, "compile_package", broken)
    r = aot.AOTRunner(fn, (conv,), tmp_path)
    with pytest.raises(aot.AOTBuildError) as info:
        r(x, n, extra={})
    message = str(info.value)
    assert "\n" not in message and "compiler crashed" in message and "graph line" not in message
    assert str(tmp_path) in message
    assert packages(tmp_path) == [] and not list(tmp_path.glob("*tmp*")) and not list(tmp_path.glob("*.json"))
    monkeypatch.setattr(aot, "compile_package", stand_in.compile)
    r(x, n, extra={})
    assert r.builds == 1 and len(packages(tmp_path)) == 1


def test_an_untraceable_function_is_a_one_line_error(tmp_path, stand_in):
    def data_dependent(x, noise):
        return (x * 2,) if x.sum() > 0 else (x,)
    with pytest.raises(aot.AOTBuildError, match="building the compiled pipeline failed") as info:
        aot.AOTRunner(data_dependent, (), tmp_path)(*inputs(), extra={})
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000
    assert packages(tmp_path) == []


def test_processes_that_want_the_same_package_build_it_once(tmp_path, monkeypatch):
    """Two builders of one package (threads with their own lock descriptors: ``flock``
    excludes them as it does processes); the slow stand-in compile makes them overlap."""
    slow = StandIn(delay=0.5)
    monkeypatch.setattr(aot, "compile_package", slow.compile)
    monkeypatch.setattr(aot, "load_package", slow.load)
    x, n = inputs()
    results, errors = [], []
    # each its own modules, as processes have (export swaps fake weights into the modules it traces),
    # made before the threads start (a module made during another thread's export is taken into it)
    made = [toy() for _ in range(2)]

    def run(conv, fn):
        try:
            results.append(aot.AOTRunner(fn, (conv,), tmp_path)(x, n, extra={}))
        except Exception as exc:            # noqa: BLE001 -- reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=m) for m in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and slow.compiles == 1 and len(results) == 2
    assert torch.equal(results[0][0], results[1][0])


def test_another_build_waits_for_the_lock_and_says_so(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    r = aot.AOTRunner(fn, (conv,), tmp_path, notify=lambda line: said.append(line))
    said, results = [], []
    path, _ = r.package_for((x, n), {})
    with aot.build_lock(tmp_path, path.name, notify=lambda line: None):
        waiter = threading.Thread(target=lambda: results.append(r(x, n, extra={})))
        waiter.start()
        for _ in range(500):                       # until the runner reports that it waits (at most 5 s)
            if any("waiting for another process's build" in line for line in said):
                break
            time.sleep(0.01)
        assert any(f"waiting for another process's build of {path}" in line for line in said)
        assert not results                        # still waiting
    waiter.join()
    assert r.builds == 1 and len(results) == 1


def test_a_build_compiles_with_caches_inside_the_folder(tmp_path, stand_in, monkeypatch):
    """Not in inductor's shared default under /tmp, which another user could have made first;
    the environment is as before afterwards."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    during = {}

    def compile_noting_caches(program, path):
        during.update({k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
        stand_in.compile(program, path)
    monkeypatch.setattr(aot, "compile_package", compile_noting_caches)
    conv, fn = toy()
    aot.AOTRunner(fn, (conv,), tmp_path)(*inputs(), extra={})
    assert during == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / ".cache"),
                      "TRITON_CACHE_DIR": str(tmp_path / ".cache" / "triton")}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else" and "TRITON_CACHE_DIR" not in os.environ
    assert (tmp_path / ".cache").stat().st_mode & 0o077 == 0


def test_a_killed_build_s_temporary_is_cleared_by_the_next_build(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    r = aot.AOTRunner(fn, (conv,), tmp_path)
    path, _ = r.package_for((x, n), {})
    stale = tmp_path / f".{path.stem}.abc123.tmp{path.suffix}"      # what atomic_path leaves when killed
    stale.write_text("half a package")
    r(x, n, extra={})
    assert not stale.exists() and packages(tmp_path) == [path.name]


def test_a_damaged_package_is_a_one_line_error_that_says_what_to_do(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    aot.AOTRunner(fn, (conv,), tmp_path)(x, n, extra={})
    [name] = packages(tmp_path)
    (tmp_path / name).write_text("not a package")
    with pytest.raises(ConfigError, match=f"{name}: cannot load this compiled pipeline .*delete it") as info:
        aot.AOTRunner(fn, (conv,), tmp_path)(x, n, extra={})
    assert "\n" not in str(info.value)


@posix_only
def test_the_folder_and_packages_are_private_whatever_the_umask(tmp_path, stand_in):
    """Under umask 002 (user-private groups, Ubuntu's default) a new folder would be
    group-writable, and the runner would refuse its own folder: it makes it 0700 and its
    packages 0644."""
    conv, fn = toy()
    old = os.umask(0o002)
    try:
        r = aot.AOTRunner(fn, (conv,), tmp_path / "new" / "aot")
        r(*inputs(), extra={})
        aot.AOTRunner(fn, (conv,), tmp_path / "new" / "aot")(*inputs(), extra={})
    finally:
        os.umask(old)
    [name] = packages(tmp_path / "new" / "aot")
    assert (tmp_path / "new" / "aot").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "aot" / name).stat().st_mode & 0o777 == 0o644


@posix_only
def test_a_symbolic_link_or_a_replaceable_folder_is_refused(tmp_path, stand_in):
    conv, fn = toy()
    x, n = inputs()
    real = tmp_path / "real"
    aot.AOTRunner(fn, (conv,), real)(x, n, extra={})
    [name] = packages(real)
    linked = tmp_path / "linked"
    linked.mkdir(mode=0o700)
    (linked / name).symlink_to(real / name)                  # the name a runner wants, pointing elsewhere
    with pytest.raises(ConfigError, match=f"{name}: is a symbolic link"):
        aot.AOTRunner(fn, (conv,), linked)(x, n, extra={})
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)                                    # anybody may rename what is inside
    with pytest.raises(ConfigError, match="others may write the folder above it"):
        aot.AOTRunner(fn, (conv,), open_dir / "mine")
    open_dir.chmod(0o1777)                                   # sticky, as /tmp: only owners rename
    aot.AOTRunner(fn, (conv,), open_dir / "mine")(x, n, extra={})


@posix_only
def test_compiled_code_is_only_loaded_from_files_only_this_user_can_write(tmp_path, stand_in, monkeypatch):
    conv, fn = toy()
    x, n = inputs()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="others may write it"):
        aot.AOTRunner(fn, (conv,), shared)
    mine = tmp_path / "mine"
    aot.AOTRunner(fn, (conv,), mine)(x, n, extra={})
    [name] = packages(mine)
    (mine / name).chmod(0o666)                               # somebody else could have replaced it
    with pytest.raises(ConfigError, match=f"{name}: others may write it"):
        aot.AOTRunner(fn, (conv,), mine)(x, n, extra={})
    (mine / name).chmod(0o644)
    aot.AOTRunner(fn, (conv,), mine)(x, n, extra={})
    monkeypatch.setattr(os, "getuid", lambda: os.stat(mine).st_uid + 1)
    with pytest.raises(ConfigError, match="belongs to another user"):
        aot.AOTRunner(fn, (conv,), mine)


def test_a_real_package_of_a_small_function_round_trips(tmp_path):
    """AOTInductor for real (about 10 s on the 2-core CPU): build into the atomic temporary,
    load from a fresh runner, outputs within float32 rounding of eager."""
    conv, fn = toy()
    x, n = inputs()
    with torch.no_grad():
        built = aot.AOTRunner(fn, (conv,), tmp_path)(x, n, extra={})
        fresh = aot.AOTRunner(fn, (conv,), tmp_path)
        loaded = fresh(x, n, extra={})
        want = fn(x, n)
    assert fresh.builds == 0 and fresh.loads == 1
    for a, b, c in zip(built, loaded, want):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------- the Dehazer

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return build_stage1({"dim": 32}), build_stage2({"dim": 8, "dim_mults": [1, 2]})


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """A Dehazer whose batch of 2 at 64 x 80 went through a (stand-in) package, the eager
    reference, and the stand-in (the pipeline traced once for the module)."""
    s = StandIn()
    mp = pytest.MonkeyPatch()
    mp.setattr(aot, "compile_package", s.compile)
    mp.setattr(aot, "load_package", s.load)
    folder = tmp_path_factory.mktemp("aot")
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    d = Dehazer(*models, aot=folder, fast_norm=True)
    out = d(x)
    fast_after = [m.fast for net in models for m in net.modules() if isinstance(m, FastNorm)]
    # (the reference Dehazer below switches the shared modules' fast norm off)
    yield dict(d=d, x=x, out=out, fast_after=fast_after, ref=Dehazer(*models)(x), folder=folder, stand_in=s)
    mp.undo()


def test_the_dehazer_through_a_package_equals_eager(built):
    """Three programs (stage 1, the fusion terms, one network step for all 5 steps), each
    built and loaded once; the result equals the eager path."""
    d, out, ref = built["d"], built["out"], built["ref"]
    assert (d.aot.builds, d.aot.loads) == (3, 3)
    calls = {name: r.calls for name, r in d.aot.runners.items()}
    assert calls == {"stage1": 1, "terms": 1, "step": 5}       # the terms once per call, the step once per step
    names = sorted(p.name.split("-")[0] for p in built["folder"].glob("*.pt2"))
    assert names == ["stage1", "step", "terms"]
    torch.testing.assert_close(out.coarse, ref.coarse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.restored, ref.restored, rtol=0, atol=1e-5)
    assert built["fast_after"] and all(built["fast_after"])       # traced native, switched back after


def test_a_later_dehazer_loads_the_package(built, models):
    d = Dehazer(*models, aot=built["folder"])
    out = d(built["x"])
    assert (d.aot.builds, d.aot.loads) == (0, 3)
    assert torch.equal(out.restored, built["out"].restored)


def test_a_smaller_batch_of_the_same_size_fills_the_package_batch(built):
    d, x = built["d"], built["x"]
    out = d(x[1:], seed=0)
    assert (d.aot.builds, d.aot.loads) == (3, 3)
    one = Dehazer(d.stage1, d.stage2)(x[1:])
    torch.testing.assert_close(out.restored, one.restored, rtol=0, atol=1e-5)
    assert out.restored.shape == (1, 3, 64, 80)


def test_another_step_count_reuses_the_packages(built, models):
    """The step program takes the timestep as an input: a Dehazer sampling in 3 steps loads
    the 5-step run's packages (no build) and equals the eager 3-step run."""
    d = Dehazer(*models, aot=built["folder"], steps=3)
    out = d(built["x"])
    assert (d.aot.builds, d.aot.loads) == (0, 3)
    ref = Dehazer(*models, steps=3)(built["x"])
    torch.testing.assert_close(out.restored, ref.restored, rtol=0, atol=1e-5)
    assert not torch.allclose(ref.restored, built["ref"].restored, atol=1e-3)      # 3 steps is another result


@pytest.mark.parametrize("variant", ["plain", "straightforward"])
def test_without_cached_fusion_terms_two_programs_equal_eager(variant, stand_in, tmp_path):
    """No fusion-terms program where the sampler caches none: stage 2 without the perceptual
    decoder, and ``fast`` off (the straightforward path: every step computes its terms and
    the noise decoder); both equal the eager path."""
    torch.manual_seed(0)
    s1 = build_stage1({"dim": 32})
    s2 = build_stage2({"dim": 8, "dim_mults": [1, 2], "perceptual_decoder": variant != "plain"})
    opts = {"fast": variant != "straightforward"}
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    d = Dehazer(s1, s2, aot=tmp_path, **opts)
    out = d(x)
    assert (d.aot.builds, d.aot.loads) == (2, 2)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.pt2")) == ["stage1", "step"]
    ref = Dehazer(s1, s2, **opts)(x)
    torch.testing.assert_close(out.restored, ref.restored, rtol=0, atol=1e-5)


def test_channels_last_through_packages_equals_eager_channels_last(stand_in, tmp_path):
    """The programs are traced in the Dehazer's layout (channels-last here) and the runners
    pass contiguous tensors: the result equals the eager channels-last run. (Models of its
    own: a channels-last Dehazer converts its modules' weights in place.)"""
    torch.manual_seed(0)
    models = build_stage1({"dim": 32}), build_stage2({"dim": 8, "dim_mults": [1, 2]})
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    d = Dehazer(*models, aot=tmp_path, channels_last=True)
    out = d(x)
    assert d.aot.builds == 3
    ref = Dehazer(*models, channels_last=True)(x)
    torch.testing.assert_close(out.restored, ref.restored, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.coarse, ref.coarse, rtol=0, atol=1e-5)


def test_the_dehazer_runner_follows_a_swapped_stage(built, models, tmp_path):
    """The runner asks the Dehazer for its stages (what a swap changes), not a tuple fixed
    when it was made: the package key and the trace follow ``dehazer.stage2 = other``."""
    d = Dehazer(*models, aot=tmp_path)
    other = build_stage2({"dim": 8, "dim_mults": [1, 2]})
    d.stage2 = other
    assert d.aot.modules == (models[0], other)
    step = d.aot.runners["step"].modules                 # what the step program's key and trace read
    assert step and all(any(m is n for n in other.net.modules()) for m in step)
    inside = {id(n) for m in step for n in m.modules()}
    assert id(other.net.residual_decoder.levels) in inside and id(other.net.encoder) in inside
    for unread in (other.net.noise_decoder, other.net.residual_decoder.fusions):  # fast: skipped / terms as inputs
        assert id(unread) not in inside
    assert d.aot.runners["terms"].modules == (other.net.residual_decoder.fusions,)
    assert d.aot.runners["stage1"].modules == (models[0],)


def test_a_failed_build_does_not_pin_its_size_to_its_batch(models):
    """The batch a size is filled up to is recorded once a call through it worked: after a
    batch of 2 failed to build, a batch of 1 gets a package of its own, not a fill-up to 2."""
    d = Dehazer(*models)
    seen = []

    def runner(x, noise, extra):
        seen.append(x.shape[0])
        if len(seen) == 1:
            raise aot.AOTBuildError("out of memory")
        return x, x
    d.aot = runner
    with pytest.raises(aot.AOTBuildError):
        d(torch.rand(2, 3, 64, 64))
    d(torch.rand(1, 3, 64, 64))
    assert seen == [2, 1]


def test_eta_runs_eager_and_other_options_are_refused(built, models, tmp_path):
    d = Dehazer(*models, aot=built["folder"], eta=0.5)
    out = d(built["x"])
    assert d.aot.loads == 0
    assert torch.equal(out.restored, Dehazer(*models, eta=0.5)(built["x"]).restored)
    with pytest.raises(ConfigError, match="without compile"):
        Dehazer(*models, aot=tmp_path, compile=True)
    with pytest.raises(ConfigError, match="without cuda_graphs"):
        Dehazer(*models, aot=tmp_path, cuda_graphs=True)


def test_native_norm_switches_the_fast_norm_off_for_the_trace_and_back():
    """What the Dehazer traces under: every GroupNormAct native inside the block, each one's
    own setting back after it (also after an error), one never switched keeps no setting of its own."""
    from dsrdmpd.models.norm import native_norm
    on, untouched = nn.Sequential(GroupNormAct(2, 4), GroupNormAct(2, 4)), GroupNormAct(2, 4)
    set_fast_norm(on, True)
    with pytest.raises(KeyError):
        with native_norm(on, untouched):
            assert not any(m.fast for m in [*on, untouched])
            raise KeyError("inside")
    assert all(m.fast for m in on) and not untouched.fast and "fast" not in vars(untouched)


def test_eager_runs_after_a_build_are_untouched(built, models):
    """Tracing reads the weight caches and the norm switches under fake tensors: an eager run
    of the same modules afterwards still gives the reference."""
    d = built["d"]
    set_fast_norm(d.stage2, False)
    assert torch.equal(Dehazer(*models)(built["x"]).restored, built["ref"].restored)


def test_the_command_line_option(tmp_path):
    from dsrdmpd.cli.errors import UsageError
    from dsrdmpd.cli.options import add_run_options, dehazer_options
    ap = argparse.ArgumentParser()
    add_run_options(ap)
    assert dehazer_options(ap.parse_args(["--aot", str(tmp_path)]))["aot"] == str(tmp_path)
    assert "aot" not in dehazer_options(ap.parse_args([]))
    for flag in ("--compile", "--cuda-graphs"):
        with pytest.raises(UsageError, match=f"without {flag}"):
            dehazer_options(ap.parse_args(["--aot", str(tmp_path), flag]))
