"""Loading the parity fixtures' cases and running our code on them in float32 and float64.

Shared by the parity tests (tests/test_parity.py, tests/test_chain.py) and the report that
measures the rounding ratios (tests/parity_report.py), so that both see the same cases.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Optional

import torch

from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.checkpoints import (STAGE2_CHECKED_BUFFERS, STAGE2_DROPPED_BUFFERS, check_stage2_buffers, load_into,
                                 official_to_project_keys)
from dsrdmpd.diffusion.residual_diffusion import start_noise
from dsrdmpd.imageio import read_image
from dsrdmpd.inference import Dehazer, padded_size

from fixture_recipe import fixture_state_dict
from parity_bounds import compare, exact_arithmetic, float64_copy

S2_BUFFERS = STAGE2_CHECKED_BUFFERS + STAGE2_DROPPED_BUFFERS


def load_fixture(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def stage1_case(path: Path):
    """(fixture, our float32 output, the float64 run of our code) for a stage-1 fixture."""
    fx = load_fixture(path)
    model = build_stage1(fx["config"]).eval()
    load_into(model, official_to_project_keys(fixture_state_dict(fx), 1), str(path))
    with torch.no_grad():
        out = model(fx["input"].float())
        with exact_arithmetic():
            exact = float64_copy(model)(fx["input"].double())
    return fx, out, exact


def stage2_from_fixture(path: Path):
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


def net_exact(fx, diffusion):
    """Both decoders' outputs of a float64 run of ``diffusion``'s network on the fixture's input."""
    with torch.no_grad(), exact_arithmetic():
        return float64_copy(diffusion.net)(fx["net_input"].double(), fx["net_t"].long())


def stage2_exact(fx, diffusion) -> dict:
    """The float64 run of our stage-2 code on the fixture's cases: network outputs, loss,
    5-step sample (fast and straightforward paths are equal in exact arithmetic)."""
    d64 = float64_copy(diffusion)
    steps = fx["config"].get("sampling_timesteps", 5)
    res, noise = net_exact(fx, d64)
    with torch.no_grad(), exact_arithmetic():
        loss = d64.training_loss(fx["gt"].double(), fx["coarse"].double(), fx["hazy"].double(),
                                 t=fx["loss_t"].long(), noise=fx["loss_noise"].double())
        out, start = d64.sample(fx["coarse"].double(), fx["hazy"].double(), noise=fx["sample_init_noise"].double(),
                                steps=steps, return_start=True)
    return {"res": res, "noise": noise, "loss": loss, "sample": out, "start": start}


@functools.lru_cache(maxsize=None)
def stage2_case(path: Path):
    """(fixture, our ResidualDiffusion, its float64 results), computed once per fixture."""
    fx, diffusion = stage2_from_fixture(path)
    return fx, diffusion, stage2_exact(fx, diffusion)


def stage2_output_parity(fx, diffusion, exact) -> list:
    """Parity of both decoders' outputs (a list of Parity, one per decoder)."""
    with torch.no_grad():
        res, noise = diffusion.net(fx["net_input"].float(), fx["net_t"].long())
    return [compare("residual decoder", res, exact["res"], fx["net_output"][0]),
            compare("noise decoder", noise, exact["noise"], fx["net_output"][1])]


def stage2_sample(fx, diffusion, fast: bool):
    """Our float32 5-step sample of the fixture: (output, start)."""
    steps = fx["config"].get("sampling_timesteps", 5)
    return diffusion.sample(fx["coarse"], fx["hazy"], noise=fx["sample_init_noise"], steps=steps,
                            fast=fast, return_start=True)


def chain_dehazer(folder: Path, checkpoints: Path, **options):
    """A chain fixture's (metadata, expected outputs, Dehazer): the Dehazer loads the
    official-format files in ``checkpoints`` (fixture_recipe.write_official_checkpoints)
    with the sizes and seed of the fixture's expected_metrics.json; ``options`` go to the
    Dehazer (precision, channels_last, ...)."""
    meta = json.loads((folder / "expected_metrics.json").read_text())
    expected = torch.load(folder / "expected_outputs.pt", map_location="cpu", weights_only=False)
    cfg = meta["config"]
    dehazer = Dehazer.from_checkpoints(str(checkpoints / "stage1_official.pth"), str(checkpoints / "stage2_official.pt"),
                                       config={"stage1": cfg["stage1"], "stage2": cfg["stage2"]}, seed=cfg["seed"],
                                       **options)
    return meta, expected, dehazer


def exact_chain(dehazer: Dehazer, hazy: torch.Tensor, noise: Optional[torch.Tensor] = None):
    """The same Dehazer (padding, tiles, start noise from its seed or ``noise``, cropping)
    with both networks in float64. Stage boundaries stay as in the float32 code (the coarse
    image and tile blending are float32: half an ulp each, far below the networks' rounding)."""
    twin = copy.copy(dehazer)
    twin.stage1 = float64_copy(dehazer.stage1, cast_inputs=True)
    twin.stage2 = float64_copy(dehazer.stage2)
    twin.stage2.net.register_forward_pre_hook(lambda m, args: (args[0].double(), *args[1:]))
    if noise is None:
        noise = start_noise((hazy.shape[0], 3, *padded_size(*hazy.shape[-2:])), dehazer.seed)   # float32, as drawn
    with exact_arithmetic():
        return twin(hazy, noise=noise)


def chain_names(folder: Path) -> list:
    """The chain's image names (sorted, as in expected_outputs.pt)."""
    return sorted(p.name for p in (folder / "data" / "hazy").iterdir())


@functools.lru_cache(maxsize=None)
def chain_exact_results(folder: Path) -> dict:
    """{image name: DehazeResult} of the float64 run of a laid-out chain folder's Dehazer
    (conftest: ``chain`` / ``any_chain``), one image at a time; computed once per folder
    (the costly part of the chain tests, shared by tests/test_chain.py and
    tests/test_speed_options.py through conftest's ``chain_exact`` fixture)."""
    _, _, dehazer = chain_dehazer(folder, folder)
    return {name: exact_chain(dehazer, read_image(folder / "data" / "hazy" / name).tensor[None])
            for name in chain_names(folder)}
