"""CUDA fast paths against the float32 reference (skipped without a GPU): the fast
GroupNorm (Triton kernels and the plain-torch split form), CUDA graphs (replay equals the
eager run exactly; one graph per input shape), and both inside the Dehazer. Run on a GPU
machine with ``bash scripts/gpu_check.sh``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.norm import GroupNormAct, triton_available

from conftest import ROOT as ROOT_DIR
from test_speed_options import chain_float32, psnr  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = dict(rtol=1e-4, atol=1e-5)        # the parity tests' float32 bound
BACKENDS = [pytest.param(True, id="triton"), pytest.param(False, id="torch")]


def _case(b, c, h, w, channels_last, dtype=torch.float32, groups=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = GroupNormAct(groups, c)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    x = (torch.randn(b, c, h, w, generator=g) * 2 + 0.5).to(dtype)
    ss = (torch.randn(b, c, 1, 1, generator=g).to(dtype), torch.randn(b, c, 1, 1, generator=g).to(dtype))
    norm = norm.cuda()
    x = x.cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return norm, x, tuple(t.cuda() for t in ss)


def _reference(norm, x, ss, act):
    """float32 F.group_norm (+ scale/shift + SiLU) on the float32 input."""
    y = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    if ss is not None:
        y = y * (ss[0].float() + 1) + ss[1].float()
    return F.silu(y) if act else y


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 256, 256), (2, 128, 33, 47), (3, 16, 8, 8), (1, 512, 16, 16)])
@pytest.mark.parametrize("with_ss,act", [(True, True), (False, False)])
def test_fast_norm_float32_matches_group_norm(use_triton, channels_last, shape, with_ss, act):
    if use_triton and not triton_available():
        pytest.skip("Triton not importable")
    norm, x, ss = _case(*shape, channels_last)
    ss = ss if with_ss else None
    with torch.inference_mode():
        out = norm.forward_fast(x, ss, act, use_triton=use_triton)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, _reference(norm, x, ss, act), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 256, 256), (2, 128, 33, 47), (1, 512, 16, 16), (3, 24, 8, 8)])
def test_fast_channel_layer_norm_matches_the_native_one(dtype, channels_last, shape):
    """The channel-LayerNorm kernel against the native form on the GPU: float32 within the
    parity bound, bfloat16 within one bfloat16 rounding of values of a few units (2^-6);
    dtype and memory format kept; used only with ``fast`` and no autograd recording."""
    from dsrdmpd.models.unet_blocks import ChannelLayerNorm
    if not triton_available():
        pytest.skip("Triton not importable")
    g = torch.Generator().manual_seed(0)
    m = ChannelLayerNorm(shape[1])
    with torch.no_grad():
        m.g.copy_(torch.randn(m.g.shape, generator=g))
    m = m.cuda()
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = m.forward_native(x)
        m.fast = True
        assert m.uses_fast_path(x)
        out = m(x)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOL)
    else:
        assert (out.float() - ref.float()).abs().max() <= 2 ** -6 * max(1.0, ref.float().abs().max().item())
    assert not m.uses_fast_path(x.requires_grad_(True))


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_norm_bf16_no_worse_than_pytorch(use_triton, channels_last):
    """bf16 input (no autocast): bf16 output whose error against float32 arithmetic on the
    same input is at most twice PyTorch's own bf16 GroupNorm's (or 1e-2, bf16's rounding
    of values near 1)."""
    if use_triton and not triton_available():
        pytest.skip("Triton not importable")
    norm, x, ss = _case(2, 64, 64, 64, channels_last, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = _reference(norm, x, ss, True)
        out = norm.forward_fast(x, ss, True, use_triton=use_triton)
        native = copy.deepcopy(norm).to(torch.bfloat16).forward_native(x, ss, True)
    assert out.dtype == torch.bfloat16
    err, native_err = ((t.float() - ref).abs().max().item() for t in (out, native))
    assert err <= max(2 * native_err, 1e-2), (err, native_err)


def test_fast_norm_under_autocast_returns_float32_like_native():
    norm, x, ss = _case(1, 64, 32, 32, True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm.forward_fast(x, ss, True)
        native = norm.forward_native(x, ss, True)
    assert out.dtype == native.dtype == torch.float32
    torch.testing.assert_close(out, native, **TOL)


def test_fast_norm_is_used_on_cuda_only_for_inference():
    norm, x, ss = _case(1, 16, 8, 8, False)
    norm.fast = True
    assert not norm.uses_fast_path(x)                         # autograd records: native (has backward)
    with torch.no_grad():
        assert norm.uses_fast_path(x)
        assert not norm.uses_fast_path(x.cpu())



@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_biases_and_skips_match_the_native_network(channels_last):
    """The stage-2 network on the fast path (conv biases and residual skips taken into the
    norm kernels) against the native form on the same card, float32: within 1e-4 on
    outputs of order 1 (the interpreter test's bound), and the fused kernels did run."""
    import dsrdmpd.models.norm as norm_mod
    torch.manual_seed(0)
    net = build_stage2({"dim": 16, "perceptual_decoder": True}).net.cuda().eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    x = (torch.rand(2, 9, 64, 64, device="cuda") * 2 - 1).contiguous(memory_format=fmt)
    t = torch.tensor([3, 700], device="cuda")
    fused = []
    real = norm_mod._group_norm_act_triton
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            norm_mod.set_fast_norm(net, False)
            ref = net(x, t)
            norm_mod.set_fast_norm(net, True)
            norm_mod._group_norm_act_triton = lambda *a: fused.append(a[10] is not None) or real(*a)
            out = net(x, t)
    finally:
        norm_mod._group_norm_act_triton = real
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for a, b in zip(out, ref):
        assert (a - b).abs().max().item() < 1e-4
    assert any(fused) or not triton_available()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 256, 256), (2, 128, 33, 47), (1, 512, 8, 8)])
def test_trainable_fast_norm_gradients_match_native_on_cuda(shape, channels_last):
    """The Triton GroupNorm's backward on the card (float32) against PyTorch's: output and
    the gradients of x, weight, bias, scale and shift within 1e-4 of their largest value;
    and two backward passes bit-identical (deterministic)."""
    norm, x, ss = _case(*shape, channels_last)
    g = torch.randn(x.shape, device="cuda")

    def run(trainable):
        xs = x.detach().clone().requires_grad_()
        ps = [norm.weight, norm.bias] + [t.detach().clone().requires_grad_() for t in ss]
        for p in ps[:2]:
            p.grad = None
        y = (norm.forward_trainable(xs, (ps[2], ps[3]), True) if trainable
             else norm.forward_native(xs, (ps[2], ps[3]), True))
        (y * g).sum().backward()
        return [y.detach(), xs.grad] + [p.grad.clone() for p in ps]
    ref, out, again = run(False), run(True), run(True)
    for a, r in zip(out, ref):
        assert ((a - r).abs().max() / r.abs().max()).item() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(out, again))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 256, 256), (2, 33, 47), (1, 512, 512)])
def test_fast_linear_attention_matches_native_on_cuda(shape, channels_last):
    """The Triton linear attention on the card against the native form, true float32:
    within 1e-5 of the largest output, layout kept, and the same result twice (no atomics)."""
    from dsrdmpd.models.norm import set_fast_norm
    from dsrdmpd.models.unet_blocks import LinearAttention
    torch.manual_seed(0)
    b, h, w = shape
    m = LinearAttention(64).cuda().eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m.to(memory_format=fmt)
    x = torch.randn(b, 64, h, w, device="cuda").contiguous(memory_format=fmt)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = m(x)
            set_fast_norm(m, True)
            assert m.uses_fast_path(x) or not triton_available()
            out, again = m(x), m(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert out.is_contiguous(memory_format=fmt) and torch.equal(out, again)

def _models(seed=0):
    torch.manual_seed(seed)
    return build_stage1({"dim": 32}), build_stage2({"dim": 16})


@pytest.mark.parametrize("opts", [{}, {"precision": "tf32"}, {"precision": "bf16", "channels_last": True},
                                  {"fast_norm": True}])
def test_graph_replay_equals_eager_exactly(opts):
    s1, s2 = _models()
    hazy = torch.rand(2, 3, 64, 80)
    eager = Dehazer(s1, s2, device="cuda", **opts)(hazy)
    d = Dehazer(s1, s2, device="cuda", cuda_graphs=True, **opts)
    for _ in range(2):                                        # the capture call, then a replay
        out = d(hazy)
        assert torch.equal(out.restored, eager.restored) and torch.equal(out.coarse, eager.coarse)
    assert d.graphs.captures == 1


def test_one_graph_per_size_reused_and_dropped_on_new_weights():
    s1, s2 = _models()
    d = Dehazer(s1, s2, device="cuda", cuda_graphs=True, max_graphs=2)
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 96, 64)
    ra, rb = d(a).restored, d(b).restored
    assert d.graphs.captures == 2 and len(d.graphs.graphs) == 2
    assert torch.equal(d(a).restored, ra) and torch.equal(d(b).restored, rb)
    assert d.graphs.captures == 2                             # same sizes: replayed
    d(torch.rand(2, 3, 64, 64))
    assert d.graphs.captures == 3 and len(d.graphs.graphs) == 2   # LRU cap
    _, s2b = _models(seed=1)
    d.stage2.load_state_dict(s2b.state_dict())                # new weights: recaptured, not stale
    expected = Dehazer(s1, s2b, device="cuda")(a).restored
    assert torch.equal(d(a).restored, expected)
    assert d.graphs.captures == 4


def test_tiles_of_a_scene_share_one_graph():
    s1, s2 = _models()
    scene = torch.rand(1, 3, 200, 200)
    eager = Dehazer(s1, s2, device="cuda", tile=128, overlap=32, tile_batch=2)(scene).restored
    d = Dehazer(s1, s2, device="cuda", tile=128, overlap=32, tile_batch=2, cuda_graphs=True)
    assert torch.equal(d(scene).restored, eager)
    assert d.graphs.captures == 1                             # 4 tiles, 2 calls of 2


@pytest.mark.parametrize("opts,min_db", [({"fast_norm": True}, 80), ({"fast_norm": True, "channels_last": True}, 60),
                                         ({"fast_norm": True, "precision": "tf32"}, 40),
                                         ({"fast_norm": True, "precision": "bf16"}, 20),
                                         ({"fast_norm": True, "cuda_graphs": True, "precision": "tf32"}, 40)])
def test_fast_options_against_cpu_float32(chain_float32, opts, min_db):  # noqa: F811
    """The same bounds as the options without the fast paths (test_speed_options.py::
    test_gpu_options_against_cpu_float32; bf16: 20 dB, the chain sets' bf16 is 26.6-42.6 dB
    on the CPU), with the chain set's sizes and seed (``chain_float32.make``)."""
    ref = chain_float32
    out = ref.make(device="cuda", **opts)(ref.hazy)
    assert psnr(out.restored.cpu(), ref.reference.restored) > min_db


# ---- training step: fused / capturable Adam and the whole step in one CUDA graph (train.cuda_graph)

def _train_case(seed=0, channels_last=False):
    from dsrdmpd.training.step_options import to_memory_format
    torch.manual_seed(seed)
    s2 = build_stage2({"dim": 16}).cuda().train()
    s2.net.noise_decoder.requires_grad_(False)
    if channels_last:
        s2.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed + 1)
    def batch():
        images = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(3)]
        t, noise = torch.randint(0, s2.num_timesteps, (1,), generator=g), torch.randn(1, 3, 32, 32, generator=g)
        return to_memory_format(tuple(x.cuda() for x in (*images, t, noise)), channels_last)
    batches = [batch() for _ in range(4)]
    return s2, batches


def _train_eager(s2, opt, batches):
    losses = []
    for b in batches:
        loss = s2(*b[:3], t=b[3], noise=b[4])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.fixture()
def deterministic_cuda():
    """The trainer's default CUDA settings (train.deterministic: true, no TF32), restored
    afterwards: the same kernels in both runs of a comparison, so that the only difference
    left is the one under test. Without them, atomics in the backward (cuDNN's weight
    gradients, attention) make two eager runs differ in the last bits, and Adam's first update
    (lr * g / |g|) turns the sign of a gradient that is rounding noise into a difference of lr."""
    import os
    from dsrdmpd.training.common import configure_cuda
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    configure_cuda(tf32=False, deterministic=True)
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _copy_training_state(dst_model, dst_opt, src_model, src_opt):
    """``src``'s weights and optimizer state into ``dst``'s tensors, in place (a captured
    graph keeps reading the same addresses)."""
    with torch.no_grad():
        for p, q in zip(dst_model.parameters(), src_model.parameters()):
            p.copy_(q)
        for p, q in zip(dst_model.parameters(), src_model.parameters()):
            if p.requires_grad:
                for k, v in src_opt.state[q].items():
                    dst_opt.state[p][k].copy_(v)


@pytest.mark.parametrize("fused", [True, None], ids=["fused", "foreach"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_graphed_training_step_equals_the_eager_step(fused, channels_last, deterministic_cuda):
    """4 steps replayed from one CUDA graph against 4 eager steps with the same capturable
    Adam, each step from the same state (the eager run's weights and Adam state are copied
    into the graphed run's tensors after every step, so rounding cannot grow over the steps):
    the same loss and the same weights and Adam state after it, within float32 rounding; the
    first replay starts from the initial state (the warm-up that capture needs leaves no
    trace); one graph for the 4 same-shape steps, replayed on weights changed in place."""
    from dsrdmpd.training.step_options import GraphedTrainingStep, StepOptions, make_adam
    opts = StepOptions(channels_last, fused, True)
    eager, batches = _train_case(channels_last=channels_last)
    graphed = copy.deepcopy(eager)
    trained = [p for p in eager.parameters() if p.requires_grad]
    eager_opt = make_adam(trained, 1e-3, opts, torch.device("cuda"))
    opt = make_adam([p for p in graphed.parameters() if p.requires_grad], 1e-3, opts, torch.device("cuda"))
    step = GraphedTrainingStep(lambda *b: graphed(*b[:3], t=b[3], noise=b[4]), graphed, opt)
    for i, b in enumerate(batches):
        got = step(*b)
        ref = _train_eager(eager, eager_opt, [b])[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"loss of step {i}")
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after step {i}")
            if p.requires_grad:
                for k, v in eager_opt.state[q].items():
                    # exp_avg_sq is ~g^2 (1e-10 and below): its bound is relative only
                    atol = 0 if k == "exp_avg_sq" else 1e-7
                    torch.testing.assert_close(opt.state[p][k], v, rtol=1e-5, atol=atol, msg=f"{name} {k}, step {i}")
        _copy_training_state(graphed, opt, eager, eager_opt)
    assert step.captures == 1
    assert int(opt.state[next(p for p in graphed.parameters() if p.requires_grad)]["step"]) == 4


def test_fused_adam_on_cuda_equals_plain_adam_to_rounding(deterministic_cuda):
    """Fused Adam against the plain (foreach) one, one step at a time from the same weights and
    Adam state (copied after each step): the same update to float32 rounding, in all 4 steps."""
    from dsrdmpd.training.step_options import StepOptions, make_adam
    a, batches = _train_case()
    b = copy.deepcopy(a)
    opt_a = make_adam([p for p in a.parameters() if p.requires_grad], 1e-3, StepOptions(), "cuda")
    opt_b = make_adam([p for p in b.parameters() if p.requires_grad], 1e-3, StepOptions(fused=True), "cuda")
    for i, batch in enumerate(batches):
        _train_eager(a, opt_a, [batch])
        _train_eager(b, opt_b, [batch])
        for (name, p), q in zip(b.named_parameters(), a.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after step {i}")
        _copy_training_state(b, opt_b, a, opt_a)


def test_compile_cache_warm_start(tmp_path):
    """A tiny network compiled in a fresh process with DSRDMPD_COMPILE_CACHE, then in a
    second one: the second loads inductor's compiled graph from the folder (a cache hit,
    no miss) and gives the same output. Both times are printed (-s)."""
    import json
    import os
    import subprocess
    import sys
    code = r'''
import json, sys, time, torch
from dsrdmpd.compile_cache import use_compile_cache
from torch._dynamo.utils import counters
use_compile_cache()
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.a = torch.nn.Conv2d(3, 16, 3, padding=1); self.b = torch.nn.Conv2d(16, 3, 1)
    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))
torch.manual_seed(0); net = Net().cuda(); net.compile()
x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
t0 = time.perf_counter()
with torch.no_grad(): y = net(x)
torch.cuda.synchronize()
print(json.dumps({"s": time.perf_counter() - t0, "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"], "sum": float(y.double().sum())}))
'''
    env = {**os.environ, "DSRDMPD_COMPILE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT_DIR), os.environ.get("PYTHONPATH", "")])}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"compile cache: cold {runs[0]['s']:.1f} s, warm {runs[1]['s']:.1f} s")
    assert runs[0]["miss"] >= 1 and runs[1]["hit"] >= 1 and runs[1]["miss"] == 0
    assert runs[1]["sum"] == runs[0]["sum"]
    assert any((tmp_path / "cache").rglob("*"))


def test_aot_package_of_the_pipeline_matches_eager_and_loads_in_a_fresh_dehazer(chain_float32, tmp_path):
    """Real AOTInductor packages of the pipeline (stage 1, the fusion terms, the network step
    that the 5 sampling steps share) on the GPU, built with the fast GroupNorm asked for (the trace takes PyTorch's): above 60 dB
    against eager float32 (the compile test's bound); a second Dehazer loads the package
    (no build) and gives the same output to float32 rounding. Times printed (-s)."""
    import time
    ref = chain_float32
    eager = ref.make(device="cuda")(ref.hazy).restored
    t0 = time.perf_counter()
    built = ref.make(device="cuda", aot=tmp_path, fast_norm=True)
    out = built(ref.hazy).restored
    t1 = time.perf_counter()
    loaded = ref.make(device="cuda", aot=tmp_path)
    again = loaded(ref.hazy).restored
    t2 = time.perf_counter()
    print(f"aot package: build + first call {t1 - t0:.1f} s, load + first call {t2 - t1:.1f} s "
          f"({built.aot.timings})")
    assert (built.aot.builds, loaded.aot.builds, loaded.aot.loads) == (3, 0, 3)   # stage 1, terms, step
    assert psnr(out, eager) > 60
    torch.testing.assert_close(again, out, **TOL)


def test_graphed_step_leaves_no_trace_of_its_warm_up_in_batchnorm_statistics():
    """Capture runs warm-up steps; afterwards weights, BatchNorm running statistics and Adam's
    state are as before them: after 3 replays everything equals 3 eager steps."""
    from dsrdmpd.training.step_options import GraphedTrainingStep, StepOptions, make_adam
    torch.manual_seed(0)
    # no bias before the BatchNorm: its gradient is zero up to rounding, and Adam turns rounding-level
    # gradients into steps of about lr whose sign the rounding decides (this test does not run with
    # deterministic kernels, so the eager and the graphed run may round differently)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)).cuda().train()
    graphed = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 16, 16, generator=g).cuda(), torch.rand(2, 3, 16, 16, generator=g).cuda())
               for _ in range(3)]
    opts = StepOptions(False, True, True)
    opt_e = make_adam(eager.parameters(), 1e-2, opts, torch.device("cuda"))
    for x, y in batches:
        opt_e.zero_grad(set_to_none=True)
        F.l1_loss(eager(x), y).backward()
        opt_e.step()
    step = GraphedTrainingStep(lambda x, y: F.l1_loss(graphed(x), y), graphed,
                               make_adam(graphed.parameters(), 1e-2, opts, torch.device("cuda")))
    for x, y in batches:
        step(x, y)
    for a, b in zip(list(graphed.parameters()) + list(graphed.buffers()),
                    list(eager.parameters()) + list(eager.buffers())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _PinningThread:
    """Each call pins a host buffer of a size not pinned before (so PyTorch's host allocator
    must call cudaHostAlloc) from another thread, as a DataLoader's pin-memory thread does
    while a step is captured; errors that thread meets are kept in ``errors``."""

    def __init__(self):
        self.calls, self.errors = 0, []

    def __call__(self):
        import threading

        def pin(n):
            try:
                torch.empty(n, dtype=torch.uint8, pin_memory=True)
            except Exception as e:        # noqa: BLE001  (kept and asserted on)
                self.errors.append(repr(e))
        t = threading.Thread(target=pin, args=((1 << 20) << self.calls,))
        self.calls += 1
        t.start()
        t.join()


def test_graph_capture_survives_another_thread_pinning_memory():
    """Dehazer graphs (GraphRunner) and the captured training step: another thread's
    cudaHostAlloc during capture neither fails that thread nor the capture (PyTorch's default
    capture mode, 'global', fails both), and the replay is still right."""
    from dsrdmpd.cuda_graphs import GraphRunner
    from dsrdmpd.training.step_options import GraphedTrainingStep, StepOptions, make_adam
    pinning = _PinningThread()

    def fn(x, noise):
        pinning()
        return (x * 2 + noise,)
    runner = GraphRunner(fn)
    x, noise = torch.rand(2, 3, 8, 8, device="cuda"), torch.rand(2, 3, 8, 8, device="cuda")
    for _ in range(2):                                        # capture, then a replay
        out, = runner(x, noise)
        assert torch.equal(out, x * 2 + noise)
    assert runner.captures == 1 and pinning.calls == runner.warmup + 1 and not pinning.errors

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1).cuda()
    opt = make_adam(net.parameters(), 1e-2, StepOptions(cuda_graph=True), torch.device("cuda"))

    def loss_fn(a, b):
        pinning()
        return F.mse_loss(net(a), b)
    step = GraphedTrainingStep(loss_fn, net, opt)
    a, b = torch.rand(8, 4, device="cuda"), torch.rand(8, 1, device="cuda")
    first = F.mse_loss(net(a), b).item()
    losses = [step(a, b).item() for _ in range(3)]
    assert step.captures == 1 and not pinning.errors
    assert losses[0] == pytest.approx(first, rel=1e-6) and losses[-1] < losses[0]
