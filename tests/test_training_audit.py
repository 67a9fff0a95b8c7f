"""Training as a researcher meets it: a NaN loss stops the run naming the step, a stop
signal (Ctrl-C, a scheduler's SIGTERM) saves last.pt and says how to continue, a failed
checkpoint write names the file, a start that fails leaves the run folder's records as they
were, and bad settings are refused in one line (exit code 2). Tiny stage-2 runs (width 8)
on the tiny stage 1 of conftest, on 4 training pairs of 32 x 32 (stage 1 runs once per image)."""
from __future__ import annotations

import multiprocessing
import os
import re
import signal

import pytest
import torch

from dsrdmpd.cli.train import main_stage2
from dsrdmpd.config import ConfigError, load_config, validate_config
from dsrdmpd.training import Stage1Trainer, Stage2Trainer

from conftest import ROOT


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """4 training pairs (and 1 each of valid and test), 32 x 32."""
    from dsrdmpd.data.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("small"), n_train=4, n_test=1, size=32, seed=1, n_valid=1)


@pytest.fixture(scope="module")
def stage1_weights(tmp_path_factory):
    """Inference weights of an untrained width-32 stage 1, as a trainer's best.pt holds them
    (stage 2 only needs a stage 1 to freeze; training one would cost a minute)."""
    from dsrdmpd.builders import build_stage1
    from dsrdmpd.models import init_stage1_weights
    from dsrdmpd.training.common import save_training_checkpoint
    torch.manual_seed(0)
    model = build_stage1({"dim": 32})
    init_stage1_weights(model)
    path = tmp_path_factory.mktemp("stage1") / "best.pt"
    save_training_checkpoint(path, stage=1, config={"stage1": {"dim": 32}}, step=0, model=model.state_dict(), ema=None)
    return path


def stage2_args(root, stage1, run_dir, *more):
    """Command line of a 6-step tiny stage-2 run without validation, last.pt only when asked."""
    sets = [f"data.root={root}", f"train.stage1_checkpoint={stage1}", "data.val_split=null", "train.steps=6",
            "train.save_every=100", *more]
    return ["--config", str(ROOT / "configs" / "stage2_tiny.yaml"), "--run-dir", str(run_dir),
            *[a for s in sets for a in ("--set", s)]]


def last_pt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(small_root, stage1_weights, tmp_path,
                                                                            monkeypatch, capsys):
    """The loss turns NaN at step 4: the run stops there (exit 1, one line naming the step and
    what last.pt holds) instead of training NaN weights; last.pt keeps step 3's finite weights."""
    loss_from = Stage2Trainer.loss_from

    def diverging(self, *inputs):
        loss = loss_from(self, *inputs)
        return loss * float("nan") if self.step >= 3 else loss

    monkeypatch.setattr(Stage2Trainer, "loss_from", diverging)
    run = tmp_path / "run"
    assert main_stage2(stage2_args(small_root, stage1_weights, run, "train.save_every=1")) == 1
    line = error_line(capsys)
    assert "the loss is nan at step 4 (epoch 1) of the stage-2 run" in line
    assert "checkpoints/last.pt holds step 3" in line and "lower train.lr" in line
    state = last_pt(run)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_and_the_run_continues_exactly(sig, small_root, stage1_weights, tmp_path,
                                                                   monkeypatch, capsys):
    """SIGINT / SIGTERM after step 2 (last.pt otherwise only at the end): the step is saved,
    the command exits 128 + signal saying how to continue, the signal handlers are put back,
    and (SIGTERM) --resume auto ends with the weights of an uninterrupted run."""
    before = signal.getsignal(sig)
    after_step = Stage2Trainer.after_optimizer_step

    def signalled(self):
        after_step(self)
        if self.step == 2 and not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Stage2Trainer, "after_optimizer_step", signalled)
    run = tmp_path / "run"
    assert main_stage2(stage2_args(small_root, stage1_weights, run)) == 128 + sig
    line = error_line(capsys)
    assert f"stopped by {signal.Signals(sig).name} after step 2 of 6" in line and "--resume auto" in line
    assert last_pt(run)["step"] == 2
    assert signal.getsignal(sig) is before
    if sig != signal.SIGTERM:
        return
    monkeypatch.setattr(Stage2Trainer, "after_optimizer_step", after_step)
    assert main_stage2(stage2_args(small_root, stage1_weights, run) + ["--resume", "auto"]) == 0
    assert main_stage2(stage2_args(small_root, stage1_weights, tmp_path / "straight")) == 0
    resumed, straight = last_pt(run), last_pt(tmp_path / "straight")
    assert resumed["step"] == straight["step"] == 6
    for k in straight["model"]:
        assert torch.equal(resumed["model"][k], straight["model"][k]), k


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/status"), reason="reads /proc/<pid>/status (Linux)")
def test_loader_processes_leave_stop_signals_to_the_trainer(small_root, stage1_weights, tmp_path, monkeypatch):
    """A terminal's Ctrl-C and a scheduler's SIGTERM reach the loader processes too: they
    ignore both (a loader process killed by a signal would end the run with an error before
    it could save), as their kernel signal masks show; one Ctrl-C sent to them changes
    nothing."""
    after_step = Stage2Trainer.after_optimizer_step
    hit = []

    def ignored(pid):
        status = open(f"/proc/{pid}/status").read()
        mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M)[1], 16)
        return [bool(mask >> (sig - 1) & 1) for sig in (signal.SIGINT, signal.SIGTERM)]

    def signal_loaders(self):
        after_step(self)
        if self.step == 1:
            workers = multiprocessing.active_children()
            hit.extend(ignored(w.pid) for w in workers)
            for w in workers:
                os.kill(w.pid, signal.SIGINT)

    monkeypatch.setattr(Stage2Trainer, "after_optimizer_step", signal_loaders)
    cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml",
                      [f"data.root={small_root}", f"train.stage1_checkpoint={stage1_weights}",
                       "data.val_split=null", "train.steps=8", "train.save_every=100", "data.num_workers=1"])
    summary = Stage2Trainer(cfg, tmp_path / "run").train()
    assert hit == [[True, True]] and summary["step"] == 8


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_breaks_mid_run_saves_the_steps_done_first(workers, small_root, stage1_weights, tmp_path,
                                                                   monkeypatch, capsys):
    """The training images become unreadable after step 2 (last.pt otherwise only at the end):
    the steps done are saved, and the run stops in one line naming the step, the file and how
    to continue (exit 2), also when a loader process met the problem (its traceback left out;
    the process is ended, so the command exits instead of waiting for it)."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    after_step = Stage2Trainer.after_optimizer_step

    def break_images(self):
        after_step(self)
        if self.step == 2:
            for f in (root / "train" / "hazy").iterdir():
                f.write_bytes(b"not an image")

    monkeypatch.setattr(Stage2Trainer, "after_optimizer_step", break_images)
    run = tmp_path / "run"
    assert main_stage2(stage2_args(root, stage1_weights, run, f"data.num_workers={workers}")) == 2
    line = error_line(capsys)
    found = re.match(rf"error: at step (\d+): {re.escape(str(root / 'train' / 'hazy'))}/\d+\.png: not a readable "
                     rf"image file; checkpoints/last.pt holds step (\d+): fix the data and continue with --resume auto "
                     rf"\(the resumed run names the pairs that changed\)$", line)
    assert found, line
    failed, saved = int(found[1]), int(found[2])
    assert saved == failed - 1 == last_pt(run)["step"]
    assert failed == 3 if workers == 0 else failed >= 3          # a loader process reads up to 2 batches ahead


def test_a_failed_checkpoint_write_names_the_file_and_what_survives(small_root, stage1_weights, tmp_path,
                                                                    monkeypatch, capsys):
    """A full disk at step 4's last.pt (torch.save reports it as RuntimeError): one line naming
    the file, the step, the free space and the intact step-2 last.pt (exit 1)."""
    import dsrdmpd.training.trainer as trainer_module
    real = trainer_module.save_training_checkpoint

    def disk_full(path, **state):
        if state["step"] >= 4:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        real(path, **state)

    monkeypatch.setattr(trainer_module, "save_training_checkpoint", disk_full)
    run = tmp_path / "run"
    assert main_stage2(stage2_args(small_root, stage1_weights, run, "train.save_every=2")) == 1
    line = error_line(capsys)
    assert f"could not write {run / 'checkpoints' / 'last.pt'} at step 4 (" in line and "MiB free there)" in line
    assert "checkpoints/last.pt holds step 2 (unchanged); make room and continue with --resume auto" in line
    assert last_pt(run)["step"] == 2


def test_a_start_that_fails_leaves_the_run_folder_records_alone(small_root, stage1_weights, tmp_path, capsys):
    """A resume that cannot start (its data root gone) exits 2 and leaves config.yaml and
    command.txt of the run as they were; a fresh run whose stage 1 is missing writes nothing
    but its lock."""
    run = tmp_path / "run"
    assert main_stage2(stage2_args(small_root, stage1_weights, run, "train.steps=2")) == 0
    records = {name: (run / name).read_bytes() for name in ("config.yaml", "command.txt")}
    assert main_stage2(stage2_args(small_root, stage1_weights, run, "data.root=/nonexistent/data")
                       + ["--resume", "auto"]) == 2
    assert "/nonexistent/data" in error_line(capsys)
    assert {name: (run / name).read_bytes() for name in records} == records
    assert not (run / "resumes.txt").exists()
    fresh = tmp_path / "fresh"
    assert main_stage2(stage2_args(small_root, tmp_path / "missing.pt", fresh)) == 2
    assert "missing.pt" in error_line(capsys)
    assert sorted(p.name for p in fresh.iterdir()) == [".lock"]


def test_settings_a_run_cannot_use_are_refused_in_one_line(small_root, stage1_weights, tmp_path, capsys):
    """Widths the networks cannot divide, the other stage's length key (stage 1 runs for
    epochs, stage 2 for steps: the other was ignored with a warning), --max-steps that would
    train nothing, a folder or a weights-only file given to --resume: refused before training,
    exit code 2."""
    for key, value, multiple in (("stage1.dim", 48, 32), ("stage2.dim", 12, 8)):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"^{key}: expected a multiple of {multiple}, got {value}$"):
            validate_config({section: {name: value}})
    validate_config({"stage1": {"dim": 64}, "stage2": {"dim": 8}})
    assert main_stage2(stage2_args(small_root, stage1_weights, tmp_path / "w", "stage2.dim=12")) == 2
    assert error_line(capsys) == "error: stage2.dim: expected a multiple of 8, got 12"
    assert main_stage2(stage2_args(small_root, stage1_weights, tmp_path / "e", "train.epochs=2")) == 2
    assert error_line(capsys) == ("error: train.epochs: stage 2 runs for train.steps (300000 by default), not "
                                  "train.epochs; set train.steps, or use --max-steps to stop early")
    assert main_stage2(stage2_args(small_root, stage1_weights, tmp_path / "d") + ["--resume", str(tmp_path)]) == 2
    assert error_line(capsys).startswith(f"error: --resume {tmp_path} is a folder: give a checkpoint file")
    assert main_stage2(stage2_args(small_root, stage1_weights, tmp_path / "z") + ["--max-steps", "0"]) == 2
    assert error_line(capsys) == "error: --max-steps 0: must be at least 1"
    run = tmp_path / "run"
    assert main_stage2(stage2_args(small_root, stage1_weights, run) + ["--max-steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("done: stopped at step 2 of 6 (continue with --resume auto); no best.pt")
    assert main_stage2(stage2_args(small_root, stage1_weights, run) + ["--resume", "auto",
                                                                               "--max-steps", "2"]) == 2
    assert "--max-steps 2: the run is already at step 2" in error_line(capsys)
    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", [f"data.root={small_root}", "data.val_split=null"])
    with pytest.raises(ConfigError, match=r"^train.steps: stage 1 runs for train.epochs \(200 by default\)"):
        Stage1Trainer({**cfg, "train": {**cfg["train"], "steps": 5}}, tmp_path / "s1s")
    with pytest.raises(ValueError, match=r"holds weights only \(as best.pt and the step_<N>.pt snapshots do\).*"
                                         r"resume from the run's checkpoints/last.pt"):
        Stage1Trainer(cfg, tmp_path / "s1", resume=str(stage1_weights))
