"""scripts/test.py, metric protocols, tiling, any-size input, real data."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsrdmpd.builders import build_stage1, build_stage2, save_stage
from dsrdmpd.data.pairing import find_pairs
from dsrdmpd.imageio import read_image, write_image
from dsrdmpd.diffusion import NOISE_BLOCK, window_noise
from dsrdmpd.config import ConfigError
from dsrdmpd.inference import Dehazer, TilePlan, default_overlap, tile_starts
from dsrdmpd.metrics import psnr_ssim

from conftest import REALDATA_DIR, REQUIRE_REALDATA, ROOT, realdata_sets, require_realdata

from dsrdmpd.cli import dehaze as dehaze_cmd, evaluate as evaluate_cmd  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))


def _read_csv(path):
    with open(path) as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_test_script_on_chain_fixture(chain, tmp_path):
    meta = json.loads((chain / "expected_metrics.json").read_text())
    expected = torch.load(chain / "expected_outputs.pt", weights_only=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"stage1": meta["config"]["stage1"], "stage2": meta["config"]["stage2"]}))
    means = evaluate_cmd.run(["--stage1", str(chain / "stage1_official.pth"), "--stage2",
                              str(chain / "stage2_official.pt"), "--config", str(cfg), "--seed",
                              str(meta["config"]["seed"]), "--hazy-dir", str(chain / "data" / "hazy"), "--gt-dir",
                              str(chain / "data" / "GT"), "--output", str(tmp_path / "out"), "--panels", "1"])
    rows = _read_csv(tmp_path / "out" / "metrics.csv")
    for name, exp in expected.items():
        saved = read_image(tmp_path / "out" / "restored" / name).tensor
        assert (saved - exp["restored"][0].float()).abs().max() <= 1 / 255 + 1e-6
        want = meta["images"][name]
        assert float(rows[name]["psnr_stage2"]) == pytest.approx(want["psnr"], abs=1e-3)
        assert float(rows[name]["ssim_stage2"]) == pytest.approx(want["ssim"], abs=1e-4)
        assert float(rows[name]["psnr_stage1"]) == pytest.approx(want["psnr_coarse"], abs=1e-3)
        assert float(rows[name]["ssim_stage1"]) == pytest.approx(want["ssim_coarse"], abs=1e-4)
    assert means["psnr_stage2"] == pytest.approx(meta["mean_psnr"], abs=1e-3)
    assert means["ssim_stage2"] == pytest.approx(meta["mean_ssim"], abs=1e-4)
    assert means["psnr_stage1"] == pytest.approx(meta["mean_psnr_coarse"], abs=1e-3)
    assert means["ssim_stage1"] == pytest.approx(meta["mean_ssim_coarse"], abs=1e-4)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "paper protocol" in summary and f"{meta['mean_psnr']:.3f}" in summary
    first = sorted(expected)[0]
    assert (tmp_path / "out" / "panels" / (first.rsplit(".", 1)[0] + ".png")).is_file()


def _paper_reference(a: np.ndarray, b: np.ndarray):
    """Independent float64 numpy version of the authors' metric code."""
    from scipy.ndimage import correlate
    x = np.arange(11) - 5
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    win = np.outer(g, g)
    filt = lambda z: correlate(z, win, mode="constant", cval=0.0)
    maps = []
    for c in range(3):
        p, q = a[c], b[c]
        mp, mq = filt(p), filt(q)
        spp, sqq, spq = filt(p * p) - mp ** 2, filt(q * q) - mq ** 2, filt(p * q) - mp * mq
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        maps.append(((2 * mp * mq + c1) * (2 * spq + c2)) / ((mp ** 2 + mq ** 2 + c1) * (spp + sqq + c2)))
    return 10 * np.log10(1 / np.mean((a - b) ** 2)), float(np.mean(maps))


def test_paper_protocol_against_independent_numpy():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 40, 52, generator=g)
    pred = (gt + 0.1 * torch.randn(3, 40, 52, generator=g)).clamp(0, 1)
    ours = psnr_ssim(pred, gt, "paper")
    ref_psnr, ref_ssim = _paper_reference(pred.double().numpy(), gt.double().numpy())
    assert ours["psnr"][0] == pytest.approx(ref_psnr, abs=1e-4)
    assert ours["ssim"][0] == pytest.approx(ref_ssim, abs=1e-5)


@pytest.mark.parametrize("padding", [5, 0])
def test_ssim_window_applied_as_its_two_factors(padding):
    """SSIM's local means come from the 11 x 11 Gaussian window applied as two 1-D passes:
    the same map as the 2-D window (as the authors' code applies it) to float64 rounding,
    with zero padding (paper) and on the valid region (standard, y)."""
    from dsrdmpd.metrics import _ssim_map, gaussian_kernel, gaussian_window, ssim_map_2d_window
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 30, 41, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(2, 3, 30, 41, generator=g, dtype=torch.float64)).clamp(0, 1)
    k = gaussian_kernel(dtype=torch.float64)
    assert torch.equal(gaussian_window(dtype=torch.float64), k[:, None] * k[None, :])
    ref = ssim_map_2d_window(a, b, padding, 1.0)
    ours = _ssim_map(a, b, padding, 1.0)
    assert ours.shape == ref.shape == (2, 3, 30 - 10 + 2 * padding, 41 - 10 + 2 * padding)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_paper_protocol_clamps_both_images():
    """The authors clamp the network output to [0, 1] before scoring: a prediction of 1.3
    against 0.8 scores as 1.0 against 0.8 (MSE 0.04, 13.979 dB), not 6.02 dB."""
    gt = torch.full((3, 16, 16), 0.8)
    m = psnr_ssim(torch.full((3, 16, 16), 1.3), gt, "paper")
    assert m["psnr"][0] == pytest.approx(20 * np.log10(1 / 0.2), abs=1e-4)
    assert m["psnr"][0] == pytest.approx(psnr_ssim(torch.ones(3, 16, 16), gt, "paper")["psnr"][0], abs=1e-9)
    assert m["ssim"][0] == pytest.approx(psnr_ssim(torch.ones(3, 16, 16), gt, "paper")["ssim"][0], abs=1e-9)
    below = psnr_ssim(torch.full((3, 16, 16), -0.5), torch.full((3, 16, 16), 0.1), "paper")
    assert below["psnr"][0] == pytest.approx(20.0, abs=1e-4)            # clamped to 0: error 0.1


def test_standard_protocol_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(3, 48, 64, generator=g)
    pred = (gt + 0.05 * torch.randn(3, 48, 64, generator=g)).clamp(0, 1)
    ours = psnr_ssim(pred, gt, "standard")
    a = (pred * 255).round().byte().permute(1, 2, 0).numpy()
    b = (gt * 255).round().byte().permute(1, 2, 0).numpy()
    assert ours["psnr"][0] == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-6)
    sk = structural_similarity(b, a, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False)
    assert ours["ssim"][0] == pytest.approx(sk, abs=1e-6)
    assert abs(ours["ssim"][0] - psnr_ssim(pred, gt, "paper")["ssim"][0]) > 1e-4   # protocols do differ


@pytest.fixture(scope="module")
def tiny_dehazer_parts():
    torch.manual_seed(0)
    return build_stage1({"dim": 32}).eval(), build_stage2({"dim": 8}).eval()


def test_tiling_single_tile_equals_untiled(tiny_dehazer_parts):
    s1, s2 = tiny_dehazer_parts
    x = torch.rand(1, 3, 90, 130)
    full = Dehazer(s1, s2)(x)
    tiled = Dehazer(s1, s2, tile=256, overlap=32)(x)
    assert torch.equal(full.restored, tiled.restored) and torch.equal(full.coarse, tiled.coarse)


def test_tiling_blends_tile_outputs(tiny_dehazer_parts):
    """Inside a region covered by one tile the result is that tile's own output; in the
    overlaps it is a convex combination of the overlapping tiles' outputs."""
    s1, s2 = tiny_dehazer_parts
    x = torch.rand(1, 3, 128, 192)
    d = Dehazer(s1, s2, tile=128, overlap=32)
    out = d(x, seed=3)
    assert tile_starts(192, 128, 32) == [0, 64]
    noise = window_noise(3, 0, 0, 128, 192)         # several tiles: windows of the block-keyed noise field
    _, left = d._run(x[..., :, 0:128], noise[..., :, 0:128])
    _, right = d._run(x[..., :, 64:192], noise[..., :, 64:192])
    torch.testing.assert_close(out.restored[..., :, :64], left[..., :, :64], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.restored[..., :, 128:], right[..., :, 64:], rtol=0, atol=1e-6)
    mid, lo, hi = out.restored[..., :, 64:128], torch.minimum(left[..., 64:], right[..., :64]), \
        torch.maximum(left[..., 64:], right[..., :64])
    assert bool(((mid >= lo - 1e-6) & (mid <= hi + 1e-6)).all())
    assert (mid - left[..., 64:]).abs().max() > 0        # a real blend, not a copy
    # the difference from the untiled run is bounded by how much the tiles themselves differ from it
    full = Dehazer(s1, s2)(x, noise=noise).restored
    bound = torch.maximum((left - full[..., :128]).abs().max(), (right - full[..., 64:]).abs().max())
    assert (out.restored - full).abs().max() <= bound + 1e-6


def test_window_noise_is_the_same_field_whatever_the_window():
    big = window_noise(5, 100, 200, 3 * NOISE_BLOCK, 2 * NOISE_BLOCK + 7)
    for y, x, h, w in [(100, 200, 1, 1), (300, 420, 70, 290), (100 + 3 * NOISE_BLOCK - 9, 210, 9, 64)]:
        torch.testing.assert_close(window_noise(5, y, x, h, w), big[..., y - 100:y - 100 + h, x - 200:x - 200 + w],
                                   rtol=0, atol=0)
    assert not torch.equal(window_noise(6, 100, 200, 8, 8), big[..., :8, :8])          # the seed matters
    assert not torch.equal(window_noise(5, 0, 0, 64, 64), window_noise(5, 0, 64, 64, 64))  # no repeats
    assert abs(big.std().item() - 1) < 0.01 and abs(big.mean().item()) < 0.01


class RowRampStage1(torch.nn.Module):
    """Fake stage 1: its input plus (row index in the tensor it is given) / 1000, so where
    padding went and which rows were cropped back shows in the output."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x + torch.arange(x.shape[-2], dtype=x.dtype).view(1, 1, -1, 1) / 1000


class TileMeanStage2(torch.nn.Module):
    """Fake stage 2: a constant image, the mean of the coarse tile it is given."""
    sampling_timesteps = 1

    def sample(self, c, x, noise=None, steps=None, eta=0.0, fast=True):
        return c.mean(dim=(1, 2, 3), keepdim=True).expand_as(c).clone()


def test_feathered_blend_ramps_linearly_from_one_tile_to_the_next():
    """Two tiles side by side (columns 0-63 and 48-111, overlap 16), each with a constant
    output A and B: in the overlap, column 48 + j gets (A (16 - j) + B (j + 1)) / 17, the
    linear ramps of both tiles; outside it, each tile's own value."""
    x = (torch.arange(112, dtype=torch.float32) / 112).view(1, 1, 1, -1).expand(1, 3, 64, 112).contiguous()
    out = Dehazer(RowRampStage1(), TileMeanStage2(), tile=64, overlap=16)(x)
    rows = torch.arange(64, dtype=torch.float32).view(1, 1, -1, 1) / 1000
    a, b = (x[..., :64] + rows).mean(), (x[..., 48:] + rows).mean()
    k = 16
    expected = torch.empty(112)
    expected[:48], expected[64:] = a, b
    for j in range(k):
        expected[48 + j] = (a * (k - j) + b * (j + 1)) / (k + 1)
    torch.testing.assert_close(out.restored[0, 0, 10], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.coarse, x + rows, rtol=0, atol=1e-6)    # same coarse from both tiles


def test_the_default_overlap_fits_every_tile_size():
    """No overlap given: 64 pixels, or 32 for 64-pixel tiles (64 would leave a stride of 0);
    a 64-pixel tile runs as if 32 were given, larger tiles as if 64 were (as before); a
    per-call tile size takes its own default, a given overlap is kept (and still checked)."""
    assert [default_overlap(t) for t in (None, 64, 80, 128, 512)] == [64, 32, 64, 64, 64]
    x = torch.rand(1, 3, 64, 176, generator=torch.Generator().manual_seed(1))
    defaulted = Dehazer(RowRampStage1(), TileMeanStage2(), tile=64)
    assert defaulted.overlap == 32 and defaulted.tile_plan(64, 176).windows == [(0, 0), (0, 32), (0, 64), (0, 96), (0, 112)]
    given = Dehazer(RowRampStage1(), TileMeanStage2(), tile=64, overlap=32)(x).restored
    assert torch.equal(defaulted(x).restored, given)
    assert Dehazer(RowRampStage1(), TileMeanStage2(), tile=128).overlap == 64
    untiled = Dehazer(RowRampStage1(), TileMeanStage2())
    assert untiled.overlap == 64 and untiled.tile_plan(64, 176, 64).overlap == 32
    assert untiled.tile_plan(64, 176, 256).overlap == 64
    assert Dehazer(RowRampStage1(), TileMeanStage2(), overlap=16).tile_plan(64, 176, 64).overlap == 16
    with pytest.raises(ConfigError, match=r"tile overlap 64 must be in \[0, tile size 64\)"):
        Dehazer(RowRampStage1(), TileMeanStage2(), tile=64, overlap=64)
    with pytest.raises(ConfigError, match=r"tile overlap 64 must be in \[0, tile size 64\)"):
        Dehazer(RowRampStage1(), TileMeanStage2(), overlap=64).tile_plan(64, 176, 64)
    with pytest.raises(ConfigError, match="tile size 48 must be a multiple of 16 and at least 64"):
        TilePlan.make(64, 176, 48, 0)
    numpy_ints = Dehazer(RowRampStage1(), TileMeanStage2(), tile=np.int64(64), overlap=np.int32(32))
    assert torch.equal(numpy_ints(x).restored, given)              # any integer type, as before
    with pytest.raises(ConfigError, match="tile overlap must be a whole number, got True"):
        Dehazer(RowRampStage1(), TileMeanStage2(), tile=64, overlap=True)
    with pytest.raises(ConfigError, match="tile size must be a whole number, got 64.0"):
        Dehazer(RowRampStage1(), TileMeanStage2(), tile=64.0)


def test_tile_64_on_the_command_line_takes_the_fitting_overlap():
    import argparse
    from dsrdmpd.cli.options import add_run_options, dehazer_options
    ap = argparse.ArgumentParser()
    add_run_options(ap)
    opts = dehazer_options(ap.parse_args(["--tile", "64"]))
    assert opts["overlap"] is None
    assert Dehazer(RowRampStage1(), TileMeanStage2(), **opts).overlap == 32
    assert dehazer_options(ap.parse_args(["--tile", "64", "--overlap", "8"]))["overlap"] == 8


@pytest.mark.parametrize("tile", [None, 64])
def test_padding_goes_bottom_right_and_is_cropped_back(tile):
    """A 50 x 77 image is padded to 64 x 80 at the bottom and right (reflect), and the
    top-left 50 x 77 of the outputs is returned."""
    x = torch.rand(1, 3, 50, 77, generator=torch.Generator().manual_seed(0))
    stage1 = RowRampStage1()
    out = Dehazer(stage1, TileMeanStage2(), tile=tile, overlap=16)(x)
    rows = torch.arange(50, dtype=torch.float32).view(1, 1, -1, 1) / 1000
    torch.testing.assert_close(out.coarse, x + rows, rtol=0, atol=1e-6)
    if tile is not None:
        return
    seen = stage1.seen[0]
    assert seen.shape[-2:] == (64, 80)
    assert torch.equal(seen[..., :50, :77], x)
    assert torch.equal(seen[..., 50:, :77], x.flip(-2)[..., 1:15, :])         # reflected rows below
    assert torch.equal(seen[..., :50, 77:], x.flip(-1)[..., :, 1:4])       # reflected columns to the right


@pytest.mark.parametrize("h,w", [(50, 77), (17, 200)])
def test_odd_sizes_come_back_at_their_size(tiny_dehazer_parts, h, w):
    s1, s2 = tiny_dehazer_parts
    for tile in (None, 64):
        out = Dehazer(s1, s2, tile=tile, overlap=16)(torch.rand(1, 3, h, w))
        assert out.restored.shape == (1, 3, h, w)


def test_16bit_tiff_in_16bit_out(chain, tmp_path):
    """A 16-bit TIFF comes back as a 16-bit TIFF holding the float result to 16-bit
    precision (not 8-bit levels scaled up)."""
    img = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    write_image(img, tmp_path / "in" / "scene.tif", bit_depth=16)
    evaluate_cmd.run(["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
                      "--hazy-dir", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    out = read_image(tmp_path / "out" / "restored" / "scene.tif")
    assert out.bit_depth == 16 and out.tensor.shape == (3, 64, 80)
    want = Dehazer.from_checkpoints(str(chain / "stage1_official.pth"), str(chain / "stage2_official.pt"))(
        read_image(tmp_path / "in" / "scene.tif").tensor[None]).restored[0]
    assert (out.tensor - want).abs().max() <= 0.5 / 65535 + 1e-6
    assert ((out.tensor * 65535).round() % 257 != 0).any()               # not 8-bit levels


def test_standard_protocol_through_test_script(chain, tmp_path):
    """--protocol standard scores the uint8-rounded result (what restored/ holds) against GT."""
    evaluate_cmd.run(["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
                      "--hazy-dir", str(chain / "data" / "hazy"), "--gt-dir", str(chain / "data" / "GT"),
                      "--output", str(tmp_path), "--protocol", "standard"])
    rows = _read_csv(tmp_path / "metrics.csv")
    for name, r in rows.items():
        saved = read_image(tmp_path / "restored" / name).tensor
        m = psnr_ssim(saved, read_image(chain / "data" / "GT" / name).tensor, "standard")
        assert float(r["psnr_stage2"]) == pytest.approx(m["psnr"][0], abs=1e-5)
        assert float(r["ssim_stage2"]) == pytest.approx(m["ssim"][0], abs=1e-6)
    assert "standard protocol" in (tmp_path / "summary.md").read_text()


def test_dehaze_script_tiles_as_asked(chain, tmp_path):
    """dehaze.py --tile/--overlap/--tile-batch gives what the tiled Dehazer gives, which
    differs from the untiled result (so the options are really used)."""
    img = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(2))
    write_image(img, tmp_path / "in" / "scene.png")
    ckpts = str(chain / "stage1_official.pth"), str(chain / "stage2_official.pt")
    dehaze_cmd.run(["--stage1", ckpts[0], "--stage2", ckpts[1], "--input", str(tmp_path / "in"),
                        "--output", str(tmp_path / "out"), "--tile", "64", "--overlap", "16", "--tile-batch", "3"])
    saved = read_image(tmp_path / "out" / "restored" / "scene.png").tensor
    hazy = read_image(tmp_path / "in" / "scene.png").tensor[None]
    tiled = Dehazer.from_checkpoints(*ckpts, tile=64, overlap=16)(hazy).restored[0]
    untiled = Dehazer.from_checkpoints(*ckpts)(hazy).restored[0]
    assert (saved - tiled).abs().max() <= 0.5 / 255 + 1e-4
    assert (saved - untiled).abs().max() > 2 / 255


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Random tiny models in the project's checkpoint format (plain decoder, one sampling
    step: the real-data runs check file handling and sizes, not quality, and must be quick)."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    cfg = {"stage1": {"dim": 32}, "stage2": {"dim": 8, "sampling_timesteps": 1, "perceptual_decoder": False}}
    save_stage(build_stage1(cfg["stage1"]), root / "s1.pt", 1, cfg)
    save_stage(build_stage2(cfg["stage2"]), root / "s2.pt", 2, cfg)
    return root / "s1.pt", root / "s2.pt"


def _output_name(name: str) -> str:
    return name if name.endswith((".png", ".tif", ".tiff")) else name.rsplit(".", 1)[0] + ".png"


@pytest.mark.parametrize("folder", realdata_sets())
def test_runs_on_real_data(tiny_checkpoints, passthrough_networks, folder, tmp_path):
    """Every real pair (256-600 px, PNG / JPEG / TIFF) goes through test.py (with GT), and
    the evaluation folders also through the inference command scripts/dehaze.py (no GT; the
    train/ folders hold the same formats and sizes and are skipped there), with stand-in
    networks that return their input: what is under test is the files. Each restored file
    holds exactly the input's decoded pixels, at its size and bit depth; each score is the
    hazy image's own PSNR against its GT. (Real networks on real data:
    test_tiny_networks_on_a_real_image; at 512-600 px they cost minutes per folder here.)"""
    folder = require_realdata(folder)
    s1, s2 = map(str, tiny_checkpoints)
    means = evaluate_cmd.run(["--stage1", s1, "--stage2", s2, "--hazy-dir", str(folder / "hazy"), "--gt-dir",
                              str(folder / "GT"), "--output", str(tmp_path / "test"), "--panels", "1"])
    rows = _read_csv(tmp_path / "test" / "metrics.csv")
    pairs = find_pairs(folder / "hazy", folder / "GT")
    assert sorted(rows) == sorted(p.hazy.name for p in pairs) == sorted(p.name for p in (folder / "hazy").iterdir())
    assert set(means) == {"psnr_stage1", "ssim_stage1", "psnr_stage2", "ssim_stage2"}
    assert (tmp_path / "test" / "panels").is_dir()
    for pair in pairs:              # PSNR recomputed here; SSIM (an image's slowest part) equal across stages
        hazy, gt = read_image(pair.hazy).tensor.clamp(0, 1), read_image(pair.gt).tensor.clamp(0, 1)
        want = 10 * np.log10(1 / ((hazy.double() - gt.double()) ** 2).mean().item())
        row = rows[pair.hazy.name]
        assert float(row["psnr_stage1"]) == float(row["psnr_stage2"]) == pytest.approx(want, abs=1e-5)
        assert row["ssim_stage1"] == row["ssim_stage2"] and 0 < float(row["ssim_stage2"]) <= 1
    runs = ["test"]
    if folder.name != "train":
        dehaze_cmd.run(["--stage1", s1, "--stage2", s2, "--input", str(folder / "hazy"), "--output",
                        str(tmp_path / "dehaze")])
        runs.append("dehaze")
    for pair in pairs:
        hazy = read_image(pair.hazy)
        for run in runs:
            out = read_image(tmp_path / run / "restored" / _output_name(pair.hazy.name))
            assert out.bit_depth == hazy.bit_depth, (run, pair.hazy.name)
            assert torch.equal(out.tensor, hazy.tensor), (run, pair.hazy.name)


def test_tiny_networks_on_a_real_image(tiny_checkpoints, tmp_path):
    """Real (tiny, random) networks on the smallest real hazy image: test.py and dehaze.py
    give the input's size and bit depth and the same pixels, and the result is not the input."""
    sets = [p.values[0] for p in realdata_sets()]
    if sets[0] is None and not REQUIRE_REALDATA:
        pytest.skip(f"no real-data pairs under {REALDATA_DIR} (they cannot be redistributed)")
    folder = require_realdata(sets[0])
    smallest = min((p for s in sets for p in (s / "hazy").iterdir()), key=lambda p: p.stat().st_size)
    pair = next(p for p in find_pairs(smallest.parent, smallest.parent.parent / "GT") if p.hazy == smallest)
    (tmp_path / "hazy").mkdir(), (tmp_path / "GT").mkdir()
    shutil.copy(pair.hazy, tmp_path / "hazy" / smallest.name)
    shutil.copy(pair.gt, tmp_path / "GT" / smallest.name)
    s1, s2 = map(str, tiny_checkpoints)
    evaluate_cmd.run(["--stage1", s1, "--stage2", s2, "--hazy-dir", str(tmp_path / "hazy"), "--gt-dir",
                      str(tmp_path / "GT"), "--output", str(tmp_path / "test")])
    dehaze_cmd.run(["--stage1", s1, "--stage2", s2, "--input", str(tmp_path / "hazy"), "--output",
                    str(tmp_path / "dehaze")])
    hazy = read_image(smallest)
    outs = [read_image(tmp_path / run / "restored" / _output_name(smallest.name)) for run in ("test", "dehaze")]
    for out in outs:
        assert out.tensor.shape == hazy.tensor.shape and out.bit_depth == hazy.bit_depth
    assert torch.equal(outs[0].tensor, outs[1].tensor)
    assert not torch.equal(outs[0].tensor, hazy.tensor)
    assert folder.is_dir()


def test_demo_end_to_end_small(tmp_path, capsys):
    """The README's main command, shrunk: synthetic data, both tiny stages trained,
    held-out scenes dehazed, table printed, results and panels written; the run only
    replaces the folders it writes (data/, runs/, results/), never other files in --output."""
    from dsrdmpd.cli import demo as demo_cmd
    mine = tmp_path / "demo" / "notes.txt"
    (tmp_path / "demo" / "results").mkdir(parents=True)
    mine.write_text("keep me")
    (tmp_path / "demo" / "results" / "old.csv").write_text("stale")
    assert demo_cmd.main(["--output", str(tmp_path / "demo"), "--size", "64", "--train-images", "4", "--test-images",
                      "2", "--test-size", "64", "--stage1-epochs", "1", "--stage2-steps", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| stage 2 (RDMPD, 5 steps) |" in printed and "TINY models" in printed
    rows = _read_csv(tmp_path / "demo" / "results" / "metrics.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["psnr_stage2"])) for r in rows.values())
    assert len(list((tmp_path / "demo" / "results" / "panels").glob("*.png"))) == 2
    panel = read_image(tmp_path / "demo" / "results" / "panels" / "0000.png").tensor
    overview = read_image(tmp_path / "demo" / "results" / "overview.png").tensor
    assert panel.shape[-2] >= 192 and overview.shape[-2] == 2 * panel.shape[-2] + 10     # two panels stacked
    assert "not from the paper's models" in (tmp_path / "demo" / "results" / "summary.md").read_text()
    assert mine.read_text() == "keep me" and not (tmp_path / "demo" / "results" / "old.csv").exists()


def test_demo_bad_usage_is_one_line(tmp_path, capsys):
    """Usage errors end with one line and exit code 2 (that a run keeps other files in
    --output: test_demo_end_to_end_small)."""
    from dsrdmpd.cli import demo as demo_cmd
    assert demo_cmd.main(["--stage1", "s1.pth"]) == 2
    assert capsys.readouterr().err.strip() == "error: give both --stage1 and --stage2, or neither"
    assert demo_cmd.main(["--seeds", "0", "1", "--stage1", "a", "--stage2", "b", "--input", "x"]) == 2


def test_demo_seed_table_counts_the_seeds_where_stage_2_wins_on_both(tmp_path):
    """demo.py --seeds: one row per seed with stage 2 minus stage 1, the spread, and how
    many seeds have stage 2 above stage 1 on PSNR and SSIM; CSV with the same numbers."""
    from dsrdmpd.cli import demo as demo_cmd
    base = {"psnr_hazy": 12.0, "ssim_hazy": 0.6, "psnr_stage1": 20.0, "ssim_stage1": 0.8, "seconds": 200.0}
    results = [{**base, "seed": 0, "psnr_stage2": 20.5, "ssim_stage2": 0.81},
               {**base, "seed": 1, "psnr_stage2": 21.0, "ssim_stage2": 0.79},      # PSNR up, SSIM down
               {**base, "seed": 2, "psnr_stage2": 19.75, "ssim_stage2": 0.8125, "seconds": 250.0}]
    demo_cmd.write_seeds(results, tmp_path, "test machine", "python scripts/demo.py --seeds 0 1 2")
    md = (tmp_path / "seeds.md").read_text()
    assert "| 0 | 12.00 / 0.6000 | 20.00 / 0.8000 | 20.50 / 0.8100 | +0.50 dB / +0.0100 | 200 |" in md
    assert "| 1 |" in md and "+1.00 dB / -0.0100" in md and "-0.25 dB / +0.0125" in md
    assert "PSNR -0.25 to +1.00 dB (mean +0.42)" in md and "SSIM -0.0100 to +0.0125 (mean +0.0042)" in md
    assert "stage 2 above stage 1 on both in 1 of 3 seeds" in md and "longest run 250 s" in md
    assert "Machine: test machine." in md
    rows = list(csv.DictReader(open(tmp_path / "seeds.csv")))
    assert [r["seed"] for r in rows] == ["0", "1", "2"] and float(rows[2]["psnr_stage2"]) == 19.75
    from dsrdmpd.machine import machine_description
    assert machine_description("cpu").endswith(f"threads, torch {torch.__version__}")


def test_resize_protocol_scores_at_the_given_size(chain, tmp_path):
    """--resize N: hazy and GT are resized to N x N before dehazing and scoring; results are N x N."""
    evaluate_cmd.run(["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
                      "--hazy-dir", str(chain / "data" / "hazy"), "--gt-dir", str(chain / "data" / "GT"),
                      "--output", str(tmp_path), "--resize", "80"])
    rows = _read_csv(tmp_path / "metrics.csv")
    assert rows and all((r["height"], r["width"]) == ("80", "80") for r in rows.values())
    for name in rows:
        assert read_image(tmp_path / "restored" / name).tensor.shape == (3, 80, 80)
    assert "resized to 80" in (tmp_path / "summary.md").read_text()


def test_rotated_frames_and_conversions_through_test_py(tiny_checkpoints, passthrough_networks, tmp_path):
    """A drone frame stored unrotated with EXIF orientation 6, and its GT with the same tag,
    are dehazed and scored upright (restored/ holds the upright image, the score is that of
    the upright pair); a grey image is replicated to RGB; summary.md names both conversions
    per image (hazy and ground truth)."""
    from PIL import Image
    rng = np.random.default_rng(5)
    stored_hazy, stored_gt = (rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2))
    exif = Image.Exif()
    exif[0x0112] = 6
    for side, arr in (("hazy", stored_hazy), ("gt", stored_gt)):
        (tmp_path / side).mkdir()
        Image.fromarray(arr).save(tmp_path / side / "frame.png", exif=exif)
        Image.fromarray(arr[..., 0]).save(tmp_path / side / "grey.png")
    s1, s2 = map(str, tiny_checkpoints)
    evaluate_cmd.run(["--stage1", s1, "--stage2", s2, "--hazy-dir", str(tmp_path / "hazy"), "--gt-dir",
                      str(tmp_path / "gt"), "--output", str(tmp_path / "out")])
    upright = np.asarray(Image.open(tmp_path / "out" / "restored" / "frame.png"))
    assert np.array_equal(upright, np.rot90(stored_hazy, -1))
    hazy, gt = (torch.from_numpy(np.rot90(a, -1).copy()).permute(2, 0, 1).double() / 255
                for a in (stored_hazy, stored_gt))
    row = _read_csv(tmp_path / "out" / "metrics.csv")["frame.png"]
    assert (row["height"], row["width"]) == ("56", "40")
    assert float(row["psnr_stage2"]) == pytest.approx(10 * np.log10(1 / ((hazy - gt) ** 2).mean().item()), abs=1e-4)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert ("| frame.png | turned upright (EXIF orientation 6); ground truth: turned upright (EXIF orientation 6) |"
            in summary)
    assert "| grey.png | grayscale replicated to RGB; ground truth: grayscale replicated to RGB |" in summary


def test_outputs_that_would_share_a_file_are_refused_before_any_item():
    """a.jpg and a.png would both be restored/a.png; a.png and a.tif keep their names in
    restored/ but, among the first --panels items, would both be panels/a.png."""
    from dsrdmpd.data import DataError
    from dsrdmpd.evaluation import Item, check_output_names
    with pytest.raises(DataError, match=r"a.png and .*a.jpg would both be written as a.png"):
        check_output_names([Item("a.jpg", Path("in/a.jpg")), Item("a.png", Path("in/a.png"))])
    pair = [Item("a.png", Path("in/a.png")), Item("a.tif", Path("in/a.tif"))]
    check_output_names(pair)
    check_output_names(pair, panels=1)
    with pytest.raises(DataError, match=r"a.tif and .*a.png would both be written as panels/a.png"):
        check_output_names(pair, panels=2)


def test_names_that_differ_in_case_are_refused_where_the_output_folder_ignores_case(tmp_path, monkeypatch):
    """A.png and a.png are one file on the usual macOS and Windows file systems: refused there
    (the output folder is asked), written side by side where case matters (this Linux folder)."""
    from dsrdmpd import evaluation, runfolder
    from dsrdmpd.data import DataError
    from dsrdmpd.evaluation import Item, check_output_names
    items = [Item("A.png", Path("in/A.png")), Item("a.png", Path("in/a.png"))]
    check_output_names(items)
    with pytest.raises(DataError, match=r"in/a.png and in/A.png would be written as a.png and A.png: one file on a "
                                        r"file system that ignores case"):
        check_output_names(items, ignore_case=True)
    check_output_names([Item("A.png", Path("in/A.png")), Item("b.png", Path("in/b.png"))], panels=2, ignore_case=True)
    with pytest.raises(DataError, match=r"panels/a.png and panels/A.png"):   # a.jpg -> a.png, A.tif keeps its name
        check_output_names([Item("A.tif", Path("in/A.tif")), Item("a.jpg", Path("in/a.jpg"))], panels=2,
                           ignore_case=True)
    # the folder itself is asked, and the probe leaves nothing behind (also for a folder not made yet)
    assert runfolder.ignores_case(tmp_path) is False and runfolder.ignores_case(tmp_path / "new" / "run") is False
    assert list(tmp_path.iterdir()) == []
    seen = []
    monkeypatch.setattr(evaluation, "ignores_case", lambda folder: seen.append(folder) or True)
    with pytest.raises(DataError, match="ignores case"):
        evaluation.run_items(None, items, tmp_path / "out", run_id="x")
    assert seen == [tmp_path / "out"] and not (tmp_path / "out" / "restored").exists()
