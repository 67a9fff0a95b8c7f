"""The whole two-stage chain on the official chain fixture, from PNG files through the
public API, with the sizes and seed stated in expected_metrics.json."""
from __future__ import annotations

import json

import pytest
import torch

from dsrdmpd.imageio import read_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.metrics import psnr_ssim

from conftest import fixture_files, require

CHAIN = fixture_files("chain")


@pytest.fixture(scope="module", params=CHAIN)
def chain(request):
    folder = require(request.param)
    meta = json.loads((folder / "expected_metrics.json").read_text())
    expected = torch.load(folder / "expected_outputs.pt", map_location="cpu", weights_only=False)
    cfg = meta["config"]
    dehazer = Dehazer.from_checkpoints(str(folder / "stage1_official.pth"), str(folder / "stage2_official.pt"),
                                       config={"stage1": cfg["stage1"], "stage2": cfg["stage2"]}, seed=cfg["seed"])
    return folder, meta, expected, dehazer


def test_chain_matches_official_outputs_and_metrics(chain):
    folder, meta, expected, dehazer = chain
    for name, exp in expected.items():
        hazy = read_image(folder / "data" / "hazy" / name).tensor[None]
        gt = read_image(folder / "data" / "GT" / name).tensor[None]
        result = dehazer(hazy)
        torch.testing.assert_close(result.coarse, exp["coarse"].float(), rtol=1e-4, atol=1e-5)
        assert (result.restored - exp["restored"].float()).abs().max() < 1e-4
        m, mc = psnr_ssim(result.restored, gt), psnr_ssim(result.coarse, gt)
        want = meta["per_image"][name]
        assert m["psnr"][0] == pytest.approx(want["psnr"], abs=1e-3)
        assert m["ssim"][0] == pytest.approx(want["ssim"], abs=1e-4)
        assert mc["psnr"][0] == pytest.approx(want["psnr_coarse"], abs=1e-3)
        assert mc["ssim"][0] == pytest.approx(want["ssim_coarse"], abs=1e-4)


def test_chain_sizes_read_off_checkpoints(chain):
    """Without a config, the loaders read every size off the official files."""
    folder, meta, expected, _ = chain
    dehazer = Dehazer.from_checkpoints(str(folder / "stage1_official.pth"), str(folder / "stage2_official.pt"),
                                       seed=meta["config"]["seed"])
    assert dehazer.stage1.dim == meta["config"]["stage1"]["dim"]
    assert dehazer.stage2.net.dim == meta["config"]["stage2"]["dim"]
    name, exp = next(iter(expected.items()))
    result = dehazer(read_image(folder / "data" / "hazy" / name).tensor[None])
    assert (result.restored - exp["restored"].float()).abs().max() < 1e-4


def test_chain_batch_equals_single(chain):
    """An image's result does not depend on its batch-mates."""
    folder, meta, expected, dehazer = chain
    names = list(expected)
    batch = torch.cat([read_image(folder / "data" / "hazy" / n).tensor[None] for n in names])
    together = dehazer(batch).restored
    for i, n in enumerate(names):
        assert (together[i:i + 1] - expected[n]["restored"].float()).abs().max() < 1e-4
