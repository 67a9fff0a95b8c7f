"""The authors' training recipe: no checkpoint chosen on a test split, snapshots kept as
they kept theirs, their resizes, and the coarse-only stage-2 variant (input_condition)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dsrdmpd.builders import build_stage2, load_stage2
from dsrdmpd.config import load_config
from dsrdmpd.data import PairedImageDataset, find_pairs
from dsrdmpd.data.synthetic import make_synthetic_dataset
from dsrdmpd.evaluation import resize_image
from dsrdmpd.imageio import read_image, write_image
from dsrdmpd.training import Stage1Trainer, Stage2Trainer
from dsrdmpd.training.common import TEST_SPLIT_NAMES, holdout_indices, plan_data

from conftest import ROOT, load_fixture, parity_paths
from fixture_recipe import fixture_state_dict


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=8, n_test=2, size=64, seed=3, n_valid=2)


@pytest.fixture(scope="module")
def stage1_last(tiny_stage1):
    return tiny_stage1.last         # a training checkpoint, as train.stage1_checkpoint often names


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_selects_on_a_test_split(path):
    cfg = load_config(path)
    split = (cfg.get("data") or {}).get("val_split")
    assert not split or str(split).lower() not in TEST_SPLIT_NAMES, f"{path.name} validates on {split!r}"
    assert "best.pt" not in str((cfg.get("train") or {}).get("stage1_checkpoint", "")) or split, \
        f"{path.name} uses a stage-1 best.pt from a run that has no validation split"


def test_holdout_is_spread_and_disjoint(data_root):
    assert holdout_indices(10, 2) == [2, 7] and holdout_indices(900, 3) == [150, 450, 750]
    plan = plan_data({"preset": "rsid", "root": str(data_root), "val_holdout": 3})
    all_keys = [p.key for p in find_pairs(data_root / "train" / "hazy", data_root / "train" / "GT")]
    assert [p.key for p in plan.val] == [all_keys[i] for i in holdout_indices(8, 3)]
    assert sorted(p.key for p in plan.train + plan.val) == sorted(all_keys)
    assert not {p.key for p in plan.train} & {p.key for p in plan.val}
    assert plan.val_source == "hold-out of 3 training pairs" and not plan.val_on_test
    with pytest.raises(ValueError, match="both set"):
        plan_data({"preset": "rsid", "root": str(data_root), "val_holdout": 3, "val_split": "valid"})
    with pytest.raises(ValueError, match="between 1 and 7"):
        plan_data({"preset": "rsid", "root": str(data_root), "val_holdout": 8})


def test_validation_on_test_is_loud_and_chooses_nothing(data_root, tmp_path, capsys):
    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", [f"data.root={data_root}", "data.val_split=test",
                                                              "train.epochs=2", "train.batch_size=4"])
    Stage1Trainer(cfg, tmp_path).train()
    assert "validating on the test split" in capsys.readouterr().out
    assert "test split" in (tmp_path / "VALIDATION_ON_TEST_SPLIT.txt").read_text()
    assert (tmp_path / "val_log.csv").read_text().count("\n") == 3          # header + 2 epochs, still logged
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_stage2_snapshots_and_best_chosen_with_the_evaluated_weights(data_root, stage1_last, tmp_path):
    cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                      [f"data.root={data_root}", f"train.stage1_checkpoint={stage1_last}", "train.steps=6",
                       "train.keep_every=2", "train.val_every=3", "train.save_every=100", "data.val_limit=1"])
    Stage2Trainer(cfg, tmp_path).train()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_0000002.pt", "step_0000004.pt",
                                                               "step_0000006.pt"]
    snap = torch.load(ckpts / "step_0000004.pt", weights_only=False)
    assert snap["step"] == 4 and snap["ema"] is None and "optimizer" not in snap   # raw weights only: val_weights model
    best = torch.load(ckpts / "best.pt", weights_only=False)
    assert best["selected_with"] == "model" and best["selected_on"] == "split 'valid'"
    assert best["step"] in (3, 6)
    # the snapshot at step 4 is the model as it was then: it differs from the final one
    last = torch.load(ckpts / "last.pt", weights_only=False)
    assert any(not torch.equal(snap["model"][k], last["model"][k]) for k in snap["model"])
    assert load_stage2(ckpts / "step_0000004.pt").net.dim == 8


def test_training_resize_is_bilinear_on_tensors_without_antialias(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_image(torch.rand(3, 40, 56, generator=g), tmp_path / "hazy" / f"{i}.png")
        write_image(torch.rand(3, 40, 56, generator=g), tmp_path / "GT" / f"{i}.png")
    pairs = find_pairs(tmp_path / "hazy", tmp_path / "GT")
    item = PairedImageDataset(pairs, resize=64)[0]
    hazy = read_image(pairs[0].hazy).tensor
    # reference: the authors' Resize on a tensor (torchvision < 0.17 did not antialias tensors)
    ref = F.interpolate(hazy[None], size=(64, 64), mode="bilinear", align_corners=False, antialias=False)[0]
    torch.testing.assert_close(item["hazy"], ref, rtol=0, atol=1e-6)
    bicubic = F.interpolate(hazy[None], size=(64, 64), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    assert (item["hazy"] - bicubic).abs().max() > 1e-2
    shrunk = PairedImageDataset(pairs, resize=16)[0]["gt"]
    ref = F.interpolate(read_image(pairs[0].gt).tensor[None], size=(16, 16), mode="bilinear", align_corners=False,
                        antialias=False)[0]
    torch.testing.assert_close(shrunk, ref, rtol=0, atol=1e-6)


def test_test_time_resize_is_pil_bilinear_on_the_8bit_image(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "x.png"
    write_image(torch.rand(3, 50, 70, generator=g), path)
    for size in (32, 96):      # shrinking (PIL widens its filter) and enlarging
        with Image.open(path) as im:
            ref = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        ours = resize_image(read_image(path).tensor[None], size, 8)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, ref)
    naive = F.interpolate(read_image(path).tensor[None], size=(32, 32), mode="bilinear", align_corners=False)
    assert (naive[0].permute(1, 2, 0).numpy() - resize_image(read_image(path).tensor[None], 32, 8)[0]
            .permute(1, 2, 0).numpy()).__abs__().max() > 1e-2


QUARTER_LEVEL = 1 / 1020     # as parity_bounds' cap: far below any wrong-variant load, far above rounding


def test_coarse_only_variant_ignores_the_hazy_image_and_loads_by_shape(tmp_path):
    torch.manual_seed(0)
    model = build_stage2({"dim": 8, "input_condition": False}).eval()
    assert model.net.stem.weight.shape[1] == 6
    c, x = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    a = model.sample(c, x, seed=3)
    b = model.sample(c, torch.rand(1, 3, 32, 32), seed=3)
    assert torch.equal(a, b)                           # the hazy image plays no part
    loss = model.training_loss(torch.rand(1, 3, 32, 32), c, x, t=torch.tensor([500]), noise=torch.randn(1, 3, 32, 32))
    assert torch.isfinite(loss)
    # the authors' file of this variant (6-channel stem) loads without a config, as this variant
    for path in parity_paths("stage2_*coarse_only*.pt"):
        fx = load_fixture(path)
        torch.save({"step": 0, "model": fixture_state_dict(fx)}, tmp_path / "model-1.pt")
        loaded = load_stage2(tmp_path / "model-1.pt")
        assert loaded.net.input_condition is False and loaded.net.stem.weight.shape[1] == 6
        assert loaded.net.perceptual_decoder == fx["config"]["perceptual_decoder"]
        # loaded as this variant, it gives the authors' samples; their exact parity (bounds derived
        # from float32 rounding, every seed) is test_parity's: here a quarter of an 8-bit level
        torch.testing.assert_close(loaded.sample(fx["coarse"], fx["hazy"], noise=fx["sample_init_noise"]),
                                   fx["sample_output"].float(), rtol=0, atol=QUARTER_LEVEL)


def test_coarse_only_variant_trains(data_root, stage1_last, tmp_path):
    cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                      [f"data.root={data_root}", f"train.stage1_checkpoint={stage1_last}", "train.steps=3",
                       "train.val_every=3", "train.save_every=3", "data.val_limit=1", "stage2.input_condition=false"])
    Stage2Trainer(cfg, tmp_path).train()
    model = load_stage2(tmp_path / "checkpoints" / "last.pt")
    assert model.net.input_condition is False and model.net.stem.weight.shape[1] == 6
