"""CUDA: training, exact resume, and the command line on a GPU (skipped without one).

Speed-option accuracy on the GPU is in test_speed_options.py. Run on a GPU machine with
``bash scripts/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

from dsrdmpd.cli import dehaze
from dsrdmpd.config import load_config
from dsrdmpd.data.synthetic import make_synthetic_dataset
from dsrdmpd.imageio import read_image
from dsrdmpd.training import Stage1Trainer, Stage2Trainer

from conftest import ROOT
from test_training import _losses, run_straight_and_resumed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=8, n_test=2, size=64, seed=1, n_valid=2)


def _cfg(stage, root, **train):
    cfg = load_config(ROOT / "configs" / f"stage{stage}_tiny.yaml", [f"data.root={root}", "data.val_limit=1"])
    cfg["train"].update({"batch_size": 2, "log_every": 1, "save_every": 100, "val_every": 100, **train})
    return cfg


@pytest.fixture(scope="module")
def stage1_ckpt(data_root, tmp_path_factory):
    """A stage-1 checkpoint for the stage-2 runs, trained on the GPU (seconds there; the
    tests' 2 CPU threads took tens of seconds of the GPU check's time limit)."""
    run = tmp_path_factory.mktemp("s1")
    Stage1Trainer(_cfg(1, data_root, epochs=1, device="auto"), run).train()
    return run / "checkpoints" / "last.pt"


def _make(stage, root, ckpt, device, **train):
    if stage == 1:
        return lambda run, resume=None: Stage1Trainer(_cfg(1, root, epochs=2, device=device, **train), run, resume)
    train = {"steps": 8, "ema_update_after_step": 0, **train}
    return lambda run, resume=None: Stage2Trainer(_cfg(2, root, device=device, stage1_checkpoint=str(ckpt), **train),
                                                  run, resume)


@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_training_starts_where_the_cpu_run_does_and_learns(stage, data_root, stage1_ckpt, tmp_path):
    """Same initial weights, data order, crops and noise on both devices (CPU generators): in
    true float32 the first loss is the CPU one to float rounding, and the GPU run learns.
    Later losses are not compared: Adam's first steps move every weight by about lr whatever
    the size of its gradient, so rounding-level gradient differences (and L1's sign at ties)
    grow into visible ones (H200 run: stage 1 equal at step 1, 6 % apart at step 5)."""
    runs = {}
    for device in ("cpu", "auto"):
        trainer = _make(stage, data_root, stage1_ckpt, device, tf32=False)(tmp_path / device)
        assert trainer.accelerator.device.type == ("cpu" if device == "cpu" else "cuda")
        trainer.train()
        runs[device] = _losses(tmp_path / device)
    gpu, cpu = runs["auto"], runs["cpu"]
    assert len(cpu) == len(gpu) >= 8
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-5)
    assert sum(gpu[-4:]) / 4 < 0.9 * sum(gpu[:4]) / 4


STEP_OPTIONS = [pytest.param({}, id="defaults"), pytest.param({"cuda_graph": True}, id="graph"),
                pytest.param({"cuda_graph": True, "channels_last": True, "fused_optimizer": False}, id="graph-cl-foreach"),
                pytest.param({"cuda_graph": True, "fast_norm": True}, id="graph-fastnorm")]


@pytest.mark.parametrize("options", STEP_OPTIONS)
@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_resume_is_bit_exact(stage, options, data_root, stage1_ckpt, tmp_path):
    """train.deterministic (the default) on the GPU: a run stopped after 5 steps and resumed
    ends with the same weights, bit for bit, as the uninterrupted run; also with the step
    captured in a CUDA graph (recaptured after the resume), with channels-last, and with the
    Triton GroupNorm and its backward (train.fast_norm)."""
    make = _make(stage, data_root, stage1_ckpt, "auto", **options)   # default: tf32 on, deterministic on, fused Adam
    def on_gpu(trainer):
        assert trainer.accelerator.device.type == "cuda"
        assert trainer.optimizer.param_groups[0]["fused"] is (options.get("fused_optimizer", True) or None)
        assert (trainer.graph_step is not None) == bool(options.get("cuda_graph"))
    _, sa, sb = run_straight_and_resumed(make, tmp_path, on_gpu)
    for key in ("model",) + (("ema",) if stage == 2 else ()):
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name}"
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_graphed_trainer_starts_as_the_eager_one_and_learns(stage, data_root, stage1_ckpt, tmp_path):
    """train.cuda_graph: the first loss equals the eager trainer's (same weights: capture's
    warm-up is undone), one capture for the whole run (static shapes), and it learns."""
    runs = {}
    for graph in (False, True):
        trainer = _make(stage, data_root, stage1_ckpt, "auto", cuda_graph=graph, tf32=False)(tmp_path / str(graph))
        trainer.train()
        runs[graph] = _losses(tmp_path / str(graph))
        if graph:
            assert trainer.graph_step.captures == 1
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert sum(runs[True][-4:]) / 4 < 0.9 * sum(runs[True][:4]) / 4


def test_gpu_bf16_precision_with_graph_and_channels_last_trains(data_root, stage1_ckpt, tmp_path):
    trainer = _make(2, data_root, stage1_ckpt, "auto", precision="bf16", cuda_graph=True, channels_last=True,
                    steps=20)(tmp_path)
    assert trainer.tcfg["mixed_precision"] == "bf16"
    trainer.train()
    losses = _losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_gpu_bf16_mixed_precision_trains(data_root, stage1_ckpt, tmp_path):
    trainer = _make(2, data_root, stage1_ckpt, "auto", mixed_precision="bf16", steps=20)(tmp_path)
    assert trainer.accelerator.device.type == "cuda"
    trainer.train()
    losses = _losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def _dehaze_args(chain):
    return ["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
            "--input", str(chain / "data" / "hazy")]


@pytest.fixture(scope="module")
def cpu_dehazed(chain, tmp_path_factory):
    """``dehaze --device cpu`` on the chain set, once for both precisions below."""
    out = tmp_path_factory.mktemp("dehaze") / "cpu"
    assert dehaze.main(_dehaze_args(chain) + ["--output", str(out), "--device", "cpu"]) == 0
    return out / "restored"


@pytest.mark.parametrize("precision,max_levels", [("fp32", 1), ("tf32", 4)])
def test_dehaze_command_on_gpu_matches_cpu(chain, cpu_dehazed, tmp_path, precision, max_levels):
    """The same 8-bit files from ``dehaze --device cuda`` as on the CPU: at most one level
    apart in true float32 (rounding at .5), a few levels with TensorFloat-32."""
    assert dehaze.main(_dehaze_args(chain) + ["--output", str(tmp_path / "gpu"), "--device", "cuda",
                                              "--precision", precision]) == 0
    cpu, gpu = cpu_dehazed, tmp_path / "gpu" / "restored"
    names = sorted(p.name for p in cpu.iterdir())
    assert names and names == sorted(p.name for p in gpu.iterdir())
    worst = max((read_image(cpu / n).tensor - read_image(gpu / n).tensor).abs().max().item() for n in names) * 255
    assert worst <= max_levels + 1e-3


def test_fp32_switches_tensorfloat32_off_for_the_call_only(chain):
    from dsrdmpd.inference import Dehazer
    seen = []
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        for precision in ("fp32", "tf32"):
            d = Dehazer.from_checkpoints(str(chain / "stage1_official.pth"), str(chain / "stage2_official.pt"),
                                         device="cuda", precision=precision)
            d.stage1.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                                                    torch.backends.cuda.matmul.allow_tf32)))
            d(torch.rand(1, 3, 64, 64))
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [(False, False), (True, True)]
