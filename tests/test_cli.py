"""The commands as a user runs them: one-line errors and exit codes, bad files skipped
and reported, 16-bit PNG kept, resumable runs, and runs split over processes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dsrdmpd.cli import dehaze, evaluate, train
from dsrdmpd.imageio import read_image, write_image
from dsrdmpd.inference import Dehazer

from conftest import ROOT

PY = sys.executable


def _cmd(script, *args, **kw):
    return subprocess.run([PY, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}   # same CPU arithmetic in every process


@pytest.fixture(scope="module")
def ckpts(chain):
    return chain / "stage1_official.pth", chain / "stage2_official.pt"


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Good 8-bit PNG and JPEG, a 16-bit PNG, a truncated PNG and a text file named .png."""
    folder = tmp_path_factory.mktemp("messy")
    g = torch.Generator().manual_seed(0)
    write_image(torch.rand(3, 64, 80, generator=g), folder / "a.png")
    write_image(torch.rand(3, 64, 80, generator=g), folder / "b.jpg")
    write_image(torch.rand(3, 48, 64, generator=g), folder / "deep.png", bit_depth=16)
    data = (folder / "a.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])
    (folder / "notes.png").write_text("not an image")
    return folder


def test_bad_files_are_skipped_and_reported(ckpts, messy_folder, tmp_path):
    proc = _cmd("dehaze.py", "--stage1", ckpts[0], "--stage2", ckpts[1], "--input", messy_folder,
                "--output", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 of 5 item(s) failed" in errors[0]
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["a.png", "b.png", "deep.png"]
    deep = read_image(tmp_path / "restored" / "deep.png")
    assert deep.bit_depth == 16 and deep.tensor.shape == (3, 48, 64)
    want = Dehazer.from_checkpoints(*map(str, ckpts))(read_image(messy_folder / "deep.png").tensor[None]).restored[0]
    # 16-bit precision, not 8-bit (1/255): within one 16-bit level, as float32 rounding in a process
    # with another thread count can move a value across a level boundary
    assert (deep.tensor - want).abs().max() <= 1 / 65535 + 1e-6
    summary = (tmp_path / "summary.md").read_text()
    assert "Failed: 2 item(s)" in summary
    assert "| cut.png |" in summary and "truncated" in summary
    assert "| notes.png |" in summary and "not a readable image file" in summary


def test_help_is_each_commands_own():
    out = _cmd("dehaze.py", "--help").stdout
    assert "Dehaze your own scenes" in out and "--input" in out and "--hazy-dir" not in out
    out = _cmd("test.py", "--help").stdout
    assert "Evaluate DS-RDMPD" in out and "--hazy-dir" in out and "--protocol" in out


QUICK_ANSWERS = textwrap.dedent("""
    import contextlib, io, sys
    from dsrdmpd.cli import convert, dehaze, demo, evaluate, reproduce, score, train
    calls = [(m.main, ["--help"]) for m in (convert, dehaze, demo, evaluate, reproduce, score)]
    calls += [(train.main_stage1, ["--help"]), (train.main_stage2, ["--help"])]
    calls += [(dehaze.main, ["--input", "x.tif", "--output", "o", "--bands", "1,1,2"]),   # argparse: bad --bands
              (evaluate.main, ["--stage1", "a.pth"]),                                     # argparse: no --output
              (train.main_stage1, ["--config", "missing.yaml", "--run-dir", "r"])]       # the config is read
    codes = []
    for fn, argv in calls:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            codes.append(fn(argv))
    print(codes, [m for m in ("torch", "numpy") if m in sys.modules])
""")


def test_help_and_usage_errors_come_before_torch_loads():
    """Every command answers --help, and bad arguments or a missing config, without importing
    torch or NumPy (about 0.2 s instead of 3-4 s on the 2-core machine): the parsers and the
    values they offer (dsrdmpd.choices) are light; the models load once the arguments are good."""
    proc = subprocess.run([PY, "-c", QUICK_ANSWERS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([0] * 8 + [2, 2, 2]) + " []", proc.stdout


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("dehazing")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_problems_are_worded_on_one_line_everywhere():
    """One wording for stderr, errors.csv cells and summary rows (dsrdmpd.messages): lines
    joined with '; ', spaces inside a line (a path) kept, a missing file named once, the class
    name for an empty message; the commands and the batch runs use that same function."""
    from dsrdmpd import evaluation, scoring
    from dsrdmpd.cli import errors
    from dsrdmpd.messages import one_line
    assert one_line(ValueError("bad header\n  in  'my  scene.tif'\n\n")) == "bad header; in  'my  scene.tif'"
    assert one_line(FileNotFoundError(2, "No such file or directory", "a b.png")) == \
        "[Errno 2] No such file or directory: 'a b.png'"            # named once
    assert one_line(FileNotFoundError("checkpoint not found: x.pt")) == "checkpoint not found: x.pt"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert errors.one_line is evaluation.one_line is scoring.one_line is one_line


def test_pixel_counts_are_worded_in_megapixels_that_never_read_zero():
    from dsrdmpd.messages import megapixels
    assert [megapixels(n) for n in (0, 50, 2000, 4100, 12_345, 16_777_216, 99_950_000, 100_000_000,
                                    4_000_000_000)] == \
        ["0 Mpx", "0.00005 Mpx", "0.002 Mpx", "0.0041 Mpx", "0.0123 Mpx", "16.8 Mpx", "100 Mpx", "100 Mpx",
         "4000 Mpx"]


def test_usage_errors_are_one_line_with_exit_code_2(ckpts, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    s1, s2 = map(str, ckpts)
    cases = [
        (["--stage1", str(tmp_path / "nope.pth"), "--stage2", s2], "nope.pth"),
        (["--stage1", s2, "--stage2", s2], "looks like a stage-2 file"),
        (["--stage1", s1, "--stage2", s1], "looks like a stage-1 (MCESS-UNet) file"),
        (["--stage1", s1, "--stage2", s2, "--device", "cuda:7"], "'cuda:7' is not available"),
        (["--stage1", s1, "--stage2", s2, "--tile", "50"], "tile size 50"),
        (["--stage1", s1, "--stage2", s2, "--aot", str(tmp_path / "aot"), "--compile"], "without --compile"),
    ]
    if os.name == "posix":                 # a folder of compiled code others may write is refused
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)
        cases.append((["--stage1", s1, "--stage2", s2, "--aot", str(tmp_path / "shared")],
                      f"{tmp_path / 'shared'}: others may write it"))
    for extra, expected in cases:
        code = dehaze.main([*extra, "--input", str(ROOT / "tests" / "fixtures" / "official" / "chain" / "data" /
                                                   "hazy"), "--output", str(tmp_path / "o")])
        assert code == 2, extra
        assert expected in _one_error_line(capsys)
    assert dehaze.main(["--stage1", s1, "--stage2", s2, "--input", str(tmp_path / "empty"), "--output",
                        str(tmp_path / "o")]) == 2
    assert "empty: no images found" in _one_error_line(capsys)
    assert evaluate.main(["--stage1", s1, "--stage2", s2, "--data-root", str(tmp_path / "nodata"), "--output",
                          str(tmp_path / "o")]) == 2
    assert "folder not found" in _one_error_line(capsys)


def test_training_errors_name_the_key_or_file(tmp_path, capsys):
    cfg = str(ROOT / "configs" / "stage1_tiny.yaml")
    assert train.main_stage1(["--config", cfg, "--run-dir", str(tmp_path), "--set", "train.lr=abc"]) == 2
    assert _one_error_line(capsys) == "error: train.lr: expected a number, got 'abc'"
    assert train.main_stage1(["--config", cfg, "--run-dir", str(tmp_path), "--set", f"data.root={tmp_path / 'x'}"]) == 2
    assert "hazy folder not found" in _one_error_line(capsys)
    assert train.main_stage2(["--config", str(ROOT / "configs" / "stage2_tiny.yaml"), "--run-dir", str(tmp_path),
                              "--set", f"train.stage1_checkpoint={tmp_path / 'none.pt'}",
                              "--set", f"data.root={ROOT / 'tests' / 'fixtures' / 'official' / 'chain'}",
                              "--set", "data.train_split=data", "--set", "data.val_split=null"]) == 2
    assert "none.pt" in _one_error_line(capsys)
    assert train.main_stage1(["--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert "missing.yaml" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    train.main_stage1(["--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path), "--debug"])
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("bad,problem", [(torch.full((1, 3, 8, 8), float("nan")), "NaN"),
                                         (torch.full((1, 3, 8, 8), 1.5), "must lie in \\[0, 1\\]"),
                                         (torch.zeros((1, 3, 8, 8), dtype=torch.uint8), "dtype torch.uint8"),
                                         (torch.zeros((1, 4, 8, 8)), "shape \\(B, 3, H, W\\)")])
def test_api_rejects_unusable_input(ckpts, bad, problem):
    with pytest.raises(ValueError, match=problem):
        Dehazer.from_checkpoints(*map(str, ckpts))(bad)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(4)
    for i in range(8):
        gt = torch.rand(3, 64, 64, generator=g)
        write_image(gt, folder / "GT" / f"{i}.png")
        write_image((0.6 * gt + 0.4).clamp(0, 1), folder / "hazy" / f"{i}.png")
    return folder


def _test_args(ckpts, pairs: Path) -> list:
    """test.py's arguments for ``pairs_folder`` (--output left to the caller)."""
    return ["--stage1", ckpts[0], "--stage2", ckpts[1], "--hazy-dir", pairs / "hazy", "--gt-dir", pairs / "GT",
            "--panels", "3"]


@pytest.fixture(scope="module")
def straight_run(ckpts, pairs_folder, tmp_path_factory):
    """``test.py`` on ``pairs_folder`` (8 pairs, 3 panels) in one process, one thread, from
    start to end: what a killed-and-resumed run and a run split over two processes (each
    also one thread: float32 sums depend on the thread count) must give, file for file."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = _cmd("test.py", *_test_args(ckpts, pairs_folder), "--output", out, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _files(folder: Path) -> dict:
    """The run's outputs (records, the lock and the fingerprint file left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".records" not in p.parts and p.name not in (".lock", "run.json")}


def test_killed_run_resumes_to_identical_results(ckpts, pairs_folder, straight_run, tmp_path):
    args = _test_args(ckpts, pairs_folder)
    out = tmp_path / "killed"
    proc = subprocess.Popen([PY, str(ROOT / "scripts" / "test.py"), *map(str, args), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".records").glob("*.json"))) < 2:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.3))               # somewhere inside a later item
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / ".records").glob("*.json")))
    assert 2 <= done < 8, "the kill should land mid-folder"
    names = [json.loads(p.read_text())["name"] for p in (out / ".records").glob("*.json")]
    finished = {n: (out / "restored" / n).stat().st_ino for n in names}
    resumed = _cmd("test.py", *args, "--output", out, "--resume", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    # finished images were kept, not redone (an atomic rewrite would give a new inode)
    assert {n: (out / "restored" / n).stat().st_ino for n in finished} == finished
    assert _files(out) == _files(straight_run)
    assert "metrics.csv" in _files(out) and len(_files(out)) == 8 + 3 + 2   # restored, panels, csv + summary


def test_two_processes_give_the_files_of_one(ckpts, pairs_folder, straight_run, tmp_path):
    args = _test_args(ckpts, pairs_folder)
    launch = subprocess.run([str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                             str(ROOT / "scripts" / "test.py"), *map(str, args), "--output", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert launch.returncode == 0, launch.stderr[-2000:]
    assert _files(tmp_path / "two") == _files(straight_run)
    assert (tmp_path / "two" / "run.json").read_bytes() == (straight_run / "run.json").read_bytes()
    records = [json.loads(p.read_text()) for p in (tmp_path / "two" / ".records").glob("*.json")]
    # each item done once, by its process: items in name order, process k % 2 takes item k (a run in which
    # both processes did every item would leave records of a random mix of the two)
    assert {r["name"]: r["process"] for r in records} == {f"{i}.png": i % 2 for i in range(8)}
