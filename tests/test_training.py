"""Trainers on tiny models and synthetic pairs: learning, exact resume, atomic
checkpoints, the command line."""
from __future__ import annotations

import copy
import fnmatch
import gc
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrdmpd.atomicfile import temporary_name_pattern
from dsrdmpd.builders import load_stage1, load_stage2
from dsrdmpd.config import load_config
from dsrdmpd.training import Stage1Trainer, Stage2Trainer, stage1_loss
from dsrdmpd.cli.train import train_main

from conftest import ROOT, tiny_stage1_config


@pytest.fixture(scope="module")
def data_root(synthetic_root):
    return synthetic_root


def stage1_cfg(root, **train):
    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml",
                      [f"data.root={root}", "data.val_limit=1", "train.batch_size=2", "train.epochs=3"])
    cfg["train"].update(train)
    return cfg


@pytest.fixture(scope="module")
def stage1_ckpt(tiny_stage1):
    return tiny_stage1.weights


def stage2_cfg(root, ckpt, **train):
    cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                      [f"data.root={root}", f"train.stage1_checkpoint={ckpt}", "data.val_limit=1"])
    cfg["train"].update(train)
    return cfg


def test_stage1_loss_is_511_l1_plus_mse():
    out, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    ref = 511 * (out - gt).abs().mean() + ((out - gt) ** 2).mean()
    torch.testing.assert_close(stage1_loss(out, gt), ref, rtol=1e-5, atol=1e-4)


def _losses(run_dir):
    import csv
    with open(run_dir / "train_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_stage2_learns(data_root, stage1_ckpt, tmp_path):
    Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=20, val_every=20, save_every=20), tmp_path).train()
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for weights in ("model", "ema"):
        model = load_stage2(tmp_path / "checkpoints" / "best.pt", weights=weights)
        assert model.net.dim == 8
    assert sorted(p.name for p in (tmp_path / "samples" / "step_0000020").iterdir()) == ["0000.png"]


def _states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_straight_and_resumed(make, tmp_path, check=lambda trainer: None):
    """Train once straight through (run a/) and once killed after 5 steps then resumed (run b/);
    ``make(run_dir, resume=None)`` builds a trainer, ``check`` looks at the straight one before
    it trains. Returns (the straight trainer, last.pt of a, last.pt of b)."""
    straight = make(tmp_path / "a")
    check(straight)
    straight.train()
    interrupted = make(tmp_path / "b")
    interrupted.train(max_steps=5)          # stops mid-epoch and writes last.pt
    del interrupted
    at_stop = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    resumed = make(tmp_path / "b", resume="auto")
    assert resumed.step == 5
    assert resumed.resume_changes(at_stop) == []          # nothing to warn of: the same settings and pairs
    longer = copy.deepcopy(at_stop["config"])            # a longer run: stage 1's cosine schedule changes with it,
    longer["train"][resumed.length_key] += 1             # stage 2 (constant rate) repeats the same steps
    assert bool(resumed.resume_changes({**at_stop, "config": longer})) == (resumed.stage == 1)
    resumed.train()
    assert (tmp_path / "b" / "resumes.txt").read_text().endswith(": same settings and training pairs\n")
    load = lambda run: torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
    return straight, load("a"), load("b")


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_bit_exact(stage, data_root, stage1_ckpt, tmp_path):
    """Killed after 5 steps and resumed, a run ends bit-identical to a straight one. The
    straight stage-1 run (2 epochs of 4 steps) also shows that stage 1 learns (stage 2:
    test_stage2_learns) and that its best.pt loads."""
    if stage == 1:
        make = lambda run, resume=None: Stage1Trainer(stage1_cfg(data_root, epochs=2, log_every=1), run, resume)
    else:
        make = lambda run, resume=None: Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=8, val_every=4,
                                                                 save_every=100, ema_update_every=1,
                                                                 ema_update_after_step=0), run, resume)
    straight, sa, sb = run_straight_and_resumed(make, tmp_path)
    assert sa["step"] == sb["step"] == straight.total_steps()
    _states_equal(sa["model"], sb["model"])
    if stage == 2:
        _states_equal(sa["ema"], sb["ema"])
        assert any(not torch.equal(sa["ema"][k], sa["model"][k]) for k in sa["model"])   # a real average
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    if stage == 1:
        losses = _losses(tmp_path / "a")
        assert len(losses) == 8 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
        assert load_stage1(tmp_path / "a" / "checkpoints" / "best.pt").dim == 32


def test_resume_names_what_differs_from_the_checkpoint(synthetic_root, tiny_stage1, tmp_path, capsys):
    """Resumed with other settings or other training pairs, a run says so, naming them
    (it cannot repeat the uninterrupted run); bookkeeping settings (log_every) are free."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for side in ("hazy", "GT"):
        (root / "train" / side / "0003.png").unlink()
        shutil.copy(root / "train" / side / "0000.png", root / "train" / side / "extra.png")
    cfg = tiny_stage1_config(root, "train.lr=0.0005", "train.log_every=3")
    Stage1Trainer(cfg, tmp_path / "run", resume=str(tiny_stage1.last)).train()      # (nothing left to train)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert out == [f"WARNING: resuming with 2 setting(s) other than the checkpoint's: data.root: {synthetic_root} -> "
                   f"{root}; train.lr: 0.001 -> 0.0005",
                   "WARNING: the training pairs differ from the checkpoint's (8 then, 8 now: 1 added (extra), "
                   "1 removed (0003))",
                   "WARNING: so this run will not repeat an uninterrupted one exactly"]
    history = (tmp_path / "run" / "resumes.txt").read_text().splitlines()
    assert len(history) == 1 and f"resumed at step 4 from {tiny_stage1.last} by `" in history[0]
    assert history[0].endswith(": resuming with 2 setting(s) other than the checkpoint's: data.root: "
                               f"{synthetic_root} -> {root}; train.lr: 0.001 -> 0.0005; the training pairs differ "
                               "from the checkpoint's (8 then, 8 now: 1 added (extra), 1 removed (0003))")


def test_a_run_folder_holds_one_run_and_is_never_started_over(synthetic_root, tiny_stage1, tmp_path, monkeypatch):
    """One trainer per run folder at a time (the second is told who holds it); a folder
    holding a run is continued only from its own checkpoints: neither a fresh run nor
    another folder's checkpoint may overwrite its last.pt; a killed writer's temporaries
    are removed when the folder is taken."""
    import shutil
    from dsrdmpd.runfolder import RunFolder, RunFolderError
    cfg = lambda: tiny_stage1_config(synthetic_root)
    run = tmp_path / "run"
    with monkeypatch.context() as m:                     # as if another process held it
        m.setattr(RunFolder, "holder_id", staticmethod(lambda: "pid 1 on elsewhere"))
        first = Stage1Trainer(cfg(), run)
    with pytest.raises(RunFolderError, match=rf"{run}: another run is using this folder \(pid 1 on elsewhere\); "
                                             r"wait for it to end or choose another --run-dir"):
        Stage1Trainer(cfg(), run)
    del first
    gc.collect()                                          # a trainer dropped untrained lets its folder go
    shutil.copy(tiny_stage1.last, run / "checkpoints" / "last.pt")
    mine = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(RunFolderError, match=r"holds a training run \(checkpoints/last.pt\): a fresh run here would "
                                             r"overwrite it; continue it with --resume auto"):
        Stage1Trainer(cfg(), run)
    elsewhere = tmp_path / "other.pt"
    shutil.copy(tiny_stage1.last, elsewhere)
    with pytest.raises(RunFolderError, match=rf"holds a training run of its own \(checkpoints/last.pt\): continuing "
                                             rf"{elsewhere} here would overwrite it"):
        Stage1Trainer(cfg(), run, resume=str(elsewhere))
    assert (run / "checkpoints" / "last.pt").read_bytes() == mine
    stale = run / "checkpoints" / ".step_0000002.k3j9x0ab.tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    resumed = Stage1Trainer(cfg(), run, resume="auto")
    assert resumed.step == 4 and not stale.exists()
    resumed.train()                                       # nothing left to train; lets the folder go
    Stage1Trainer(cfg(), run, resume=str(run / "checkpoints" / "last.pt")).close()
    weights_only = tmp_path / "killed_before_last" / "checkpoints"
    weights_only.mkdir(parents=True)
    shutil.copy(tiny_stage1.weights, weights_only / "best.pt")
    with pytest.raises(RunFolderError, match=r"--resume auto finds no checkpoints/last.pt to continue \(the folder "
                                             r"holds best.pt: weights only, not resumable\)"):
        Stage1Trainer(cfg(), weights_only.parent, resume="auto")
    linked = tmp_path / "linked" / "checkpoints"         # its own last.pt, a link to a file elsewhere
    linked.mkdir(parents=True)
    (linked / "last.pt").symlink_to(elsewhere)
    Stage1Trainer(cfg(), linked.parent, resume="auto").close()


def test_resume_rejects_other_stage(data_root, stage1_ckpt, tiny_stage1, tmp_path):
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        Stage2Trainer(stage2_cfg(data_root, stage1_ckpt), tmp_path, resume=str(tiny_stage1.last))
    with pytest.raises(ValueError, match="is a stage-1 checkpoint, this is the stage-2 trainer"):
        Stage2Trainer(stage2_cfg(data_root, stage1_ckpt), tmp_path / "w", resume=str(stage1_ckpt))


def test_precomputed_coarse_is_exact(data_root, stage1_ckpt, tmp_path):
    runs = {}
    for cache in (True, False):
        cfg = stage2_cfg(data_root, stage1_ckpt, steps=3, val_every=100, save_every=100, precompute_coarse=cache)
        cfg["data"]["val_split"] = None     # the training states are compared, validation adds nothing
        t = Stage2Trainer(cfg, tmp_path / str(cache))
        t.train()
        runs[cache] = t.unwrapped_state()
    _states_equal(runs[True], runs[False])


def test_cli_tiny_runs(data_root, tmp_path):
    """Both commands on the tiny configs: stage 1 stopped after 2 of its 4 steps (--max-steps),
    stage 2 trained from that run's last.pt (a training checkpoint) for its 2 steps."""
    s1 = train_main(1, ["--config", str(ROOT / "configs" / "stage1_tiny.yaml"), "--run-dir", str(tmp_path / "s1"),
                        "--set", f"data.root={data_root}", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                        "--max-steps", "2"])
    assert s1["step"] == 2
    s2 = train_main(2, ["--config", str(ROOT / "configs" / "stage2_tiny.yaml"), "--run-dir", str(tmp_path / "s2"),
                        "--set", f"data.root={data_root}", "--set", "train.steps=2",
                        "--set", f"train.stage1_checkpoint={tmp_path / 's1' / 'checkpoints' / 'last.pt'}"])
    assert s2["step"] == 2
    cfg = (tmp_path / "s2" / "config.yaml").read_text()
    assert "steps: 2" in cfg and (tmp_path / "s2" / "command.txt").is_file()
    assert (tmp_path / "s2" / "git_revision.txt").read_text().strip()


def test_killed_during_checkpoint_write_leaves_valid_latest(tmp_path):
    """SIGKILL a process that keeps rewriting a large checkpoint; the file under the
    final name always loads and holds one complete version."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from dsrdmpd.checkpoints import save_atomic
        i = 0
        while True:
            save_atomic({{"i": i, "w": torch.full((4_000_000,), float(i))}}, sys.argv[1])
            print(i, flush=True)
            i += 1
    """)
    import time
    delays = (0.4, 1.1)         # two writers, one file each, killed at different moments
    folders = [tmp_path / str(k) for k in range(len(delays))]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(f / "last.pt")], stdout=subprocess.PIPE, text=True)
             for f in folders]
    for proc in procs:
        proc.stdout.readline()                      # at least one complete write
    start = time.monotonic()
    for proc, delay in zip(procs, delays):
        time.sleep(max(0.0, start + delay - time.monotonic()))
        proc.kill()
        proc.wait()
    for folder in folders:
        obj = torch.load(folder / "last.pt", weights_only=True)
        assert torch.all(obj["w"] == obj["i"])
        leftovers = [p.name for p in folder.iterdir() if p.name != "last.pt"]
        pattern = temporary_name_pattern(folder / "last.pt")
        assert all(fnmatch.fnmatch(p, pattern) for p in leftovers), leftovers   # only orphaned temporaries


def test_misspelt_training_key_warns_with_a_suggestion(data_root, tmp_path):
    with pytest.warns(UserWarning, match=r"train\.learning_rate.*known keys.*lr"):
        train_main(1, ["--config", str(ROOT / "configs" / "stage1_tiny.yaml"), "--run-dir", str(tmp_path / "s1"),
                       "--set", f"data.root={data_root}", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                       "--set", "train.learning_rate=0.1", "--max-steps", "1"])
    with pytest.warns(UserWarning, match=r"data\.num_worker \(did you mean data\.num_workers\?\)"):
        train_main(1, ["--config", str(ROOT / "configs" / "stage1_tiny.yaml"), "--run-dir", str(tmp_path / "s1b"),
                       "--set", f"data.root={data_root}", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                       "--set", "data.num_worker=0", "--max-steps", "1"])


def test_rng_capture_and_restore_round_trip():
    """Every random stream a trainer draws from comes back exactly after a restore."""
    import random
    import numpy as np
    from dsrdmpd.training.common import capture_rng, restore_rng
    gens = {"loss": torch.Generator().manual_seed(7)}
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = capture_rng(gens)
    draw = lambda: (torch.rand(3).tolist(), random.random(), float(np.random.rand()),
                    torch.rand(2, generator=gens["loss"]).tolist())
    first = draw()
    draw()
    restore_rng(state, gens)
    assert draw() == first


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_ema_follows_the_configured_decay(data_root, stage1_ckpt, tmp_path, decay):
    """With the averaging on from the first step: decay 0 makes the EMA copy the model
    itself; decay 0.9 makes it lag behind (ema-pytorch warms the decay up from 0, so the
    copy after 4 steps is the recurrence with decays min(0.9, 1 - (1 + n)^(-2/3)), n = 1, 2, ...)."""
    cfg = stage2_cfg(data_root, stage1_ckpt, steps=4, val_every=100, save_every=4, ema_decay=decay,
                     ema_update_every=1, ema_update_after_step=0)
    cfg["data"]["val_split"] = None         # the averaging is checked, not validation
    trainer = Stage2Trainer(cfg, tmp_path)
    snapshots = []
    original = trainer.after_optimizer_step
    trainer.after_optimizer_step = lambda: (snapshots.append(trainer.unwrapped_state()), original())
    trainer.train()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    key = "stem.weight"
    ema = snapshots[0][key].clone()                     # first update copies the model
    for n, state in enumerate(snapshots[1:]):
        d = min(decay, 1 - (2 + n) ** (-2 / 3))       # the n-th average is ema-pytorch's epoch n + 1
        ema = d * ema + (1 - d) * state[key]
    torch.testing.assert_close(ckpt["ema"][key], ema, rtol=1e-5, atol=1e-7)
    if decay == 0.0:
        assert torch.equal(ckpt["ema"][key], ckpt["model"][key])
    else:
        assert not torch.allclose(ckpt["ema"][key], ckpt["model"][key])
    # --weights ema loads exactly that copy; --weights model the raw weights
    for weights in ("model", "ema"):
        net = load_stage2(tmp_path / "checkpoints" / "last.pt", weights=weights).net.state_dict()
        assert torch.equal(net[key], ckpt[weights][key])


def test_second_trainer_in_one_process_gets_its_own_settings(data_root, stage1_ckpt, tmp_path):
    """accelerate keeps one state per process: without a fresh one, a second trainer keeps the
    first one's device and refuses another mixed precision (found on a GPU machine)."""
    first = Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=2), tmp_path / "a")
    assert first.accelerator.mixed_precision == "no"
    second = Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=2, mixed_precision="bf16", batch_size=1),
                           tmp_path / "b")
    assert second.accelerator.mixed_precision == "bf16"
    second.train(max_steps=1)       # one bf16 step (no validation: bf16 runs PyTorch's slow reference conv on most CPUs)
    assert torch.isfinite(torch.tensor(_losses(tmp_path / "b"))).all()


def test_zero_initialised_residual_head_starts_stage2_at_stage1(data_root, stage1_ckpt, tmp_path):
    """train.zero_init_residual_head (the demo's setting): before any step, every sampling
    step predicts a zero residual, so stage 2 returns stage 1's output (clamped to [0, 1])."""
    t = Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=2, zero_init_residual_head=True), tmp_path)
    head = t.model.net.residual_decoder.head
    assert not head.weight.any() and not head.bias.any()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        coarse = t.stage1(x)
        restored = t.model.sample(coarse, x, seed=0)
    assert (coarse - coarse.clamp(0, 1)).abs().max() > 0.01          # the clamp is really exercised
    torch.testing.assert_close(restored, coarse.clamp(0, 1), rtol=0, atol=1e-6)
    plain = Stage2Trainer(stage2_cfg(data_root, stage1_ckpt, steps=2), tmp_path / "plain")
    assert plain.model.net.residual_decoder.head.weight.abs().sum() > 0
