"""Batch runs survive one bad item: per-item isolation, the pixel limit read from the header,
automatic tiling, run-wide errors (full disk), non-finite values, config errors up front,
output paths apart from the inputs, and escaped summary tables. Tiny random models, tiny
images, in-process runs."""
from __future__ import annotations

import errno
import json
import struct
import tracemalloc
import zlib

import pytest
import torch

from dsrdmpd import evaluation
from dsrdmpd.builders import build_stage1, build_stage2, save_stage
from dsrdmpd.cli import dehaze, evaluate
from dsrdmpd.imageio import ImageReadError, read_image, write_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2

from conftest import png_bytes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    cfg = {"stage1": {"dim": 32}, "stage2": {"dim": 8, "sampling_timesteps": 1, "perceptual_decoder": False}}
    save_stage(build_stage1(cfg["stage1"]), root / "s1.pt", 1, cfg)
    save_stage(build_stage2(cfg["stage2"]), root / "s2.pt", 2, cfg)
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


@pytest.fixture()
def fast(monkeypatch):
    """Commands get pass-through networks (the machinery around them is under test here)."""
    def load(*args, **kwargs):
        keep = {k: kwargs[k] for k in ("seed", "tile", "overlap", "tile_batch", "precision") if k in kwargs}
        return Dehazer(PassThroughStage1(), PassThroughStage2(), **keep)
    monkeypatch.setattr(Dehazer, "from_checkpoints", staticmethod(load))


def _args(models, *rest):
    return ["--stage1", str(models / "s1.pt"), "--stage2", str(models / "s2.pt"), *map(str, rest)]


def png_header_only(path, width, height, bit_depth=8):
    """A PNG whose header declares width x height RGB pixels, with a tiny (wrong) IDAT: what a
    decompression bomb looks like before decoding (a real 30000 x 30000 one is 2.7 MB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    path.write_bytes(png_bytes([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")]))
    return path


def _errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_pixel_limit_is_read_from_the_header_before_decoding(tmp_path):
    # a limit below a small real image: refused from the header (the decoder would succeed)
    write_image(torch.rand(3, 40, 50), tmp_path / "small.png")
    with pytest.raises(ImageReadError, match=r"50 x 40 pixels \(0.002 Mpx\) is above the pixel limit of 0.001 Mpx"):
        read_image(tmp_path / "small.png", max_pixels=1000)
    assert read_image(tmp_path / "small.png", max_pixels=2000).tensor.shape == (3, 40, 50)
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    deep = png_header_only(tmp_path / "deep.png", 20000, 20000, bit_depth=16)
    for path, size in ((bomb, "30000 x 30000"), (deep, "20000 x 20000")):
        tracemalloc.start()
        try:
            with pytest.raises(ImageReadError, match=rf"{path.name}: {size} pixels .*pixel limit of 100 Mpx "
                                                     r"\(--max-pixels\); not decoded"):
                read_image(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5e6, f"{peak} bytes allocated for a refused image"


def test_one_bad_item_never_ends_the_run(models, fast, tmp_path, capsys, monkeypatch):
    """Bombs, a network-file error and an error no one foresaw fail their item only; a
    legal 250-character name is dehazed (its record's name does not depend on it)."""
    src = tmp_path / "in"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    for name in ("a.png", "z.png", "io.png", "odd.png", "x" * 246 + ".png"):
        write_image(torch.rand(3, 64, 64, generator=g), src / name)
    png_header_only(src / "bomb.png", 30000, 30000)
    png_header_only(src / "deep.png", 20000, 20000, bit_depth=16)
    real_read = evaluation.read_image

    def flaky_read(path, *a, **k):
        if path.name == "io.png":
            raise OSError(errno.EIO, "Input/output error", str(path))       # e.g. a network share dropping
        if path.name == "odd.png":
            raise KeyError("something nobody foresaw")
        return real_read(path, *a, **k)
    monkeypatch.setattr(evaluation, "read_image", flaky_read)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", src, "--output", out)) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "4 of 7 item(s) failed" in errors[0]
    assert sorted(p.name for p in (out / "restored").iterdir()) == sorted(["a.png", "z.png", "x" * 246 + ".png"])
    summary = (out / "summary.md").read_text()
    assert "| bomb.png |" in summary and "pixel limit" in summary and "| deep.png |" in summary
    assert "| io.png |" in summary and "Input/output error" in summary
    assert "| odd.png |" in summary and "something nobody foresaw" in summary
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 3
    records = list((out / ".records").glob("*.json"))
    assert len(records) == 7 and {len(p.name) for p in records} == {45}
    assert "x" * 246 + ".png" in {json.loads(p.read_text())["name"] for p in records}


def test_a_full_disk_ends_the_run_with_one_line(models, fast, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    for i in range(3):
        write_image(torch.rand(3, 64, 64), src / f"{i}.png")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluation, "write_image", full)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", src, "--output", out)) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "No space left on device" in errors[0] and "--resume" in errors[0]
    assert "failed" not in errors[0] and "--debug" not in errors[0]      # the run's own reason, not a crash report
    assert not list((out / ".records").glob("*.json")), "no item may be recorded as failed for a full disk"


def test_out_of_memory_is_retried_in_tiles(models, fast, tmp_path, monkeypatch):
    img = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2))
    write_image(img, tmp_path / "in" / "big.png")
    monkeypatch.setattr(evaluation, "AUTO_TILE", 64)
    seen = []
    real_run = Dehazer._run

    def run(self, x, noise):
        seen.append(tuple(x.shape[-2:]))
        if x.shape[-1] * x.shape[-2] > 64 * 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_run(self, x, noise)
    monkeypatch.setattr(Dehazer, "_run", run)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", tmp_path / "in", "--output", out)) == 0
    assert seen == [(64, 96), (64, 64), (64, 64)]           # whole, out of memory, then two tiles
    assert (read_image(out / "restored" / "big.png").tensor - img).abs().max() <= 0.5 / 255 + 1e-6
    summary = (out / "summary.md").read_text()
    assert "Run in 64 x 64 tiles automatically" in summary and "big.png" in summary.split("automatically")[1]


def test_large_images_run_tiled_without_waiting_for_an_error(models, fast, tmp_path, monkeypatch):
    write_image(torch.rand(3, 64, 96), tmp_path / "in" / "big.png")
    monkeypatch.setattr(evaluation, "AUTO_TILE", 64)
    seen = []
    real_run = Dehazer._run
    monkeypatch.setattr(Dehazer, "_run", lambda self, x, n: seen.append(tuple(x.shape[-2:])) or real_run(self, x, n))
    assert dehaze.main(_args(models, "--input", tmp_path / "in", "--output", tmp_path / "out",
                             "--max-untiled-pixels", "5000")) == 0
    assert seen == [(64, 64), (64, 64)]
    seen.clear()
    assert dehaze.main(_args(models, "--input", tmp_path / "in", "--output", tmp_path / "whole")) == 0
    assert seen == [(64, 96)]


def test_a_non_finite_output_fails_its_item(models, fast, tmp_path, capsys, monkeypatch):
    write_image(torch.rand(3, 64, 64), tmp_path / "in" / "a.png")
    real_run = Dehazer._run

    def nan_run(self, x, noise):
        c, r = real_run(self, x, noise)
        return c, r * float("nan")
    monkeypatch.setattr(Dehazer, "_run", nan_run)
    out = tmp_path / "out"
    assert dehaze.main(_args(models, "--input", tmp_path / "in", "--output", out)) == 1
    assert not (out / "restored" / "a.png").exists()
    assert "stage-2 output has 12288 NaN or infinite value(s)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("override, problem", [
    ("sampling.eta=.nan", "sampling.eta: expected a finite number, got nan"),
    ("sampling.eta=.inf", "sampling.eta: expected a finite number, got inf"),
    ("stage2.sum_scale=.inf", "stage2.sum_scale: expected a finite number, got inf"),
    ("stage1=5", "stage1: expected a section of key: value entries, got 5"),
    ("stage2.sampling_timesteps=5000", "stage2.sampling_timesteps: 5000 is more than the 1000 diffusion steps"),
    ("sampling.seed=99999999999999999999", "sampling.seed: expected an integer <= 9223372036854775807"),
])
def test_config_errors_are_one_line_before_the_first_item(models, tmp_path, capsys, override, problem):
    for i in range(2):
        write_image(torch.rand(3, 64, 64), tmp_path / "in" / f"{i}.png")
    out = tmp_path / "out"
    code = dehaze.main(_args(models, "--input", tmp_path / "in", "--output", out, "--config", models / "cfg.yaml",
                             "--set", override))
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1 and problem in errors[0], errors
    assert not (out / ".records").exists() and not (out / "restored").exists()


def test_a_seed_that_overflows_is_refused_up_front(models, tmp_path, capsys):
    write_image(torch.rand(3, 64, 64), tmp_path / "in" / "a.png")
    assert dehaze.main(_args(models, "--input", tmp_path / "in", "--output", tmp_path / "out",
                             "--seed", str(2 ** 70))) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--seed" in errors[0] and "2^63" in errors[0]
    assert not (tmp_path / "out" / "restored").exists()


def test_a_run_never_writes_into_its_inputs(models, fast, tmp_path, capsys):
    x = tmp_path / "X"
    for i in range(2):
        write_image(torch.rand(3, 64, 64), x / "restored" / f"{i}.png")
    before = {p.name: p.read_bytes() for p in (x / "restored").iterdir()}
    assert dehaze.main(_args(models, "--input", x / "restored", "--output", x)) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "holds the input" in errors[0] and str((x / "restored").resolve()) in errors[0]
    assert {p.name: p.read_bytes() for p in (x / "restored").iterdir()} == before
    # inputs inside the output tree (evaluate: hazy under the output folder)
    write_image(torch.rand(3, 64, 64), tmp_path / "gt" / "0.png")
    assert evaluate.main(_args(models, "--hazy-dir", x / "restored", "--gt-dir", tmp_path / "gt",
                               "--output", x)) == 2
    # a symlinked output subfolder that leads to the inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "restored").symlink_to(x / "restored")
    assert dehaze.main(_args(models, "--input", x / "restored", "--output", out)) == 2
    assert "resolved" in _errors(capsys)[-1]
    assert {p.name: p.read_bytes() for p in (x / "restored").iterdir()} == before
    # an output folder beside (or inside) the input folder is fine: nothing is read from it
    assert dehaze.main(_args(models, "--input", x / "restored", "--output", x / "restored" / "sub")) == 0


def test_summary_cells_are_escaped(tmp_path):
    rows = [{"name": "a|b\nc.png", "height": 4, "width": 4, "psnr_stage1": 1.0, "ssim_stage1": 0.5,
             "psnr_stage2": 2.0, "ssim_stage2": 0.6}]
    failed = [{"name": "bad|name.png", "error": "x | y\nz"}]
    evaluation.write_results(rows, tmp_path, "paper", "t", failed=failed)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    table_rows = [line for line in lines if line.startswith("| a") or line.startswith("| bad")]
    assert len(table_rows) == 2
    for line in table_rows:
        unescaped = line.replace("\\|", "")
        assert unescaped.count("|") == (6 if line.startswith("| a") else 3), line
    assert "a\\|b\\nc.png" in table_rows[0] and "x \\| y\\nz" in table_rows[1]
