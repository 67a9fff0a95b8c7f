"""The whole two-stage chain on every chain fixture set, from PNG files through the public
API, with the sizes and seed stated in expected_metrics.json; bounds derived from float32
rounding (tests/parity_bounds.py)."""
from __future__ import annotations

import json

import pytest
import torch

from dsrdmpd.imageio import read_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.metrics import psnr_ssim

from parity_bounds import LEVEL, assert_levels, assert_parity, compare
from parity_cases import chain_dehazer


@pytest.fixture(scope="module")
def chain_run(any_chain, chain_exact):
    """The chain through the public API, from the official-format files (conftest.any_chain),
    and the float64 run of the same Dehazer (parity_bounds) per image: the exact reference
    (conftest.chain_exact, computed once per set and shared with test_speed_options)."""
    folder = any_chain
    meta, expected, dehazer = chain_dehazer(folder, folder)
    exact = chain_exact(folder)
    assert set(exact) == set(expected)
    return folder, meta, expected, dehazer, exact


def test_chain_matches_official_outputs_and_metrics(chain_run):
    folder, meta, expected, dehazer, exact = chain_run
    for name, exp in expected.items():
        hazy = read_image(folder / "data" / "hazy" / name).tensor[None]
        gt = read_image(folder / "data" / "GT" / name).tensor[None]
        result = dehazer(hazy)
        assert_parity(f"{name} coarse", result.coarse, exact[name].coarse, exp["coarse"])
        assert_parity(f"{name} restored", result.restored, exact[name].restored, exp["restored"])
        assert_levels(f"{name} restored", result.restored, exact[name].restored, exp["restored"])
        m, mc = psnr_ssim(result.restored, gt), psnr_ssim(result.coarse, gt)
        want = meta["images"][name]
        assert m["psnr"][0] == pytest.approx(want["psnr"], abs=1e-3)
        assert m["ssim"][0] == pytest.approx(want["ssim"], abs=1e-4)
        assert mc["psnr"][0] == pytest.approx(want["psnr_coarse"], abs=1e-3)
        assert mc["ssim"][0] == pytest.approx(want["ssim_coarse"], abs=1e-4)


def test_one_level_in_one_pixel_is_caught(chain_run):
    """One 8-bit level added to one pixel of the restored output fails the parity check,
    whether the bug is in both of our runs (it moves the reference) or only in the float32
    one (it inflates the measured rounding beyond a quarter level)."""
    folder, meta, expected, dehazer, exact = chain_run
    name, exp = next(iter(expected.items()))
    ours = dehazer(read_image(folder / "data" / "hazy" / name).tensor[None]).restored
    ref = exact[name].restored
    assert compare("unchanged", ours, ref, exp["restored"]).ok
    bump = torch.zeros_like(ours)
    bump[0, 1, ours.shape[-2] // 2, ours.shape[-1] // 3] = LEVEL
    assert not compare("bug in both runs", ours + bump, ref + bump, exp["restored"]).ok
    assert not compare("bug in float32 only", ours + bump, ref, exp["restored"]).ok


def test_chain_sizes_read_off_checkpoints(chain_run):
    """Without a config, the loaders read every size off the official files."""
    folder, meta, expected, _, exact = chain_run
    dehazer = Dehazer.from_checkpoints(str(folder / "stage1_official.pth"), str(folder / "stage2_official.pt"),
                                       seed=meta["config"]["seed"])
    assert dehazer.stage1.dim == meta["config"]["stage1"]["dim"]
    assert dehazer.stage2.net.dim == meta["config"]["stage2"]["dim"]
    name, exp = next(iter(expected.items()))
    result = dehazer(read_image(folder / "data" / "hazy" / name).tensor[None])
    assert_parity("restored", result.restored, exact[name].restored, exp["restored"])


def test_chain_batch_equals_single(chain_run):
    """An image's result does not depend on its batch-mates."""
    folder, meta, expected, dehazer, exact = chain_run
    names = list(expected)
    batch = torch.cat([read_image(folder / "data" / "hazy" / n).tensor[None] for n in names])
    together = dehazer(batch).restored
    for i, n in enumerate(names):
        assert_parity(f"{n} in a batch", together[i:i + 1], exact[n].restored, expected[n]["restored"])


def test_float16_stage2_file_gives_the_same_result(chain_run, tmp_path):
    """The authors' released stage-2 files are float16: the same weights (exactly float16-
    representable by the recipe) stored that way restore the same images."""
    from fixture_recipe import write_official_checkpoints
    src, meta, expected, _, exact = chain_run
    s1, s2 = write_official_checkpoints(src, tmp_path, stage2_half=True)
    assert next(iter(torch.load(s2, weights_only=False)["model"].values())).dtype == torch.float16
    dehazer = Dehazer.from_checkpoints(str(s1), str(s2), seed=meta["config"]["seed"])
    name, exp = next(iter(expected.items()))
    result = dehazer(read_image(src / "data" / "hazy" / name).tensor[None])
    assert_parity("restored", result.restored, exact[name].restored, exp["restored"])


def test_official_ema_entry_loads_with_weights_ema(chain, tmp_path):
    """An official {'model', 'ema'} file: weights='ema' takes the ema-pytorch copy
    ('ema_model.<ResidualDiffusion keys>'), weights='model' the raw weights."""
    from dsrdmpd.builders import load_stage2
    from fixture_recipe import rebuild_weights
    spec = torch.load(chain / "weights.pt", weights_only=False)["stage2"]
    raw = torch.load(chain / "stage2_official.pt", weights_only=False)["model"]
    ema = {**rebuild_weights({**spec, "seed": spec["seed"] + 1}), **spec["buffers"]}
    obj = {"step": 0, "model": raw, "ema": {**{f"ema_model.{k}": v for k, v in ema.items()},
                                            **{f"online_model.{k}": v for k, v in raw.items()},
                                            "initted": torch.tensor(True), "step": torch.tensor(5)}}
    torch.save(obj, tmp_path / "model-5.pt")
    for weights, source in (("model", raw), ("ema", ema)):
        net = load_stage2(tmp_path / "model-5.pt", weights=weights).net
        assert torch.equal(net.stem.weight, source["model.init_conv.weight"].float())


@pytest.mark.parametrize("change", [{"timesteps": 500}, {"sum_scale": 0.5}])
def test_stage2_schedule_mismatch_is_refused(chain, change):
    """The coefficient buffers of an official file are checked against the configured
    schedule: a wrong timesteps or sum_scale is an error naming the file, not wrong images."""
    from dsrdmpd.builders import infer_stage2_config, load_stage2
    from dsrdmpd.checkpoints import CheckpointError, official_to_project_keys
    raw = torch.load(chain / "stage2_official.pt", weights_only=False)["model"]
    cfg = {**infer_stage2_config(official_to_project_keys(raw, 2)), **change}
    with pytest.raises(CheckpointError, match=r"stage2_official\.pt.*does not match the configured schedule"):
        load_stage2(chain / "stage2_official.pt", cfg)



def test_config_given_as_a_yaml_path(chain, chain_meta, tmp_path):
    """from_checkpoints(config='x.yaml') reads sizes and sampling settings from the file."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"stage1": chain_meta["config"]["stage1"], "stage2": chain_meta["config"]["stage2"],
                               "sampling": {"seed": 7}}))
    ckpts = str(chain / "stage1_official.pth"), str(chain / "stage2_official.pt")
    from_yaml = Dehazer.from_checkpoints(*ckpts, config=str(cfg))
    assert from_yaml.seed == 7
    hazy = read_image(sorted((chain / "data" / "hazy").iterdir())[0]).tensor[None]
    torch.testing.assert_close(from_yaml(hazy).restored, Dehazer.from_checkpoints(*ckpts, seed=7)(hazy).restored,
                               rtol=0, atol=0)
    assert not torch.equal(from_yaml(hazy).restored, Dehazer.from_checkpoints(*ckpts, seed=0)(hazy).restored)
