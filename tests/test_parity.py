"""Parity with the authors' code: every size and setting is read from the fixture."""
from __future__ import annotations

import json

import pytest
import torch

from dsrdmpd.builders import build_stage1, build_stage2, infer_stage2_config
from dsrdmpd.checkpoints import (STAGE1_RULES, STAGE2_CHECKED_BUFFERS, STAGE2_DROPPED_BUFFERS, check_stage2_buffers,
                                 load_into, official_to_project_keys, rename_key)
from dsrdmpd.models import MCESSUNet, ResidualDiffusionUNet

from conftest import CUSTOM_PARITY, PARITY_DIRS, fixture_files, load_fixture, parity_paths, require
from fixture_recipe import fixture_state_dict

TOL = dict(rtol=1e-4, atol=1e-5)
S2_BUFFERS = STAGE2_CHECKED_BUFFERS + STAGE2_DROPPED_BUFFERS


@pytest.mark.parametrize("path", fixture_files("stage1_mcess_unet*.pt"))
def test_stage1_output(path):
    fx = load_fixture(path)
    model = build_stage1(fx["config"]).eval()
    load_into(model, official_to_project_keys(fixture_state_dict(fx), 1), str(path))
    with torch.no_grad():
        out = model(fx["input"].float())
    assert out.shape == fx["output"].shape
    torch.testing.assert_close(out, fx["output"].float(), **TOL)


def _stage2_from_fixture(path):
    fx = load_fixture(path)
    cfg = dict(fx["config"])
    sd = official_to_project_keys(fixture_state_dict(fx), 2)
    has_fusion = any(k.startswith("residual_decoder.fusions.") for k in sd)
    expected = cfg.get("perceptual_decoder", "perceptual" in path.name)
    assert has_fusion == bool(expected), "fixture name / config and its keys disagree on the decoder variant"
    cfg["perceptual_decoder"] = has_fusion
    diffusion = build_stage2(cfg).eval()
    check_stage2_buffers(sd, diffusion.schedule, str(path))
    load_into(diffusion.net, {k: v for k, v in sd.items() if k not in S2_BUFFERS}, str(path))
    return fx, diffusion


STAGE2_FIXTURES = fixture_files("stage2_perceptual*.pt") + fixture_files("stage2_plain*.pt")


@pytest.mark.parametrize("path", STAGE2_FIXTURES)
def test_stage2_network_outputs(path):
    fx, diffusion = _stage2_from_fixture(path)
    with torch.no_grad():
        res, noise = diffusion.net(fx["net_input"].float(), fx["net_t"].long())
    torch.testing.assert_close(res, fx["net_output"][0].float(), **TOL)
    torch.testing.assert_close(noise, fx["net_output"][1].float(), **TOL)


@pytest.mark.parametrize("path", STAGE2_FIXTURES)
@pytest.mark.parametrize("full_network", [False, True], ids=["residual-only", "both-decoders"])
def test_stage2_training_loss(path, full_network):
    fx, diffusion = _stage2_from_fixture(path)
    with torch.no_grad():
        loss = diffusion.training_loss(fx["gt"], fx["coarse"], fx["hazy"], t=fx["loss_t"].long(),
                                       noise=fx["loss_noise"], full_network=full_network)
    torch.testing.assert_close(loss, fx["loss"].float(), **TOL)


@pytest.mark.parametrize("path", STAGE2_FIXTURES)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_stage2_sample(path, fast):
    fx, diffusion = _stage2_from_fixture(path)
    steps = fx["config"].get("sampling_timesteps", 5)
    out, start = diffusion.sample(fx["coarse"], fx["hazy"], noise=fx["sample_init_noise"], steps=steps,
                                  fast=fast, return_start=True)
    torch.testing.assert_close(start, fx["sample_start"].float(), **TOL)
    torch.testing.assert_close(out, fx["sample_output"].float(), **TOL)


def test_parity_folders_hold_fixtures():
    """A mistyped $DSRDMPD_PARITY_DIR must not turn every parity test into a skip."""
    found = parity_paths("*.pt") + parity_paths("chain")
    assert found, f"no parity fixtures in {', '.join(map(str, PARITY_DIRS))}"


def _manifest():
    paths = parity_paths("official_state_dict_keys.json")
    return json.loads(paths[0].read_text()) if paths else None


@pytest.mark.parametrize("name", ["stage1_dim64", "stage2_perceptual_dim64", "stage2_plain_dim64"])
def test_full_size_manifest_is_accounted_for(name):
    manifest = _manifest()
    if manifest is None:
        if not CUSTOM_PARITY:
            require(None)
        pytest.skip("no official_state_dict_keys.json in the parity folders")
    shapes = {k: torch.Size(v) for k, v in manifest[name].items()}
    if name.startswith("stage1"):
        model = MCESSUNet(dim=64)
        mapped = {rename_key(k, STAGE1_RULES): s for k, s in shapes.items()}
        assert len(mapped) == len(shapes), "two official keys map to one project key"
    else:
        sd = official_to_project_keys({k: torch.empty(0) for k in shapes}, 2)
        back = dict(zip(sd.keys(), shapes.values()))
        assert len(sd) == len(shapes), "two official keys map to one project key"
        dropped = {k for k in back if k in S2_BUFFERS}
        assert dropped == set(S2_BUFFERS), f"unexpected buffer set {sorted(dropped)}"
        mapped = {k: s for k, s in back.items() if k not in dropped}
        cfg = infer_stage2_config({k: torch.empty(s) for k, s in mapped.items()})
        assert cfg["dim"] == 64 and cfg["dim_mults"] == [1, 2, 4, 8]
        assert cfg["perceptual_decoder"] == ("perceptual" in name)
        model = ResidualDiffusionUNet(64, (1, 2, 4, 8), perceptual_decoder="perceptual" in name)
    own = {k: v.shape for k, v in model.state_dict().items()}
    assert set(own) == set(mapped), (sorted(set(own) - set(mapped))[:5], sorted(set(mapped) - set(own))[:5])
    assert all(own[k] == mapped[k] for k in own)
