"""Config files and overrides: bad input is an error naming the file or the key."""
from __future__ import annotations

import pytest

from dsrdmpd.config import ConfigError, load_config

from conftest import ROOT


def test_missing_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,problem", [("stage1: [dim: 3\n", "is not valid YAML"),
                                          ("- a\n- b\n", "must hold a mapping")])
def test_invalid_yaml_names_the_file(tmp_path, text, problem):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"config .*bad\.yaml {problem}"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("item,problem", [("train.lr", "must look like key.sub=value"),
                                          ("stage2.dim.x=3", "'dim' is not a section")])
def test_malformed_override_is_refused(item, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(ROOT / "configs" / "stage2_tiny.yaml", [item])


def test_base_chain_and_overrides_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("stage2: {dim: 16, sum_scale: 0.5}\ntrain: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstage2: {dim: 24}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.lr=2e-4", "stage2.perceptual_decoder=false"])
    assert cfg["stage2"]["dim"] == 24 and cfg["stage2"]["sum_scale"] == 0.5
    assert cfg["train"]["lr"] == 2e-4 and cfg["stage2"]["perceptual_decoder"] is False
    assert cfg["stage2"]["timesteps"] == 1000                            # defaults underneath
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("item, problem", [
    ("train.lr=.nan", r"train\.lr: expected a finite number, got nan"),
    ("train.grad_clip=-.inf", r"train\.grad_clip: expected a finite number, got -inf"),
    ("train.betas=[0.9, .nan]", r"train\.betas: expected a finite list of numbers"),
    ("sampling=3", r"sampling: expected a section of key: value entries, got 3"),
    ("train=[1, 2]", r"train: expected a section"),
    ("stage2.timesteps=4", r"stage2\.sampling_timesteps: 5 is more than the 4 diffusion steps"),
    ("train.seed=9223372036854775808", r"train\.seed: expected an integer <= 9223372036854775807"),
])
def test_non_finite_values_and_non_sections_are_refused_by_key(item, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, [item])
    assert load_config(None, ["stage2.timesteps=5", "sampling.seed=9223372036854775807"])["stage2"]["timesteps"] == 5
