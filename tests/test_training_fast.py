"""The training step's speed options on the CPU: config checks and refusals, fused against
plain Adam, optimizer checkpoints across implementations, channels-last training, the
compile-cache folder. Their CUDA halves are in test_cuda_fast.py / test_cuda.py."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from dsrdmpd.compile_cache import ENV, use_compile_cache
from dsrdmpd.config import ConfigError, load_config
from dsrdmpd.data.synthetic import make_synthetic_dataset
from dsrdmpd.training import Stage1Trainer
from dsrdmpd.training.step_options import (GraphedTrainingStep, StepOptions, apply_precision, load_optimizer_state,
                                           make_adam, portable_optimizer_state, resolve_step_options)

from conftest import ROOT


@pytest.mark.parametrize("item,key", [("train.precision=fp16", "train.precision"),
                                      ("train.fused_optimizer=sometimes", "train.fused_optimizer"),
                                      ("train.cuda_graph=3", "train.cuda_graph"),
                                      ("train.channels_last=yes please", "train.channels_last")])
def test_unknown_values_are_refused_naming_the_key(item, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected"):
        load_config(ROOT / "configs" / "stage2_tiny.yaml", [item])


def test_shipped_configs_hold_the_new_keys_with_their_defaults():
    for name in ("stage1_rsid.yaml", "stage2_rsid.yaml"):
        train = load_config(ROOT / "configs" / name)["train"]
        assert (train["precision"], train["channels_last"], train["fused_optimizer"], train["cuda_graph"]) == \
            (None, False, "auto", False)
    assert load_config(ROOT / "configs" / "stage2_rsid.yaml")["train"]["fast_norm"] is False


@pytest.mark.parametrize("precision,tf32,mixed", [("fp32", False, "no"), ("tf32", True, "no"), ("bf16", True, "bf16"),
                                                  (None, "kept", "kept")])
def test_precision_is_a_shorthand_for_tf32_and_mixed_precision(precision, tf32, mixed):
    tcfg = {"precision": precision, "tf32": "kept", "mixed_precision": "kept"}
    apply_precision(tcfg)
    assert (tcfg["tf32"], tcfg["mixed_precision"]) == (tf32, mixed)


@pytest.mark.parametrize("tcfg,device,procs,accum,problem", [
    ({"cuda_graph": True}, "cpu", 1, 1, "CUDA graphs need a CUDA device"),
    ({"precision": "bf16"}, "cpu", 1, 1, "train.precision: bf16 autocast is for CUDA"),
    ({"cuda_graph": True}, "cuda", 1, 2, "gradient accumulation"),
    ({"cuda_graph": True}, "cuda", 2, 1, "2 processes"),
    ({"cuda_graph": True, "mixed_precision": "fp16"}, "cuda", 1, 1, "fp16"),
    ({"cuda_graph": True, "grad_clip": 1.0}, "cuda", 1, 1, "train.grad_clip")])
def test_impossible_step_options_are_refused_in_one_line(tcfg, device, procs, accum, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        resolve_step_options(tcfg, device, procs, accum)
    assert "\n" not in str(err.value) and str(err.value).startswith("train.")


@pytest.mark.parametrize("tcfg,device,expected", [
    ({}, "cpu", StepOptions(False, None, False)),                               # today's plain CPU Adam
    ({"fused_optimizer": "auto"}, "cuda", StepOptions(False, True, False)),
    ({"fused_optimizer": False}, "cuda", StepOptions(False, None, False)),
    ({"fused_optimizer": True}, "cpu", StepOptions(False, True, False)),
    ({"cuda_graph": True, "channels_last": True, "precision": "bf16", "mixed_precision": "bf16"}, "cuda",
     StepOptions(True, True, True))])
def test_step_options_per_device(tcfg, device, expected):
    assert resolve_step_options(tcfg, device) == expected


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 3, 3, padding=1))


def _steps(net, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.l1_loss(net(x), y).backward()
        opt.step()


def _adam(net, fused):
    return make_adam(net.parameters(), 1e-2, StepOptions(fused=fused), torch.device("cpu"), betas=(0.5, 0.999))


def test_default_optimizer_is_exactly_torch_adam():
    a, b = _net(), _net()
    opt = _adam(a, None)
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.5, 0.999)).param_groups[0].items()
         if k != "params"}
    _steps(a, opt, 3)
    _steps(b, torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.5, 0.999)), 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_fused_adam_equals_plain_adam_to_rounding():
    plain, fused = _net(), _net()
    _steps(plain, _adam(plain, None), 5)
    opt = _adam(fused, True)
    assert opt.param_groups[0]["fused"] is True
    _steps(fused, opt, 5)
    moved = 0.0
    for p, q, r in zip(plain.parameters(), fused.parameters(), _net().parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        moved = max(moved, (p - r).abs().max().item())
    assert moved > 1e-2                           # the steps did move the weights (lr 1e-2, 5 steps)


@pytest.mark.parametrize("saved_with,loaded_into", [(True, None), (None, True), (None, None)])
def test_optimizer_checkpoint_loads_into_either_implementation(saved_with, loaded_into):
    """3 steps with one Adam, its state saved (portable form) and loaded into the other,
    2 more steps: the same weights as 5 steps straight through (exactly when both are the
    plain CPU Adam); the loading optimizer keeps its own implementation."""
    net = _net()
    opt = _adam(net, saved_with)
    _steps(net, opt, 3)
    saved = copy.deepcopy(portable_optimizer_state(opt))
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert all(s["step"].device.type == "cpu" for s in saved["state"].values())
    resumed = copy.deepcopy(net)
    opt2 = _adam(resumed, loaded_into)
    load_optimizer_state(opt2, saved)
    assert opt2.param_groups[0]["fused"] is loaded_into and opt2.param_groups[0]["capturable"] is False
    _steps(net, opt, 2, seed=7)
    _steps(resumed, opt2, 2, seed=7)
    for p, q in zip(net.parameters(), resumed.parameters()):
        if saved_with is None and loaded_into is None:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_plain_cpu_checkpoint_form_is_unchanged():
    net = _net()
    opt = _adam(net, None)
    _steps(net, opt, 2)
    a, b = portable_optimizer_state(opt), opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in b["state"]:
        for k in b["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_load_keeps_a_tensor_learning_rate_in_place():
    """A captured step reads the learning-rate tensor it was captured with: loading a
    checkpoint fills that tensor instead of replacing it."""
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.5))
    lr = opt.param_groups[0]["lr"]
    _steps(net, _adam(net, None), 1)
    load_optimizer_state(opt, portable_optimizer_state(_adam(_net(), None)))
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-2)


def test_graphed_step_needs_a_capturable_optimizer():
    net = _net()
    with pytest.raises(ValueError, match="capturable"):
        GraphedTrainingStep(lambda x: net(x).sum(), net, _adam(net, None))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=4, n_test=1, size=64, seed=1, n_valid=1)


def _stage1(root, run, **train):
    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml",
                      [f"data.root={root}", "data.val_limit=1", "train.batch_size=2", "train.epochs=1",
                       "train.log_every=1", "train.val_every=100"])
    cfg["train"].update(train)
    return Stage1Trainer(cfg, run)


def test_cpu_trainer_refuses_a_cuda_graph_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match="^train.cuda_graph: CUDA graphs need a CUDA device"):
        _stage1(tmp_path / "nodata", tmp_path / "run", cuda_graph=True, device="cpu")
    assert not (tmp_path / "run").exists()


def test_cpu_trainer_default_is_plain_adam_and_the_options_reach_model_and_inputs(data_root, tmp_path):
    plain = _stage1(data_root, tmp_path / "a", device="cpu")
    assert plain.optimizer.param_groups[0]["fused"] is None and plain.graph_step is None
    t = _stage1(data_root, tmp_path / "b", device="cpu", fused_optimizer=True, channels_last=True)
    assert t.optimizer.param_groups[0]["fused"] is True
    conv = next(p for p in t.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = {"hazy": torch.rand(2, 3, 64, 64), "gt": torch.rand(2, 3, 64, 64)}
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
               for x in t.step_inputs(batch))
    assert all(x.is_contiguous() for x in plain.step_inputs(batch))


def test_channels_last_step_matches_the_default_layout():
    """The same loss and gradients, to float rounding, with model and inputs NHWC."""
    from dsrdmpd.training.step_options import to_memory_format
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    grads = {}
    for cl in (False, True):
        net = _net().to(memory_format=torch.channels_last) if cl else _net()
        xi, yi = to_memory_format((x, y), cl)
        assert xi.is_contiguous(memory_format=torch.channels_last) == cl
        loss = torch.nn.functional.l1_loss(net(xi), yi)
        loss.backward()
        grads[cl] = [loss.detach()] + [p.grad for p in net.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compile_cache_folder_is_set_before_compiling(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv(ENV, str(tmp_path / "cc"))
    assert use_compile_cache() == (tmp_path / "cc").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cc").resolve())
    assert os.environ["TRITON_CACHE_DIR"] == str((tmp_path / "cc" / "triton").resolve())
    assert inductor_config.fx_graph_cache is True
    assert use_compile_cache(tmp_path / "other") == (tmp_path / "other").resolve()     # the argument wins


def test_compile_cache_unset_changes_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/kept")
    assert use_compile_cache() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/kept"


def test_compile_cache_on_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/kept")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"^compile cache .*f: cannot use it as a folder"):
        use_compile_cache(tmp_path / "f")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/kept"


def test_dehazer_with_compile_uses_the_cache_folder_before_its_first_call(tmp_path, monkeypatch):
    """Dehazer(compile=True) points the caches at ``compile_cache`` (or $DSRDMPD_COMPILE_CACHE)
    when it wraps the networks, before anything is compiled (compiling is lazy: not run here)."""
    from dsrdmpd.builders import build_stage1, build_stage2
    from dsrdmpd.inference import Dehazer
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv(ENV, str(tmp_path / "from_env"))
    Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}), compile=True, compile_cache=str(tmp_path / "arg"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "arg").resolve())
    Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}), compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "from_env").resolve())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/kept")
    Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}))                  # no compile: nothing set
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/kept"


def test_compile_cache_option_of_the_commands(tmp_path):
    """dehaze.py / test.py --compile --compile-cache DIR hand DIR to the Dehazer; without
    --compile the option is a usage error, not silently ignored; unset: None (the
    environment variable decides)."""
    from dsrdmpd.cli import dehaze as dehaze_cmd
    from dsrdmpd.cli.errors import UsageError
    from dsrdmpd.cli.options import dehazer_options
    base = ["--stage1", "a.pt", "--stage2", "b.pt", "--input", "x", "--output", str(tmp_path / "o")]
    args = dehaze_cmd.build_parser().parse_args(base + ["--compile", "--compile-cache", str(tmp_path / "cc")])
    assert dehazer_options(args)["compile_cache"] == str(tmp_path / "cc") and dehazer_options(args)["compile"]
    assert dehazer_options(dehaze_cmd.build_parser().parse_args(base + ["--compile"]))["compile_cache"] is None
    with pytest.raises(UsageError, match="^--compile-cache is for --compile runs"):
        dehazer_options(dehaze_cmd.build_parser().parse_args(base + ["--compile-cache", str(tmp_path / "cc")]))


def test_compile_cache_without_compile_leaves_no_output_folder(tmp_path, capsys):
    """The usage error comes before the run folder is made: nothing is left behind."""
    from dsrdmpd.cli import dehaze as dehaze_cmd
    from dsrdmpd.imageio import write_image
    write_image(torch.rand(3, 16, 16), tmp_path / "in" / "a.png")
    code = dehaze_cmd.main(["--stage1", str(tmp_path / "a.pt"), "--stage2", str(tmp_path / "b.pt"), "--input",
                            str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--compile-cache", "cc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile-cache is for --compile runs" in err[0]
    assert not (tmp_path / "out").exists()
