"""What a walk through the README found: each test is a promise the README makes that the
code did not keep (the learning rate a resumed run is told to use, the command a run folder
records, one-line messages, the options' help)."""
from __future__ import annotations

import importlib
import math
import shlex
import shutil
import sys

import pytest

from dsrdmpd.config import ConfigError, load_config
from dsrdmpd.messages import one_line

from conftest import ROOT, tiny_stage1_config


def cosine(lr: float, lr_min: float, epoch: int, epochs: int) -> float:
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def copied_run(tiny_stage1, tmp_path):
    """A copy of the tiny stage-1 run folder (its last.pt: step 4, the end of epoch 1 of 1)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_stage1.last.parent.parent, run)
    (run / ".lock").unlink(missing_ok=True)
    return run


def test_a_resumed_stage1_run_uses_the_changed_rate_and_schedule(synthetic_root, tiny_stage1, tmp_path):
    """README (a NaN loss): 'lower train.lr ... first' and resume. The optimizer's saved state
    used to bring the checkpoint's rate back, so a changed train.lr (or lr_min, epochs) was
    reported and then ignored. Now the cosine schedule is this run's, at the epoch reached."""
    from dsrdmpd.training import Stage1Trainer
    run = copied_run(tiny_stage1, tmp_path)
    t = Stage1Trainer(tiny_stage1_config(synthetic_root, "train.lr=5e-4", "train.lr_min=1e-5", "train.epochs=3",
                                         "train.betas=[0.9, 0.99]"), run, resume="auto")
    try:
        assert t.optimizer.param_groups[0]["betas"] == (0.9, 0.99)          # the checkpoint's: (0.5, 0.999)
        assert t.scheduler.last_epoch == 1 and t.scheduler.T_max == 3
        assert t.lr() == pytest.approx(cosine(5e-4, 1e-5, 1, 3), rel=1e-12)
        t.scheduler.step()                          # the next epoch follows the new schedule
        assert t.lr() == pytest.approx(cosine(5e-4, 1e-5, 2, 3), rel=1e-9)
    finally:
        t.close()


def test_an_unchanged_resume_keeps_the_saved_rate_exactly(synthetic_root, tiny_stage1, tmp_path):
    import torch
    from dsrdmpd.training import Stage1Trainer
    saved = torch.load(tiny_stage1.last, weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    t = Stage1Trainer(tiny_stage1_config(synthetic_root), copied_run(tiny_stage1, tmp_path), resume="auto")
    try:
        assert t.lr() == saved                      # bit for bit: the exact-resume promise
    finally:
        t.close()


def test_an_unchanged_resume_mid_schedule_keeps_the_rate_exactly(synthetic_root, tmp_path):
    """Resumed with the same settings at any epoch of a cosine schedule, the rate is the one
    the scheduler stepped to, not the closed form recomputed (they differ in the last bit at
    most epochs: here at epochs 2-4 of 5), so the resumed run repeats the straight one."""
    import warnings
    from dsrdmpd.training import Stage1Trainer
    t = Stage1Trainer(tiny_stage1_config(synthetic_root, "train.epochs=5"), tmp_path / "run")
    try:
        for epoch in range(1, 5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")        # (scheduler.step before any optimizer.step)
                t.scheduler.step()
            stepped = t.lr()
            t.apply_configured_rates({**t.train_defaults, **t.tcfg})    # what a resume with the same config does
            assert t.lr() == stepped, f"epoch {epoch}"
    finally:
        t.close()


def test_a_resumed_stage2_run_uses_the_changed_rate(synthetic_root, tiny_stage1, tmp_path):
    from dsrdmpd.training import Stage2Trainer
    base = ROOT / "configs" / "stage2_tiny.yaml"
    common = [f"data.root={synthetic_root}", f"train.stage1_checkpoint={tiny_stage1.weights}",
              "data.val_split=null", "train.steps=2"]
    first = Stage2Trainer(load_config(base, common), tmp_path / "s2")
    first.save("last.pt")                           # a last.pt at step 0 (rate 1e-3)
    first.close()
    t = Stage2Trainer(load_config(base, [*common, "train.lr=2.5e-4"]), tmp_path / "s2", resume="auto")
    try:
        assert t.lr() == 2.5e-4
    finally:
        t.close()


def test_the_run_folder_records_the_command_with_its_program(synthetic_root, tmp_path, monkeypatch):
    """command.txt (and resumes.txt) hold a command that can be run again: the interpreter,
    the program and its arguments (the program used to be missing), quoted where needed."""
    from dsrdmpd.cli.train import main_stage1
    run = tmp_path / "a run"
    args = ["--config", str(ROOT / "configs" / "stage1_tiny.yaml"), "--run-dir", str(run),
            "--set", f"data.root={synthetic_root}", "--set", "train.batch_size=2", "--set", "data.val_split=null",
            "--max-steps", "1"]
    monkeypatch.setattr(sys, "argv", ["/opt/bin/dsrdmpd-train-stage1", *args])
    assert main_stage1() == 0
    text = (run / "command.txt").read_text()
    assert shlex.split(text) == [sys.executable, "/opt/bin/dsrdmpd-train-stage1", *args]


def test_a_heading_and_its_first_line_join_without_a_semicolon():
    """'does not fit MCESSUNet:; wrong-shape keys' was what a model/checkpoint mismatch printed."""
    assert one_line(ValueError("x does not fit M:\n  missing keys (1): a\n  check it")) == \
        "x does not fit M: missing keys (1): a; check it"
    assert one_line(ValueError("a\n\n b ")) == "a; b"


def test_a_checkpoint_that_does_not_fit_reads_as_one_sentence():
    from dsrdmpd.builders import build_stage1
    from dsrdmpd.checkpoints import CheckpointError, load_into
    small, big = build_stage1({"dim": 32}), build_stage1({"dim": 64})
    with pytest.raises(CheckpointError) as err:
        load_into(big, small.state_dict(), "S1.pt")
    assert one_line(err.value).startswith("checkpoint S1.pt does not fit MCESSUNet: wrong-shape keys (")


def test_invalid_yaml_is_one_line_with_its_place(tmp_path):
    bad = tmp_path / "suite.yaml"
    bad.write_text("protocol: [paper\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (f"config {bad} is not valid YAML: line 2, column 1: expected ',' or ']', but got "
                              "'<stream end>' (while parsing a flow sequence at line 1, column 11)")


COMMANDS = ["dsrdmpd.cli.dehaze:main", "dsrdmpd.cli.evaluate:main", "dsrdmpd.cli.score:main",
            "dsrdmpd.cli.reproduce:main", "dsrdmpd.cli.train:main_stage1", "dsrdmpd.cli.train:main_stage2",
            "dsrdmpd.cli.convert:main", "dsrdmpd.cli.demo:main"]


@pytest.mark.parametrize("entry", COMMANDS)
def test_help_shows_each_default_once_and_no_empty_ones(entry, capsys):
    module, name = entry.split(":")
    assert getattr(importlib.import_module(module), name)(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    # (a help naming its own default, e.g. --config's '(default: sizes read off the checkpoints)', got a
    # second '(default: None)' after it)
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text


def test_split_has_a_help_with_its_default(capsys):
    from dsrdmpd.cli.evaluate import main
    main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--split SPLIT the dataset's split to use (test, valid, test_a, ...) (default: test)" in text
    assert "write side-by-side panels for the first N images (default: 0)" in text     # 0 is shown, not hidden


def test_a_zero_default_is_shown(capsys):
    from dsrdmpd.cli.score import main
    main(["--help"])
    assert "pixels cropped from every border before scoring (default: 0)" in " ".join(capsys.readouterr().out.split())


def test_demo_help_shows_the_defaults_the_readme_quotes(capsys):
    """README Quick start: 48 pairs, stage 1 for 20 epochs, stage 2 for 600 steps, 24 held-out
    scenes; the demo's --help used to print no default at all."""
    from dsrdmpd.cli.demo import main
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("training pairs (default: 48)", "stage-1 training epochs (default: 20)",
                     "stage-2 training steps (default: 600)", "held-out test scenes (default: 24)"):
        assert expected in text


WARN = """
import sys, warnings
from dsrdmpd.cli.errors import run_command
def command(args):
    warnings.warn("unknown config key train.lrr (did you mean train.lr?)\\n  known keys: lr")
    return 0
code = run_command(command, sys.argv[1:])
warnings.warn("after the command")
sys.exit(code)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_command_prints_each_warning_on_one_line(debug):
    """README Configs: an unknown train / data key is a warning naming the closest key. The
    commands printed Python's form: the package file, a line number and a line of its source."""
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WARN, *(["--debug"] if debug else [])], env=env,
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0
    if debug:                                       # --debug keeps Python's form, with the place
        assert "UserWarning: unknown config key train.lrr" in lines[0] and "<string>" in lines[0]
    else:
        assert lines[0] == "warning: unknown config key train.lrr (did you mean train.lr?); known keys: lr"
    assert "UserWarning: after the command" in proc.stderr      # Python's own form is put back after


@pytest.mark.parametrize("content,words", [
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "is not a PyTorch file (neither torch.save's zip archive nor a pickle: it starts "
                                      "with b'\\x89PNG\\r\\n\\x1a\\n')"),
    (b"hello\n", "is not a PyTorch file"),
    (b"", "is empty (0 bytes)"),
    ((8).to_bytes(8, "little") + b'{"a": 1}', "it looks like a safetensors file: give it the .safetensors suffix"),
], ids=["png", "text", "empty", "safetensors"])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, content, words, capsys):
    """An image or text given as a checkpoint was refused as 'not plain tensor data ...
    unpickling it could run code ... allow it with --trust-checkpoint': advice to trust a file
    that holds no checkpoint at all (or, for text, 'KeyError: 105')."""
    from dsrdmpd.checkpoints import CheckpointError, read_checkpoint
    from dsrdmpd.cli.convert import main
    bad = tmp_path / "MCESS_UNet.pth"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint .*MCESS_UNet.pth ") as err:
        read_checkpoint(bad)
    assert words in str(err.value) and "trust" not in str(err.value)
    assert main(["--stage1", str(bad), "--output", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--trust-checkpoint" not in err


@pytest.mark.parametrize("entry,args,words", [
    ("dsrdmpd.cli.evaluate:main", ["--resize", "0"], "argument --resize: 0: must be at least 1"),
    ("dsrdmpd.cli.evaluate:main", ["--panels", "-1"], "argument --panels: -1: must be at least 0"),
    ("dsrdmpd.cli.dehaze:main", ["--tile-batch", "0"], "argument --tile-batch: 0: must be at least 1"),
    ("dsrdmpd.cli.score:main", ["--crop-border", "-1"], "argument --crop-border: -1: must be at least 0"),
    ("dsrdmpd.cli.score:main", ["--resize", "0"], "argument --resize: 0: must be at least 1"),
])
def test_option_values_out_of_range_are_usage_errors(entry, args, words, tmp_path, capsys):
    """test.py ran '--resize 0' at the native size, '--panels -1' without panels and
    '--tile-batch 0' as 1, silently; score.py named both options for either one."""
    module, name = entry.split(":")
    common = {"dsrdmpd.cli.score:main": ["--restored", str(tmp_path), "--gt", str(tmp_path)],
              "dsrdmpd.cli.evaluate:main": ["--hazy-dir", str(tmp_path), "--gt-dir", str(tmp_path)],
              "dsrdmpd.cli.dehaze:main": ["--input", str(tmp_path)]}[entry]
    code = getattr(importlib.import_module(module), name)([*common, "--output", str(tmp_path / "out"), *args])
    assert code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_test_py_refuses_a_bad_key_rule_and_two_image_sources(tmp_path, capsys):
    """'--hazy-key x(' ended test.py with 'error: error: missing ), ...' and exit code 1;
    --data-root with --hazy-dir ran the dataset and ignored the folders."""
    from dsrdmpd.cli.evaluate import main
    out = str(tmp_path / "out")
    assert main(["--hazy-dir", str(tmp_path), "--gt-dir", str(tmp_path), "--hazy-key", "x(", "--output", out]) == 2
    assert "argument --hazy-key: 'x(': not a valid regular expression" in capsys.readouterr().err
    assert main(["--hazy-dir", str(tmp_path), "--gt-dir", str(tmp_path), "--gt-key", "x", "--output", out]) == 2
    assert "needs exactly one group '(...)', the key; it has 0" in capsys.readouterr().err
    assert main(["--stage1", "a.pt", "--stage2", "b.pt", "--data-root", str(tmp_path), "--hazy-dir", str(tmp_path),
                 "--output", out]) == 2
    assert capsys.readouterr().err == "error: give --data-root or --hazy-dir [--gt-dir], not both\n"
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_dataset_value_before_any_dataset_runs(tmp_path, capsys):
    """A suite value dsrdmpd-test refuses used to end the run halfway, with test.py's usage
    text, after the datasets before it had been evaluated."""
    from dsrdmpd.cli.reproduce import main
    suite = ROOT / "configs" / "reproduce.yaml"
    for setting, words in (("datasets.DHID.resize=0", "dataset DHID: argument --resize: 0: must be at least 1"),
                           ("weights=emma", "dataset RSID: argument --weights: invalid choice: 'emma'")):
        assert main(["--output", str(tmp_path / "t"), "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {suite}: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_a_missing_base_names_the_config_that_asks_for_it(tmp_path):
    """'config file not found: nothere.yaml' did not say which file named it."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: nothere.yaml\nstage1:\n  dim: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == (f"config {cfg}: its base 'nothere.yaml' was not found "
                              f"(looked for {tmp_path / 'nothere.yaml'})")
