"""The run folder's rules (dsrdmpd/runfolder.py) through the commands: one run at a time
(the lock), the fingerprint and --resume, records that cannot be read, a fresh run on an
old folder, stale temporaries. Pass-through networks, tiny images, in-process runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from dsrdmpd.cli import dehaze
from dsrdmpd.imageio import write_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2
from dsrdmpd.runfolder import RunFolder, RunFolderError

from conftest import ROOT


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    """Checkpoint files (only hashed: the networks are pass-through stand-ins) and 3 images."""
    for name, data in (("s1.pt", b"stage one"), ("s2.pt", b"stage two")):
        (tmp_path / name).write_bytes(data)

    def load(*args, **kwargs):
        keep = {k: kwargs[k] for k in ("seed", "tile", "overlap", "tile_batch", "precision") if k in kwargs}
        return Dehazer(PassThroughStage1(), PassThroughStage2(), **keep)
    monkeypatch.setattr(Dehazer, "from_checkpoints", staticmethod(load))
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        write_image(torch.rand(3, 32, 48, generator=g), tmp_path / "in" / f"{i}.png")
    return tmp_path


def run(root, *extra):
    return dehaze.main(["--stage1", str(root / "s1.pt"), "--stage2", str(root / "s2.pt"), "--input",
                        str(root / "in"), "--output", str(root / "out"), *map(str, extra)])


def _errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _records(root):
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text())
            for p in (root / "out" / ".records").glob("*.json")}


def test_a_second_run_on_the_same_folder_is_refused(setup, capsys, monkeypatch):
    """The holder is named (here a holder that says it is pid 1 on another host); a holder
    in this very process (a notebook's earlier run object) is said to be that."""
    assert run(setup) == 0
    before = _records(setup)
    holder = RunFolder(setup / "out")
    with monkeypatch.context() as m:
        m.setattr(RunFolder, "holder_id", staticmethod(lambda: "pid 1 on elsewhere"))
        holder.lock()
    try:
        assert run(setup) == 2
        errors = _errors(capsys)
        assert len(errors) == 1 and errors[0] == (f"error: {setup / 'out'}: another run is using this folder (pid 1 "
                                                  f"on elsewhere); wait for it to end or choose another --output")
        assert _records(setup) == before, "the second run may not touch the first one's records"
    finally:
        holder.unlock()
    holder.lock()                                       # held by this process itself
    try:
        assert run(setup) == 2
        assert _errors(capsys) == [f"error: {setup / 'out'}: this process is already using this folder (an earlier "
                                   f"run object still holds it: close() it, or let it finish)"]
    finally:
        holder.unlock()
    assert (setup / "out" / ".lock").is_file()          # never deleted
    assert run(setup) == 0                              # free again


def test_the_lock_is_held_by_another_process_too(setup):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from dsrdmpd.runfolder import RunFolder; "
            "held = RunFolder(sys.argv[2]); held.lock(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(setup / "out")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"pid {proc.pid} on "):
            RunFolder(setup / "out").lock()
    finally:
        proc.kill()
        proc.wait()
    folder = RunFolder(setup / "out")
    folder.lock()                                        # the kernel released it with the process
    folder.unlock()


def test_resume_refuses_another_fingerprint_and_names_the_field(setup, capsys):
    assert run(setup, "--seed", "3") == 0
    fingerprint = json.loads((setup / "out" / "run.json").read_text())
    assert fingerprint["fingerprint"]["seed"] == 3 and len(fingerprint["fingerprint"]["checkpoints_sha256"]) == 2
    assert {r["run"] for r in _records(setup).values()} == {fingerprint["id"]}      # every record carries it
    assert run(setup, "--seed", "7", "--resume") == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "seed: 3 then, 7 now" in errors[0]
    (setup / "s2.pt").write_bytes(b"other weights")
    assert run(setup, "--seed", "3", "--resume") == 2
    assert "checkpoints_sha256" in _errors(capsys)[0]
    (setup / "s2.pt").write_bytes(b"stage two")
    assert run(setup, "--seed", "3", "--resume", "--tile", "64", "--overlap", "16") == 2
    assert "tile: None then, 64 now" in _errors(capsys)[0]
    # untiled, an explicit --overlap still shapes auto-tiled images and rasters: part of the
    # fingerprint, but only when given (a run without it keeps its earlier fingerprint)
    assert "untiled_overlap" not in fingerprint["fingerprint"]
    assert run(setup, "--seed", "3", "--resume", "--overlap", "16") == 2
    assert "untiled_overlap: None then, 16 now" in _errors(capsys)[0]
    assert run(setup, "--seed", "3", "--resume") == 0
    # a fresh run with another seed starts afresh, and its summary says its own seed
    assert run(setup, "--seed", "7") == 0
    assert "seed 7;" in (setup / "out" / "summary.md").read_text()
    assert json.loads((setup / "out" / "run.json").read_text())["fingerprint"]["seed"] == 7

def test_a_weights_folder_run_fingerprints_the_folder_files(setup, monkeypatch, capsys):
    """--weights-dir: the stage files in the folder are hashed, so --resume after one of them
    changed is refused like a changed --stage2 file."""
    weights = setup / "weights"
    for rel, data in (("stage1/model.safetensors", b"one"), ("stage2/model.safetensors", b"two")):
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(data)

    def load(*args, **kwargs):
        return Dehazer(PassThroughStage1(), PassThroughStage2(), seed=kwargs.get("seed", 0))
    monkeypatch.setattr(Dehazer, "from_pretrained", staticmethod(load))
    argv = ["--weights-dir", str(weights), "--input", str(setup / "in"), "--output", str(setup / "out")]
    assert dehaze.main(argv) == 0
    recorded = json.loads((setup / "out" / "run.json").read_text())["fingerprint"]["checkpoints_sha256"]
    assert len(recorded) == 2
    (weights / "stage2/model.safetensors").write_bytes(b"other")
    assert dehaze.main(argv + ["--resume"]) == 2
    assert "checkpoints_sha256" in _errors(capsys)[0]


def test_unreadable_records_mean_not_done_and_are_named(setup, capsys):
    assert run(setup) == 0
    folder = RunFolder(setup / "out")
    inode = {n: (setup / "out" / "restored" / n).stat().st_ino for n in ("0.png", "1.png", "2.png")}
    folder.record_path("0.png").write_text("")                 # empty
    folder.record_path("1.png").write_text('{"name": "1.p')    # truncated
    with pytest.warns(UserWarning) as caught:
        assert run(setup, "--resume") == 0
    text = " ".join(str(w.message) for w in caught)
    assert str(folder.record_path("0.png")) in text and str(folder.record_path("1.png")) in text
    assert "JSONDecodeError" in text and "not done" in text
    after = {n: (setup / "out" / "restored" / n).stat().st_ino for n in inode}
    assert after["2.png"] == inode["2.png"]                     # kept
    assert after["0.png"] != inode["0.png"] and after["1.png"] != inode["1.png"]   # done again
    assert len(_records(setup)) == 3
    assert "Failed" not in (setup / "out" / "summary.md").read_text()


def test_a_fresh_run_clears_old_records_and_stale_files(setup):
    assert run(setup) == 0
    folder = RunFolder(setup / "out")
    old = folder.record_path("gone.png")
    old.write_text(json.dumps({"name": "gone.png", "run": "x"}))
    stale = [setup / "out" / "restored" / ".0.ab12cd34.tmp.png", setup / "out" / "restored" / ".s.ab12_d34.partial.tif",
             setup / "out" / ".summary.xy12cd34.tmp.md", setup / "out" / "restored" / ".s.ab12cd34.tmp.tif.cog.tif"]
    for p in stale:
        p.write_bytes(b"half")
    keep = setup / "out" / "restored" / ".hidden_but_mine.png"
    keep.write_bytes(b"user file")
    assert run(setup) == 0
    assert not old.exists() and not any(p.exists() for p in stale)
    assert keep.exists()
    assert sorted(_records(setup)) == ["0.png", "1.png", "2.png"]


def test_resume_also_clears_stale_temporaries(setup):
    assert run(setup) == 0
    stale = setup / "out" / "restored" / ".1.abcd1234.tmp.png"
    stale.write_bytes(b"half")
    assert run(setup, "--resume") == 0
    assert not stale.exists()


SLOW_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from dsrdmpd.cli import dehaze
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2
real_run = Dehazer._run
def slow(self, x, noise):
    time.sleep(0.3)
    return real_run(self, x, noise)
Dehazer._run = slow
Dehazer.from_checkpoints = staticmethod(lambda *a, **k: Dehazer(PassThroughStage1(), PassThroughStage2()))
sys.exit(dehaze.main(sys.argv[2:]))
"""


def test_sigterm_ends_the_run_as_an_interruption_and_resume_finishes_it(setup):
    for i in range(3, 12):
        write_image(torch.rand(3, 32, 48), setup / "in" / f"{i}.png")
    args = ["--stage1", str(setup / "s1.pt"), "--stage2", str(setup / "s2.pt"), "--input", str(setup / "in"),
            "--output", str(setup / "out")]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(ROOT), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    records = setup / "out" / ".records"

    def finished():
        return len([p for p in records.glob("*.json") if not p.name.startswith(".")]) if records.is_dir() else 0
    deadline = time.time() + 120
    while time.time() < deadline and finished() < 2:
        time.sleep(0.02)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted"
    assert 2 <= finished() < 12
    assert not [p for p in (setup / "out").rglob(".*") if ".tmp" in p.name], "temporaries left behind"
    assert run(setup, "--resume") == 0
    assert finished() == 12
