"""Training under ``accelerate launch`` on the CPU: the processes form ONE distributed run
(gloo), each process saves and restores its own random state, so a run stopped and
resumed ends with exactly the weights of an uninterrupted one; a launch whose processes
would not form one run is refused."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrdmpd.config import ConfigError
from dsrdmpd.training.trainer import check_one_run

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dsrdmpd.config import load_config
    from dsrdmpd.training import Stage2Trainer

    root, stage1, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def make(run, resume=None):
        cfg = load_config(Path({root!r}) / "configs" / "stage2_tiny.yaml",
                          [f"data.root={{root}}", f"train.stage1_checkpoint={{stage1}}", "train.steps=5",
                           "train.batch_size=1", "train.save_every=100", "train.ema_update_after_step=0",
                           "train.device=auto"])
        cfg["data"]["val_split"] = None
        return Stage2Trainer(cfg, run, resume)

    straight = make(out / "a")
    assert straight.accelerator.num_processes == 2, straight.accelerator.num_processes
    print("distributed:", straight.accelerator.distributed_type, straight.accelerator.device, flush=True)
    straight.train()
    make(out / "b").train(max_steps=2)
    resumed = make(out / "b", resume="auto")
    assert resumed.step == 2
    resumed.train()
    import os
    from dsrdmpd.runfolder import RunFolderError
    try:                                  # a fresh run over a: the main process refuses, every process stops
        make(out / "a")
    except RunFolderError as exc:
        print(f"rank {{os.environ['RANK']}} refused: {{exc}}", flush=True)

    import signal
    from dsrdmpd.training.stopping import TrainingInterrupted
    c = make(out / "c")                   # SIGTERM reaches process 1 only, during step 1: both stop after it
    if os.environ["RANK"] == "1":
        step_done = c.after_optimizer_step
        def signalled():
            step_done()
            if c.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        c.after_optimizer_step = signalled
    try:
        c.train()
    except TrainingInterrupted as exc:
        print(f"rank {{os.environ['RANK']}} interrupted: {{exc}}", flush=True)
""").format(root=str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_resume_exactly(synthetic_root, tiny_stage1, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with train.device auto on a machine
    without (visible) GPUs: one gloo run over 2 processes (8 training pairs, batch 1 each: 4
    steps an epoch); stopped at step 2 of 5 (mid-epoch) and resumed into the next epoch (each
    process's share of the reshuffled pairs), every model and EMA tensor equals the
    uninterrupted run's. A fresh run over a folder holding a run is refused in both processes;
    a SIGTERM that reaches one process stops both after the same step, saved."""
    data, stage1 = synthetic_root, tiny_stage1.weights
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port()), str(script), str(data), str(stage1),
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MULTI_CPU" in proc.stdout
    for rank in (0, 1):
        assert f"rank {rank} refused: {tmp_path / 'runs' / 'a'} holds a training run" in proc.stdout, proc.stdout
    assert "rank 0 interrupted: stopped by a stop signal (on another process) after step 1 of 5" in proc.stdout
    assert "rank 1 interrupted: stopped by SIGTERM after step 1 of 5" in proc.stdout
    c = torch.load(tmp_path / "runs" / "c" / "checkpoints" / "last.pt", weights_only=True)
    assert c["step"] == 1 and len(c["rng"]) == 2
    a = torch.load(tmp_path / "runs" / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5 and a["processes"] == 2
    assert len(a["rng"]) == 2          # one random state per process, each its own
    assert not torch.equal(a["rng"][0]["generators"]["loss"], a["rng"][1]["generators"]["loss"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part}: {len(different)} of {len(a[part])} tensors differ, e.g. {different[:3]}"


def test_processes_that_do_not_form_one_run_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2.*do not form one distributed run"):
        check_one_run(1)
    check_one_run(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_one_run(1)
