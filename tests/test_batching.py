"""--batch N in dehaze / test: same-size images share a pipeline call, and nothing an image
gets depends on N: its start noise, its files and its scores (up to float32 rounding, with
the bounds of tests/parity_bounds.py), and a bad image in a call fails alone. Tiny random
models (or pass-through ones where only the machinery is under test), tiny images, in-process."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from dsrdmpd import evaluation
from dsrdmpd.builders import build_stage1, build_stage2, save_stage
from dsrdmpd.cli import dehaze, evaluate
from dsrdmpd.evaluation import plan_batches
from dsrdmpd.imageio import read_image, to_uint, write_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.metrics import psnr_ssim

from parity_bounds import assert_levels, assert_parity
from parity_cases import exact_chain

SEED = 5
CFG = {"stage1": {"dim": 32}, "stage2": {"dim": 8, "sampling_timesteps": 1, "perceptual_decoder": False}}
A, B, C = (64, 64), (48, 80), (50, 70)           # C is padded to 64 x 80 and cropped back
SIZES = [A, B, A, C, A]                           # img0 .. img4, in the order the folder lists them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    save_stage(build_stage1(CFG["stage1"]), root / "s1.pt", 1, CFG)
    save_stage(build_stage2(CFG["stage2"]), root / "s2.pt", 2, CFG)
    (root / "cfg.yaml").write_text(json.dumps(CFG))
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Hazy / GT pairs of three sizes, interleaved by name."""
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate(SIZES):
        write_image(torch.rand(3, h, w, generator=g), root / "hazy" / f"img{i}.png")
        write_image(torch.rand(3, h, w, generator=g), root / "gt" / f"img{i}.png")
    return root


@pytest.fixture()
def calls(monkeypatch):
    """Every pipeline call (Dehazer.__call__): (its input, its result)."""
    seen = []
    real = Dehazer.__call__

    def call(self, hazy, *args, **kwargs):
        result = real(self, hazy, *args, **kwargs)
        seen.append((hazy.clone(), result))
        return result
    monkeypatch.setattr(Dehazer, "__call__", call)
    return seen


@pytest.fixture()
def fast(passthrough_networks):
    """Commands get pass-through networks (conftest; the machinery around them is under test)."""


def _args(models, *rest):
    return ["--stage1", str(models / "s1.pt"), "--stage2", str(models / "s2.pt"), "--config",
            str(models / "cfg.yaml"), "--seed", str(SEED), *map(str, rest)]


def _per_image(seen, images):
    """{name: (restored, coarse), each (1, 3, H, W)} from the recorded calls, matching inputs by content."""
    out = {}
    for hazy, result in seen:
        for i in range(hazy.shape[0]):
            name = next(n for n, t in images.items() if t.shape == hazy.shape[1:] and torch.equal(t, hazy[i]))
            out[name] = (result.restored[i:i + 1], result.coarse[i:i + 1])
    return out


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_plan_groups_same_sizes_up_to_n_in_item_order():
    keyed = [("a", 0), ("b", 1), ("a", 2), (None, 3), ("a", 4), ("b", 5), ("a", 6), ("c", 7)]
    assert plan_batches(keyed, 3) == [[0, 2, 4], [1, 5], [3], [6], [7]]
    assert plan_batches(keyed, 2) == [[0, 2], [1, 5], [3], [4, 6], [7]]
    assert plan_batches(keyed, 1) == [[i] for i in range(8)]


def test_batch_3_gives_the_results_of_batch_1(models, pairs, calls, tmp_path):
    """Through scripts/test.py: the calls grouping predicts (A x 3, B, C), and every
    image's files and scores equal those of a --batch 1 run: bit for bit where the image ran
    alone in both, else to float32 rounding (PyTorch's CPU convolution picks another kernel
    for small inputs at batch > 1: bounded against the float64 run of the same pipeline, and
    the 8-bit files then differ by at most one level, only next to a level boundary)."""
    images = {f"img{i}.png": read_image(pairs / "hazy" / f"img{i}.png").tensor for i in range(len(SIZES))}
    runs = {}
    for n in (1, 3):
        calls.clear()
        out = tmp_path / f"batch{n}"
        assert evaluate.main(_args(models, "--hazy-dir", pairs / "hazy", "--gt-dir", pairs / "gt", "--output", out,
                                   "--save-coarse", "--panels", "2", "--batch", n)) == 0
        runs[n] = out, [tuple(h.shape) for h, _ in calls], _per_image(calls, images)
    assert runs[1][1] == [(1, 3, *s) for s in SIZES]
    assert runs[3][1] == [(3, 3, *A), (1, 3, *B), (1, 3, *C)]
    alone_in_both = {"img1.png", "img3.png"}

    dehazer = Dehazer.from_checkpoints(str(models / "s1.pt"), str(models / "s2.pt"), CFG, seed=SEED)
    differing = 0
    for name, hazy in images.items():
        (r1, c1), (r3, c3) = runs[1][2][name], runs[3][2][name]
        if name in alone_in_both:
            assert torch.equal(r1, r3) and torch.equal(c1, c3), name
        else:
            exact = exact_chain(dehazer, hazy[None])
            assert_parity(f"{name} coarse", c1, exact.coarse, c3)
            assert_parity(f"{name} restored", r1, exact.restored, r3)
            differing += assert_levels(f"{name} restored", r1, exact.restored, r3)
        for n, r, c in ((1, r1, c1), (3, r3, c3)):     # each run wrote what its pipeline gave
            out = runs[n][0]
            assert (to_uint(r[0]) == to_uint(read_image(out / "restored" / name).tensor)).all(), (n, name)
            assert (to_uint(c[0]) == to_uint(read_image(out / "coarse" / name).tensor)).all(), (n, name)
    print(f"8-bit values that differ between --batch 1 and 3: {differing} of {3 * sum(h * w for h, w in SIZES)}")

    rows = {n: _csv(runs[n][0] / "metrics.csv") for n in (1, 3)}
    assert [(r["name"], r["height"], r["width"]) for r in rows[1]] == \
        [(r["name"], r["height"], r["width"]) for r in rows[3]] == \
        [(f"img{i}.png", str(h), str(w)) for i, (h, w) in enumerate(SIZES)]
    for n in (1, 3):                                    # each run scored what its pipeline gave
        for row in rows[n]:
            gt = read_image(pairs / "gt" / row["name"]).tensor[None]
            r, c = runs[n][2][row["name"]]
            assert row["psnr_stage2"] == f"{psnr_ssim(r, gt)['psnr'][0]:.6f}"
            assert row["ssim_stage1"] == f"{psnr_ssim(c, gt)['ssim'][0]:.6f}"
    for a, b in zip(rows[1], rows[3]):
        if a["name"] in alone_in_both:
            assert a == b
        for key in ("psnr_stage1", "psnr_stage2"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-3)
        for key in ("ssim_stage1", "ssim_stage2"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4)
    for n in (1, 3):
        assert sorted(p.name for p in (runs[n][0] / "panels").iterdir()) == ["img0.png", "img1.png"]


def test_a_run_resumes_with_another_batch_size(models, fast, pairs, calls, tmp_path):
    """--batch is not part of the fingerprint: a finished --batch 3 run resumed with --batch 1
    redoes nothing and keeps its files."""
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", pairs / "hazy", "--output", out, "--batch", 3)) == 0
    before = {p.name: p.read_bytes() for p in (out / "restored").iterdir()}
    calls.clear()
    assert dehaze.main(_args(models, "--input", pairs / "hazy", "--output", out, "--batch", 1, "--resume")) == 0
    assert calls == []
    assert {p.name: p.read_bytes() for p in (out / "restored").iterdir()} == before


def _folder(root, names, size=(64, 64)):
    g = torch.Generator().manual_seed(7)
    for name in names:
        write_image(torch.rand(3, *size, generator=g), root / name)
    return root


def test_a_non_finite_image_in_a_call_fails_alone(models, fast, calls, tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path / "in", ["a.png", "b.png", "c.png"])
    bad = read_image(src / "b.png").tensor
    real_run = Dehazer._run

    def run(self, x, noise):                   # b's output is NaN, whatever its batch-mates
        c, r = real_run(self, x, noise)
        poisoned = torch.tensor([torch.equal(t[:, :bad.shape[1], :bad.shape[2]], bad) for t in x])
        return c, torch.where(poisoned[:, None, None, None], float("nan"), r)
    monkeypatch.setattr(Dehazer, "_run", run)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", src, "--output", out, "--batch", 3)) == 1
    assert [h.shape[0] for h, _ in calls] == [3, 1, 1, 1]       # the call, then each image alone
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["a.png", "c.png"]
    for name in ("a.png", "c.png"):
        assert torch.equal(read_image(out / "restored" / name).tensor, read_image(src / name).tensor)
    assert "stage-2 output has 12288 NaN or infinite value(s)" in (out / "summary.md").read_text()
    assert "1 of 3 item(s) failed (b.png)" in capsys.readouterr().err


def test_a_call_that_runs_out_of_memory_is_redone_image_by_image(models, fast, calls, tmp_path, monkeypatch):
    src = _folder(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    real_run = Dehazer._run

    def run(self, x, noise):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_run(self, x, noise)
    monkeypatch.setattr(Dehazer, "_run", run)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", src, "--output", out, "--batch", 3)) == 0
    assert [h.shape[0] for h, _ in calls] == [1, 1, 1, 1]       # the failed call of 3 raised: not recorded
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    assert "tiled" not in (out / "summary.md").read_text()


def test_an_unreadable_image_leaves_its_call_to_the_others(models, fast, calls, tmp_path, capsys):
    src = _folder(tmp_path / "in", ["a.png", "b.png", "c.png"])
    data = (src / "b.png").read_bytes()
    (src / "b.png").write_bytes(data[:len(data) // 2])          # header intact: planned with a and c
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", src, "--output", out, "--batch", 3)) == 1
    assert [h.shape[0] for h, _ in calls] == [2]
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["a.png", "c.png"]
    assert "| b.png |" in (out / "summary.md").read_text()


def test_tiled_images_run_alone(models, fast, calls, tmp_path, monkeypatch):
    src = _folder(tmp_path / "in", ["a.png", "b.png", "c.png"])
    _folder(src, ["big1.png", "big2.png"], size=(64, 96))
    monkeypatch.setattr(evaluation, "AUTO_TILE", 64)
    assert dehaze.main(_args(models, "--input", src, "--output", tmp_path / "auto", "--batch", 3,
                             "--max-untiled-pixels", 5000)) == 0
    assert sorted(h.shape[0] for h, _ in calls) == [1, 1, 3]     # big1, big2 alone (auto-tiled), a b c together
    calls.clear()
    assert dehaze.main(_args(models, "--input", src, "--output", tmp_path / "tiled", "--batch", 3,
                             "--tile", 64, "--overlap", 16)) == 0
    assert [h.shape[0] for h, _ in calls] == [1] * 5


def test_batch_must_be_positive(models, tmp_path, capsys):
    assert dehaze.main(_args(models, "--input", tmp_path, "--output", tmp_path / "out", "--batch", 0)) == 2
    assert "--batch: 0: must be at least 1" in capsys.readouterr().err
