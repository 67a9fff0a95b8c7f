"""Checkpoints never run code: every loader reads with weights_only (or safetensors), a file
that needs arbitrary unpickling is refused on one line unless the user opts in, the
official formats and our own (old and new) load safely, non-finite weights are refused,
and the safetensors weights folder (converter, SHA-256, --weights-dir) round-trips."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ema_pytorch import EMA

from dsrdmpd.builders import load_stage, load_stage1, load_stage2
from dsrdmpd.checkpoints import (CheckpointError, UntrustedCheckpointError, official_to_project_keys, read_checkpoint,
                                 save_safetensors)
from dsrdmpd.cli import convert as convert_cli
from dsrdmpd.cli import dehaze, demo, evaluate, train
from dsrdmpd.convert import convert_checkpoints
from dsrdmpd.data.synthetic import make_synthetic_dataset
from dsrdmpd.inference import Dehazer
from dsrdmpd.weights_folder import HASHES_NAME, read_hashes, sha256_file

from conftest import ROOT


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file: a stand-in for a payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def official(chain):
    return chain / "stage1_official.pth", chain / "stage2_official.pt"


@pytest.fixture(scope="module")
def hazy_dir(chain):
    return chain / "data" / "hazy"


@pytest.fixture
def evil(official, tmp_path):
    """Official-format files of both stages with one extra entry whose unpickling would
    create ``marker``; plus a training checkpoint with it (for --resume)."""
    marker = tmp_path / "MARKER"
    s1 = torch.load(official[0], weights_only=True)
    s2 = torch.load(official[1], weights_only=True)
    paths = {"stage1": tmp_path / "evil_stage1.pth", "stage2": tmp_path / "evil_stage2.pt",
             "resume": tmp_path / "evil_last.pt"}
    torch.save({**s1, "payload": CreatesMarker(marker)}, paths["stage1"])
    torch.save({**s2, "payload": CreatesMarker(marker)}, paths["stage2"])
    torch.save({"format": "dsrdmpd", "version": 1, "stage": 1, "optimizer": {}, "payload": CreatesMarker(marker)},
               paths["resume"])
    return paths, marker


def _one_line_refusal(capsys, code, path):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(path) in lines[0] and "--trust-checkpoint" in lines[0] and "io.open" in lines[0], lines[0]


def test_the_payload_runs_when_unpickled_in_full(evil):
    """The stand-in is real: torch.load(weights_only=False) creates the marker."""
    paths, marker = evil
    torch.load(paths["stage2"], weights_only=False)
    assert marker.exists()


def test_every_command_refuses_a_file_that_would_run_code(evil, official, hazy_dir, tmp_path, capsys):
    paths, marker = evil
    data = make_synthetic_dataset(tmp_path / "syn", n_train=2, n_test=1, size=64, seed=1, n_valid=1)
    runs = [
        (dehaze.main, ["--stage1", paths["stage1"], "--stage2", official[1], "--input", hazy_dir,
                       "--output", tmp_path / "o1"], paths["stage1"]),
        (dehaze.main, ["--stage1", official[0], "--stage2", paths["stage2"], "--input", hazy_dir,
                       "--output", tmp_path / "o2"], paths["stage2"]),
        (evaluate.main, ["--stage1", official[0], "--stage2", paths["stage2"], "--hazy-dir", hazy_dir,
                         "--gt-dir", hazy_dir.parent / "GT", "--output", tmp_path / "o3"], paths["stage2"]),
        (demo.main, ["--stage1", paths["stage1"], "--stage2", official[1], "--input", hazy_dir,
                     "--output", tmp_path / "o4", "--device", "cpu"], paths["stage1"]),
        (convert_cli.main, ["--stage2", paths["stage2"], "--output", tmp_path / "o5"], paths["stage2"]),
        (train.main_stage2, ["--config", ROOT / "configs" / "stage2_tiny.yaml", "--run-dir", tmp_path / "r1",
                             "--set", f"data.root={data}", "--set", f"train.stage1_checkpoint={paths['stage1']}",
                             "--set", "train.device=cpu", "--max-steps", "1"], paths["stage1"]),
        (train.main_stage1, ["--config", ROOT / "configs" / "stage1_tiny.yaml", "--run-dir", tmp_path / "r2",
                             "--set", f"data.root={data}", "--set", "train.batch_size=2", "--set", "train.device=cpu",
                             "--resume", paths["resume"]], paths["resume"]),
    ]
    for fn, argv, bad in runs:
        code = fn([str(a) for a in argv])
        _one_line_refusal(capsys, code, bad)
        assert not marker.exists(), f"{fn.__module__} ran the payload"
    for call in (lambda: Dehazer.from_checkpoints(str(paths["stage1"]), str(official[1])),
                 lambda: Dehazer.from_checkpoints(str(official[0]), str(paths["stage2"]))):
        with pytest.raises(UntrustedCheckpointError, match="io.open"):
            call()
    assert not marker.exists()
    assert not (tmp_path / "o5" / "stage2").exists()


def test_trusting_a_file_is_an_explicit_choice(official, hazy_dir, tmp_path, capsys):
    """A harmless pickled object (a NumPy scalar) beside the weights: refused by default,
    loaded with trust=True / --trust-checkpoint, with the same result as the plain file."""
    s2 = torch.load(official[1], weights_only=True)
    noted = tmp_path / "noted_stage2.pt"
    torch.save({**s2, "note": np.float64(1.5)}, noted)
    with pytest.raises(UntrustedCheckpointError, match="numpy"):
        read_checkpoint(noted)
    assert read_checkpoint(noted, trust=True)["note"] == 1.5
    hazy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = Dehazer.from_checkpoints(str(official[0]), str(official[1]))(hazy).restored
    got = Dehazer.from_checkpoints(str(official[0]), str(noted), trust=True)(hazy).restored
    assert torch.equal(got, want)
    base = ["--stage1", official[0], "--stage2", noted, "--input", hazy_dir]
    assert dehaze.main([str(a) for a in base + ["--output", tmp_path / "no"]]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert dehaze.main([str(a) for a in base + ["--output", tmp_path / "yes", "--trust-checkpoint"]]) == 0
    assert sorted(p.name for p in (tmp_path / "yes" / "restored").iterdir()) == sorted(
        p.name for p in hazy_dir.iterdir())


def test_official_formats_load_with_weights_only(official, tmp_path):
    """The authors' three forms: an fp16 stage-1 state dict, {'step', 'model'}, and the full
    trainer file with a real Adam state, a real ema-pytorch state and a GradScaler state."""
    s1 = torch.load(official[0], weights_only=True)
    assert next(iter(s1.values())).dtype == torch.float16
    assert isinstance(read_checkpoint(official[0]), dict) and isinstance(read_checkpoint(official[1]), dict)
    raw = torch.load(official[1], weights_only=True)["model"]
    model = load_stage2(official[1])
    trained = copy.deepcopy(model.net)            # the authors' trainer: Adam on the network, ema-pytorch
    opt = torch.optim.Adam(trained.parameters(), lr=8e-5)
    sum((p * p).sum() for p in trained.parameters()).backward()
    opt.step()
    ema = EMA(trained, beta=0.995, update_every=1, update_after_step=0)
    ema.update()
    scaler = torch.amp.GradScaler("cpu")
    to_official = {p: o for o, p in zip(raw, official_to_project_keys(raw, 2))}
    ema_sd = {("ema_model." + to_official[k[len("ema_model."):]] if k.startswith("ema_model.") else k): v
              for k, v in ema.state_dict().items()}
    full = tmp_path / "model-30.pt"
    torch.save({"step": 27000, "model": raw, "opt": opt.state_dict(), "ema": ema_sd,
                "scaler": scaler.state_dict(), "version": "1.9.0"}, full)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(full)) == []
    obj = read_checkpoint(full)
    assert obj["opt"]["state"][0]["exp_avg"].shape == next(model.net.parameters()).shape
    assert obj["scaler"]["scale"] == scaler.state_dict()["scale"]
    for weights, want in (("model", model.net), ("ema", ema.ema_model)):
        loaded = load_stage2(full, weights=weights).net.state_dict()
        for k, v in want.state_dict().items():
            assert torch.equal(loaded[k], v), (weights, k)


def test_non_finite_weights_are_refused(official, tmp_path, hazy_dir, capsys):
    s1 = torch.load(official[0], weights_only=True)
    s2 = torch.load(official[1], weights_only=True)
    key1, key2 = sorted(s1)[3], sorted(s2["model"])[5]
    bad1, bad2 = dict(s1), {**s2, "model": dict(s2["model"])}
    bad1[key1] = bad1[key1].clone().flatten().index_fill(0, torch.tensor([0]), float("nan")).view_as(s1[key1])
    bad2["model"][key2] = bad2["model"][key2].clone().fill_(float("inf"))
    p1, p2 = tmp_path / "nan_stage1.pth", tmp_path / "inf_stage2.pt"
    torch.save(bad1, p1)
    torch.save(bad2, p2)
    with pytest.raises(CheckpointError, match=f"{p1}.*'{key1}'.*non-finite"):
        load_stage1(p1)
    with pytest.raises(CheckpointError, match=f"{p2}.*'{key2}'.*non-finite"):
        load_stage2(p2)
    # ours: a project .pt (EMA weights) and a safetensors file
    model, stage_cfg = load_stage(official[1], 2)
    net = {k: v.clone() for k, v in model.net.state_dict().items()}
    bad_net = {**net, "stem.weight": torch.full_like(net["stem.weight"], float("nan"))}
    ours = tmp_path / "ours.pt"
    torch.save({"format": "dsrdmpd", "version": 1, "stage": 2, "config": {"stage2": stage_cfg}, "model": net,
                "ema": bad_net}, ours)
    assert load_stage2(ours, weights="model") is not None
    with pytest.raises(CheckpointError, match="'stem.weight'"):
        load_stage2(ours, weights="ema")
    from safetensors.torch import save_file
    st = tmp_path / "bad.safetensors"
    save_file(bad_net, str(st), metadata={"format": "dsrdmpd", "format_version": "1", "stage": "2",
                                           "weights": "model", "config": json.dumps(stage_cfg)})
    with pytest.raises(CheckpointError, match=f"{st}.*'stem.weight'"):
        load_stage2(st)
    with pytest.raises(CheckpointError, match="'stem.weight'"):
        save_safetensors(bad_net, tmp_path / "never.safetensors", 2, {})
    assert not (tmp_path / "never.safetensors").exists()
    code = dehaze.main([str(a) for a in ["--stage1", p1, "--stage2", official[1], "--input", hazy_dir,
                                         "--output", tmp_path / "out"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(p1) in err[0] and key1 in err[0]


def test_converter_round_trip_hashes_and_weights_dir(official, hazy_dir, tmp_path, capsys):
    folder = tmp_path / "weights"
    one = tmp_path / "one"                  # one of the chain's images is enough for the command-line runs
    one.mkdir()
    first = sorted(hazy_dir.iterdir())[0]
    (one / first.name).write_bytes(first.read_bytes())
    hazy_dir = one
    code = convert_cli.main(["--stage1", str(official[0]), "--stage2", str(official[1]), "--output", str(folder)])
    out = capsys.readouterr().out
    assert code == 0
    hashes = read_hashes(folder / HASHES_NAME)
    assert sorted(hashes) == ["stage1/model.safetensors", "stage2/model.safetensors"]   # no EMA in {'step','model'}
    for name, digest in hashes.items():
        assert digest == sha256_file(folder / name) and f"{digest}  {folder / name}" in out
    meta = json.loads((folder / "config.json").read_text())
    assert meta["config"]["stage2"]["dim"] == load_stage2(official[1]).net.dim
    hazy = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    want = Dehazer.from_checkpoints(str(official[0]), str(official[1]))(hazy).restored
    assert torch.equal(Dehazer.from_pretrained(folder)(hazy).restored, want)
    # the command line: --weights-dir gives the same images as --stage1/--stage2
    assert dehaze.main([str(a) for a in ["--weights-dir", folder, "--input", hazy_dir, "--output", tmp_path / "a"]]) == 0
    assert dehaze.main([str(a) for a in ["--stage1", official[0], "--stage2", official[1], "--input", hazy_dir,
                                         "--output", tmp_path / "b"]]) == 0
    for p in (tmp_path / "b" / "restored").iterdir():
        assert (tmp_path / "a" / "restored" / p.name).read_bytes() == p.read_bytes()
    capsys.readouterr()
    # a changed byte is caught before loading, naming the file
    target = folder / "stage2" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{target}: SHA-256"):
        Dehazer.from_pretrained(folder)
    code = dehaze.main([str(a) for a in ["--weights-dir", folder, "--input", hazy_dir, "--output", tmp_path / "c"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(target) in err[0] and "SHA-256" in err[0]
    with pytest.raises(CheckpointError, match="SHA-256"):     # a hashes dict given by the caller
        Dehazer.from_pretrained(folder, hashes={"stage2/model.safetensors": hashes["stage2/model.safetensors"]})


def test_converting_our_training_checkpoint_keeps_the_ema(official, tmp_path):
    """A project checkpoint with model and EMA weights -> both safetensors files; each
    loads to exactly the weights of the .pt file."""
    model, stage_cfg = load_stage(official[1], 2)
    net = {k: v.clone() for k, v in model.net.state_dict().items()}
    ema = {k: v + 0.25 if v.is_floating_point() else v for k, v in net.items()}
    cfg = {"stage2": stage_cfg}
    pt = tmp_path / "best.pt"
    torch.save({"format": "dsrdmpd", "version": 1, "stage": 2, "config": cfg, "model": net, "ema": ema}, pt)
    hashes = convert_checkpoints(tmp_path / "w", stage2=pt, report=lambda line: None)
    assert sorted(hashes) == ["stage2/model.ema.safetensors", "stage2/model.safetensors"]
    for weights in ("model", "ema"):
        file = tmp_path / "w" / ("stage2/model.ema.safetensors" if weights == "ema" else "stage2/model.safetensors")
        a, b = load_stage2(pt, weights=weights).net.state_dict(), load_stage2(file, weights=weights).net.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_earlier_versions_load_without_trust(tmp_path):
    """Training checkpoints written before the RNG state became plain data hold NumPy arrays:
    they load safely (array globals only), and their NumPy state is restored."""
    from dsrdmpd.training.common import restore_rng
    state = np.random.RandomState(5).get_state()
    old = {"python": random.Random(3).getstate(), "numpy": state, "torch": torch.get_rng_state(), "generators": {}}
    path = tmp_path / "old_last.pt"
    torch.save({"format": "dsrdmpd", "version": 1, "stage": 1, "rng": old, "optimizer": {}}, path)
    assert "numpy" in " ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    back = read_checkpoint(path)
    restore_rng(back["rng"], {})
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert random.random() == random.Random(3).random()


def test_training_random_state_is_plain_data(tmp_path):
    """What a trainer saves of its random streams loads with a bare weights_only=True (no
    allow-list) and restores every stream exactly."""
    from dsrdmpd.training.common import capture_rng, restore_rng
    gens = {"loss": torch.Generator().manual_seed(11)}
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    path = tmp_path / "rng.pt"
    torch.save({"rng": [capture_rng(gens)]}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    state = torch.load(path, weights_only=True)["rng"][0]
    draw = lambda: (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2).tolist(),
                    torch.rand(2, generator=gens["loss"]).tolist())
    first = draw()
    draw()
    restore_rng(state, gens)
    assert draw() == first


def test_models_are_given_one_way(official, hazy_dir, tmp_path, capsys):
    base = ["--input", str(hazy_dir), "--output", str(tmp_path / "o")]
    assert dehaze.main(base) == 2
    assert "give --stage1 and --stage2" in capsys.readouterr().err
    assert dehaze.main(base + ["--stage1", str(official[0]), "--stage2", str(official[1]),
                               "--weights-dir", str(tmp_path)]) == 2
    assert "either --weights-dir or --stage1/--stage2" in capsys.readouterr().err
    assert dehaze.main(base + ["--weights-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'}: not a dsrdmpd weights folder" in capsys.readouterr().err
