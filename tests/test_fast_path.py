"""The inference fast paths that exist on the CPU: the standardised-weight cache and the
normalisation module (native on the CPU, bit-identical; the split-reduction form checked
against PyTorch). CUDA-only parts (Triton kernels, graphs) are in test_cuda_fast.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsrdmpd.models.unet_blocks as ub
from dsrdmpd.builders import build_stage2
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.passthrough import PassThroughStage1
from dsrdmpd.models.norm import GroupNormAct, group_stats_torch, set_fast_norm


@pytest.fixture
def count_standardisations(monkeypatch):
    calls = []
    real = ub.standardize_weight

    def counting(w):
        calls.append(w.shape)
        return real(w)
    monkeypatch.setattr(ub, "standardize_weight", counting)
    return calls


def _conv(cache=True, seed=0):
    torch.manual_seed(seed)
    conv = ub.WeightStandardizedConv2d(8, 16, 3, padding=1)
    conv.cache_weight = cache
    return conv


def test_cached_weight_gives_exactly_the_uncached_output_and_is_computed_once(count_standardisations):
    x = torch.randn(2, 8, 12, 12)
    ref = _conv(cache=False)
    conv = _conv(cache=True)
    with torch.inference_mode():
        expected = ref(x)
        assert len(count_standardisations) == 1
        outs = [conv(x) for _ in range(3)]
    with torch.no_grad():
        outs.append(conv(x))
    assert len(count_standardisations) == 2          # the reference's, then one for three+one calls
    for out in outs:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("update", ["optimizer", "load_state_dict", "copy_", "to_double"])
def test_an_update_of_the_weight_invalidates_the_cache(update, count_standardisations):
    conv = _conv()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        before = conv(x)
    if update == "optimizer":
        conv(x).square().mean().backward()
        torch.optim.SGD(conv.parameters(), lr=0.5).step()
    elif update == "load_state_dict":
        conv.load_state_dict(_conv(cache=False, seed=1).state_dict())
    elif update == "copy_":
        with torch.no_grad():
            conv.weight.copy_(conv.weight.flip(0))
    else:
        conv.double()
        x = x.double()
    n = len(count_standardisations)
    with torch.no_grad():
        after = conv(x)
    assert len(count_standardisations) == n + 1
    fresh = _conv(cache=False)
    fresh.load_state_dict(conv.state_dict())
    fresh.to(x.dtype)
    with torch.no_grad():
        assert torch.equal(after, fresh(x))
    assert not torch.allclose(after.float(), before.float())


def test_training_recomputes_every_call_and_gradients_are_unchanged(count_standardisations):
    """A no-grad pass (validation, say) fills the cache; the training steps after it, two
    forward passes each (gradient accumulation), still standardise in every call and get
    the uncached gradients."""
    x = torch.randn(2, 8, 9, 9)
    grads = []
    for cache in (False, True):
        conv = _conv(cache=cache)
        opt = torch.optim.Adam(conv.parameters(), lr=1e-2)
        with torch.no_grad():
            conv(x)
        for _ in range(3):
            opt.zero_grad()
            conv(x).sin().mean().backward()
            conv(x * 2).cos().mean().backward()
            opt.step()
        grads.append((conv.weight.grad.clone(), conv.weight.detach().clone()))
    assert len(count_standardisations) == 2 * (1 + 6)   # every training call standardises
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_dehazer_caches_standardised_weights_exactly(count_standardisations):
    torch.manual_seed(0)
    s2 = build_stage2({"dim": 8})
    hazy = torch.rand(1, 3, 64, 64)
    d = Dehazer(PassThroughStage1(), s2)              # switches the cache on
    first = d(hazy).restored
    n = len(count_standardisations)                   # once per conv used, for all 5 sampling steps
    assert 0 < n <= sum(isinstance(m, ub.WeightStandardizedConv2d) for m in s2.modules())
    assert torch.equal(d(hazy).restored, first)
    assert len(count_standardisations) == n           # the second call computed none
    ub.set_weight_cache(s2, False)
    assert torch.equal(d(hazy).restored, first)       # the uncached reference
    assert len(count_standardisations) == n + 5 * n   # uncached: every conv in every step


def _norm_case(channels_last=False, with_ss=True, b=2, c=16, h=10, w=13, offset=0.0):
    g = torch.Generator().manual_seed(0)
    norm = GroupNormAct(4, c)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    x = torch.randn(b, c, h, w, generator=g) * 3 + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ss = (torch.randn(b, c, 1, 1, generator=g), torch.randn(b, c, 1, 1, generator=g)) if with_ss else None
    return norm, x, ss


@pytest.mark.parametrize("fast", [False, True])
def test_cpu_norm_is_bit_identical_to_group_norm(fast):
    norm, x, (scale, shift) = _norm_case()
    set_fast_norm(norm, fast)
    expected = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps) * (scale + 1) + shift)
    with torch.inference_mode():
        assert not norm.uses_fast_path(x)
        assert torch.equal(norm(x, (scale, shift), act=True), expected)
        assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))


def test_norm_keeps_group_norm_state_dict_keys():
    s2 = build_stage2({"dim": 8})
    keys = s2.state_dict().keys()
    assert "net.init_block.block1.norm.weight" in keys or any(k.endswith("block1.norm.weight") for k in keys)
    assert not any("_ws_cache" in k for k in keys)


@pytest.mark.parametrize("chunk", [7, 64, 4096])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_reduction_statistics(chunk, channels_last):
    """Chunk partials merged by the parallel-variance formula give each (image, group)'s
    mean and biased variance; far from zero (offset 1e3) too, where a sum of squares in
    float32 would lose most digits."""
    _, x, _ = _norm_case(channels_last=channels_last, offset=1e3)
    mean, var = group_stats_torch(x, 4, chunk=chunk)
    ref = x.double().reshape(2, 4, -1)
    assert torch.allclose(mean.double(), ref.mean(-1).flatten(), rtol=0, atol=1e-3 * 1e-3 * 1e3)
    assert torch.allclose(var.double(), ref.var(-1, unbiased=False).flatten(), rtol=1e-4)
    naive = (x.reshape(2, 4, -1) ** 2).mean(-1) - x.reshape(2, 4, -1).mean(-1) ** 2
    assert (naive.double().flatten() - ref.var(-1, unbiased=False).flatten()).abs().max() > 10 * \
        (var.double() - ref.var(-1, unbiased=False).flatten()).abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_ss,act", [(True, True), (False, False)])
def test_plain_torch_fast_form_matches_native(channels_last, with_ss, act):
    norm, x, ss = _norm_case(channels_last=channels_last, with_ss=with_ss)
    with torch.inference_mode():
        ref = norm.forward_native(x, ss, act)
        out = norm.forward_fast(x, ss, act, use_triton=False)
    assert out.dtype == ref.dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("channels_last", [False, True])
def test_plain_torch_fast_form_takes_the_conv_bias_and_the_residual(channels_last):
    """forward_fast(h, pre_bias=b, residual=r, residual_bias=rb) is the native
    norm(h + b) [scale/shift, SiLU] + (r + rb): the convolution's bias and a residual
    block's skip taken into the norm's passes, within float32 rounding."""
    norm, x, ss = _norm_case(channels_last=channels_last)
    g = torch.Generator().manual_seed(1)
    c = x.shape[1]
    pb, rb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    res = torch.randn(x.shape, generator=g)
    with torch.inference_mode():
        ref = norm.forward_native(x + pb.view(1, -1, 1, 1), ss, True) + (res + rb.view(1, -1, 1, 1))
        out = norm.forward_fast(x, ss, True, use_triton=False, pre_bias=pb, residual=res, residual_bias=rb)
        assert torch.allclose(norm.forward_fast(x, ss, True, use_triton=False, residual=res),
                              norm.forward_native(x, ss, True) + res, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="residual_bias needs a residual"):
            norm.forward_fast(x, ss, True, use_triton=False, residual_bias=rb)
        with pytest.raises(ValueError, match="residual must have the input's shape"):
            norm.forward_fast(x, ss, True, use_triton=False, residual=res[:, :1])
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, norm.forward_native(x, ss, True) + res, rtol=1e-3, atol=1e-3)

TRITON_CHECK = r"""
import json, torch, torch.nn.functional as F
from dsrdmpd.models.norm import GroupNormAct
torch.manual_seed(0)
errs = []
for cl in (False, True):
    for shape in [(2, 16, 10, 13), (1, 16, 40, 52)]:          # 4 channels x 40 x 52: 3 chunks, a short last one
        m = GroupNormAct(4, shape[1])
        with torch.no_grad():
            m.weight.normal_(), m.bias.normal_()
        x = torch.randn(*shape) * 3 + 100                      # far from zero: catches sum-of-squares statistics
        ss = (torch.randn(shape[0], shape[1], 1, 1), torch.randn(shape[0], shape[1], 1, 1))
        ref = F.silu(F.group_norm(x.double(), 4, m.weight.double(), m.bias.double(), m.eps) * (ss[0].double() + 1)
                     + ss[1].double())
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = m.forward_fast(x, ss, True, use_triton=True)
        fmt = torch.channels_last if cl else torch.contiguous_format
        errs.append(((out.double() - ref).abs().max().item(), out.is_contiguous(memory_format=fmt)))
print(json.dumps(errs))
"""


def _in_triton_interpreter(script: str):
    """Run ``script`` in a fresh process under Triton's CPU interpreter (TRITON_INTERPRET=1,
    read when Triton loads); its last printed line, parsed as JSON. Skips without ``triton``."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernels_in_the_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter (needs the ``triton``
    package; CPU builds of torch lack it, so this skips there and runs where Triton is):
    float32 error against float64 GroupNorm + scale/shift + SiLU within 3e-5, NCHW and
    channels-last (PyTorch's own CPU channels-last kernel is 1.5e-3 off on this input)."""
    errs = _in_triton_interpreter(TRITON_CHECK)
    assert len(errs) == 4
    for err, layout_kept in errs:
        assert err < 3e-5 and layout_kept



FUSED_CHECK = r"""
import json, torch, torch.nn.functional as F
from dsrdmpd.models.norm import GroupNormAct, channel_layer_norm_triton
torch.manual_seed(0)
out = []
for cl in (False, True):
    fmt = torch.channels_last if cl else torch.contiguous_format
    for shape in [(2, 16, 10, 13), (1, 16, 40, 52)]:
        m = GroupNormAct(4, shape[1])
        with torch.no_grad():
            m.weight.normal_(), m.bias.normal_()
        c = shape[1]
        x = torch.randn(*shape) * 3 + 100
        pb, rb, res = torch.randn(c) * 5, torch.randn(c), torch.randn(*shape)
        ss = (torch.randn(shape[0], c, 1, 1), torch.randn(shape[0], c, 1, 1))
        xd = x.double() + pb.double()[None, :, None, None]
        ref = F.silu(F.group_norm(xd, 4, m.weight.double(), m.bias.double(), m.eps) * (ss[0].double() + 1)
                     + ss[1].double()) + res.double() + rb.double()[None, :, None, None]
        with torch.inference_mode():
            y = m.forward_fast(x.contiguous(memory_format=fmt), ss, True, use_triton=True, pre_bias=pb,
                               residual=res, residual_bias=rb)
        out.append(["group", (y.double() - ref).abs().max().item(), y.is_contiguous(memory_format=fmt)])
        g = torch.randn(c)
        var, mean = torch.var_mean(xd, dim=1, unbiased=False, keepdim=True)
        ref = (xd - mean) / (var + 1e-5).sqrt() * g.double()[None, :, None, None] + res.double()
        y = channel_layer_norm_triton(x.contiguous(memory_format=fmt), g, 1e-5, pre_bias=pb,
                                      residual=res.contiguous(memory_format=fmt))
        out.append(["channel", (y.double() - ref).abs().max().item(), y.is_contiguous(memory_format=fmt)])
print(json.dumps(out))
"""


def test_triton_kernels_take_the_conv_bias_and_the_residual_in_the_interpreter():
    """The GroupNorm partials/apply kernels and the channel-norm kernel with a preceding
    convolution's bias (added before the statistics) and a residual (plus its own bias)
    added after, under Triton's CPU interpreter against float64, NCHW and channels-last:
    within 3e-5 (the same bound as without them; a bias left out of the statistics or a
    residual dropped is off by ~1)."""
    rows = _in_triton_interpreter(FUSED_CHECK)
    assert len(rows) == 8
    for kind, err, kept in rows:
        assert err < 3e-5 and kept, (kind, err)


WIRING_CHECK = r"""
import json, torch
from dsrdmpd.builders import build_stage2
from dsrdmpd.models import norm, unet_blocks as ub
# the fast paths on CPU tensors (they are CUDA-only by their device test), run by the interpreter
norm.on_cuda = lambda x: True
calls = {"group": 0, "group+bias": 0, "group+residual": 0, "channel": 0, "channel+bias": 0, "channel+residual": 0}
gn, cn = norm._group_norm_act_triton, ub.channel_layer_norm_triton
def count_gn(*a):
    calls["group"] += 1; calls["group+bias"] += a[9] is not None; calls["group+residual"] += a[10] is not None
    return gn(*a)
def count_cn(x, g, eps, pre_bias=None, residual=None, out_dtype=None):
    calls["channel"] += 1; calls["channel+bias"] += pre_bias is not None; calls["channel+residual"] += residual is not None
    return cn(x, g, eps, pre_bias, residual, out_dtype)
norm._group_norm_act_triton, ub.channel_layer_norm_triton = count_gn, count_cn
torch.manual_seed(0)
s2 = build_stage2({"dim": 8, "perceptual_decoder": True})
with torch.no_grad():
    for name, p in s2.named_parameters():
        if name.endswith(".g") or "norm.weight" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif "norm.bias" in name:
            p.normal_(0, 0.3)
net = s2.net.eval()
x, t = torch.rand(1, 9, 16, 16) * 2 - 1, torch.tensor([700])     # batches of 2: the kernel tests
rows = []
for cl in (False, True):
    fmt = torch.channels_last if cl else torch.contiguous_format
    net.to(memory_format=fmt)
    with torch.inference_mode():
        norm.set_fast_norm(net, False)
        ref = net(x.contiguous(memory_format=fmt), t)
        norm.set_fast_norm(net, True)
        for k in calls: calls[k] = 0
        out = net(x.contiguous(memory_format=fmt), t)
    rows.append([max((a - b).abs().max().item() for a, b in zip(out, ref)), dict(calls)])
counts = {k: sum(isinstance(m, c) for m in net.modules()) for k, c in
          [("convnormact", ub.ConvNormAct), ("resblock", ub.ResBlock), ("linear_attention", ub.LinearAttention),
           ("channel_norm", ub.ChannelLayerNorm)]}
print(json.dumps([rows, counts]))
"""


def test_the_stage2_network_fuses_biases_and_skips_and_matches_the_native_form_in_the_interpreter():
    """A whole stage-2 network (test width, both decoders, NCHW and channels-last) on the
    fast path under Triton's interpreter: every ConvNormAct hands its conv's bias to the
    GroupNorm kernels, every ResBlock its skip, every LinearAttention its to_out bias and
    its residual to the channel-norm kernel (counted); and the outputs equal the native
    form's within float32 rounding (1e-4 on outputs of order 1)."""
    rows, counts = _in_triton_interpreter(WIRING_CHECK)
    for err, calls in rows:
        assert err < 1e-4, err
        assert calls["group"] == calls["group+bias"] == counts["convnormact"] > 0
        assert calls["group+residual"] == counts["resblock"] > 0
        assert calls["channel+bias"] == calls["channel+residual"] == counts["linear_attention"] > 0
        assert calls["channel"] == counts["channel_norm"]


def test_a_norm_that_feeds_a_conv_writes_autocast_s_dtype():
    """forward_fast(..., feeds_conv=True) under autocast writes its output in autocast's
    dtype: exactly the float32 output cast as the convolution would cast it; float32
    without autocast, and whenever a residual is added (the sum is the residual stream)."""
    norm, x, ss = _norm_case()
    with torch.inference_mode():
        full = norm.forward_fast(x, ss, True, use_triton=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm.forward_fast(x, ss, True, use_triton=False, feeds_conv=True)
            with_res = norm.forward_fast(x, ss, True, use_triton=False, feeds_conv=True, residual=x)
        plain = norm.forward_fast(x, ss, True, use_triton=False, feeds_conv=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, full.to(torch.bfloat16))
    assert plain.dtype == torch.float32 and torch.equal(plain, full)
    assert with_res.dtype == torch.float32


AUTOCAST_CHECK = r"""import json, torch
from dsrdmpd.builders import build_stage2
from dsrdmpd.models import norm, unet_blocks as ub
ub.LinearAttention.uses_fast_path = lambda self, x: False     # the norms' dtypes here; the attention has its own test
norm.on_cuda = lambda x: True       # the fast paths on CPU tensors, run by the interpreter
dtypes = {"group": [], "channel": []}
gn, cn = norm._group_norm_act_triton, ub.channel_layer_norm_triton
def count_gn(*a, **k):
    y = gn(*a, **k); dtypes["group"].append(str(y.dtype)); return y
def count_cn(*a):
    y = cn(*a); dtypes["channel"].append(str(y.dtype)); return y
norm._group_norm_act_triton, ub.channel_layer_norm_triton = count_gn, count_cn
torch.manual_seed(0)
net = build_stage2({"dim": 8, "perceptual_decoder": True}).net.eval()
x, t = torch.rand(2, 9, 16, 16) * 2 - 1, torch.tensor([3, 700])
with torch.inference_mode():
    ref32 = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x, t)
        norm.set_fast_norm(net, True)
        out = net(x, t)
err32 = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, ref32))
err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref32))
import collections
print(json.dumps([err, err32, {k: collections.Counter(v) for k, v in dtypes.items()},
                  sum(isinstance(m, ub.ResBlock) for m in net.modules()),
                  sum(isinstance(m, ub.PreNormResidual) for m in net.modules())]))
"""


def test_under_autocast_the_norms_before_convolutions_write_bfloat16_in_the_interpreter():
    """A stage-2 network under bfloat16 autocast on the fast path (Triton's interpreter):
    the norms whose output only a convolution reads (each ResBlock's first, the norm before
    each attention) write bfloat16, the ones that add a residual float32 (counted); and the
    outputs are no further from the float32 network than the native bfloat16 run's (measured
    0.061 against 0.089)."""
    fast_err, native_err, dtypes, resblocks, prenorms = _in_triton_interpreter(AUTOCAST_CHECK)
    assert dtypes["group"] == {"torch.bfloat16": resblocks, "torch.float32": resblocks}
    assert dtypes["channel"]["torch.bfloat16"] == prenorms
    assert fast_err < 1.5 * native_err

MERGE_CHECK = r"""
import json, torch
from dsrdmpd.models import norm
g = torch.Generator().manual_seed(0)
errs = []
for k in (1, 2, 257, 600):                  # one partial (a constant to Triton), one pass, several passes of 256
    rows = 3
    count = torch.full((rows, k), 4096.0)
    count[:, -1] = 1000.0                    # a short last chunk
    mean = torch.randn(rows, k, generator=g) * 0.5 + 100
    m2 = torch.rand(rows, k, generator=g) * count
    n = int(count[0].sum())
    out_mean, out_rstd = torch.empty(rows), torch.empty(rows)
    norm._merge_kernel[(rows,)](count, mean, m2, out_mean, out_rstd, k, n, 1e-5, BLOCK=256)
    c, m, q = count.double(), mean.double(), m2.double()
    total = (c * m).sum(1) / n
    var = (q + c * (m - total[:, None]) ** 2).sum(1) / n
    errs.append([(out_mean.double() - total).abs().max().item(),
                 (out_rstd.double() * (var + 1e-5).sqrt() - 1).abs().max().item()])
print(json.dumps(errs))
"""


def test_triton_merge_over_many_partials_in_the_interpreter():
    """The merge kernel over 1, 2, 257 and 600 partials per (image, group) (a 512-px tile with
    8 channels per group has 512; the GroupNorm cases above have at most 3, one pass of its
    256-wide loop), run by Triton's CPU interpreter against float64: the mean within 1e-4
    (of ~100), 1/sqrt(var + eps) within 1e-4 relative."""
    errs = _in_triton_interpreter(MERGE_CHECK)
    assert len(errs) == 4
    for mean_err, rstd_rel_err in errs:
        assert mean_err < 1e-4 and rstd_rel_err < 1e-4


CHANNEL_CHECK = r"""
import json, torch
from dsrdmpd.models.norm import channel_layer_norm_triton
torch.manual_seed(0)
out = []
# 64 and 512 channels (paper widths), 24 (not a power of two: masked channels); positions
# not a multiple of the block (masked positions); float32 and bfloat16 input
for dtype in (torch.float32, torch.bfloat16):
    for cl in (False, True):
        for shape in [(2, 64, 5, 7), (1, 24, 9, 11), (1, 512, 3, 3)]:
            x = (torch.randn(*shape) * 3 + 100).to(dtype)          # far from zero: catches one-pass statistics
            g = torch.randn(shape[1])
            xd = x.double()
            var, mean = torch.var_mean(xd, dim=1, unbiased=False, keepdim=True)
            ref = (xd - mean) / (var + 1e-5).sqrt() * g.double()[None, :, None, None]
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            y = channel_layer_norm_triton(x, g, 1e-5)
            fmt = torch.channels_last if cl else torch.contiguous_format
            out.append([str(dtype), (y.double() - ref).abs().max().item(), ref.abs().max().item(),
                        y.dtype == dtype and y.is_contiguous(memory_format=fmt)])
print(json.dumps(out))
"""


def test_triton_channel_norm_in_the_interpreter():
    """The channel-LayerNorm kernel under Triton's CPU interpreter against float64 (of the
    same, rounded, input): float32 within 1e-5 (outputs up to ~10; the input's mean is 100,
    so a mean summed without correction is ~4e-5 off), bfloat16 within one unit in the last
    place of the largest output (2^-7 of it: the interpreter's float32 -> bfloat16
    conversion may truncate); dtype and memory format kept."""
    rows = _in_triton_interpreter(CHANNEL_CHECK)
    assert len(rows) == 12
    for dtype, err, scale, kept in rows:
        assert kept
        assert err < (1e-5 if dtype == "torch.float32" else 2 ** -7 * scale), (dtype, err)


def test_channel_norm_blocks_cover_the_channels_in_one_tile():
    from dsrdmpd.models.norm import CHANNEL_TILE, channel_norm_blocks
    assert channel_norm_blocks(64) == (64, CHANNEL_TILE // 64)
    assert channel_norm_blocks(24) == (32, CHANNEL_TILE // 32)
    assert channel_norm_blocks(512) == (512, 8)
    assert channel_norm_blocks(8192) == (8192, 4)                  # never fewer than 4 positions


def test_launch_grids_keep_what_grows_with_the_image_on_axis_0():
    """CUDA refuses a launch with more than 65535 blocks on grid axis 1 or 2: the blocks that
    grow with the image (positions, chunks) go on axis 0. An untiled 16384 x 16384 image at
    64 channels (the full-resolution norms) has 4.2M position blocks and, with 8 channels per
    group, 524288 chunks per group."""
    from dsrdmpd.models.norm import CHUNK, CUDA_GRID_YZ_MAX, channel_norm_blocks, channel_norm_grid, partials_grid
    positions = 16384 * 16384
    blocks, images = channel_norm_grid(2, positions, 64)
    assert images == 2 and blocks * channel_norm_blocks(64)[1] >= positions > CUDA_GRID_YZ_MAX
    chunks = -(-8 * positions // CHUNK)
    grid = partials_grid(chunks, 2 * 8)
    assert grid == (chunks, 16) and all(n <= CUDA_GRID_YZ_MAX for n in grid[1:])


def test_set_fast_norm_and_native_norm_reach_the_channel_layer_norms():
    from dsrdmpd.models.norm import native_norm
    from dsrdmpd.models.unet_blocks import ChannelLayerNorm
    s2 = build_stage2({"dim": 8})
    norms = [m for m in s2.modules() if isinstance(m, ChannelLayerNorm)]
    assert norms and not any(m.fast for m in norms)
    set_fast_norm(s2, True)
    assert all(m.fast for m in norms)
    with native_norm(s2):
        assert not any(m.fast for m in norms)
    assert all(m.fast for m in norms)


def test_channel_layer_norm_keeps_the_native_path_on_the_cpu_and_when_recording():
    """On the CPU (and, on CUDA, whenever autograd records) the fast switch changes nothing:
    bit-identical to the native form."""
    from dsrdmpd.models.unet_blocks import ChannelLayerNorm
    m = ChannelLayerNorm(16)
    with torch.no_grad():
        m.g.normal_()
    x = torch.randn(2, 16, 5, 6) * 2 + 1
    ref = m.forward_native(x)
    m.fast = True
    assert not m.uses_fast_path(x)
    assert torch.equal(m(x), ref)


def test_run_options_pass_the_fast_paths_to_the_dehazer():
    import argparse
    from dsrdmpd.cli.options import add_run_options, dehazer_options
    ap = argparse.ArgumentParser()
    add_run_options(ap)
    opts = dehazer_options(ap.parse_args(["--fast-norm", "--cuda-graphs"]))
    assert opts["fast_norm"] is True and opts["cuda_graphs"] is True
    assert dehazer_options(ap.parse_args([]))["fast_norm"] is False
    d = Dehazer(PassThroughStage1(), build_stage2({"dim": 8}), **opts)     # on the CPU: no graphs, native norm
    assert d.graphs is None


def test_triton_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """Triton's compiler (ptxas included, no GPU needed) turns every kernel into sm_90 machine
    code in each specialisation the launch code asks for: float32 and bfloat16 input (bfloat16
    output, or float32 under autocast), NCHW and channels-last, with and without scale/shift,
    and the merge with one partial per row
    (Triton makes an integer argument equal to 1 a constant); every SiLU / scale-shift pairing;
    the fused conv bias and residual (float32 or bfloat16 skip) of the ResBlocks and attentions;
    the training form's two backward kernels. Needs the ``triton`` package,
    like the interpreter test; catches what the interpreter accepts and the compiler refuses."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsrdmpd.models import norm
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))       # a real compile, not an earlier cache entry

    def compile_(fn, consts, dtype="fp32", out_dtype=None, res_dtype="fp32", types=None, num_warps=4):
        def kind(a):
            if a in consts:
                return "constexpr"
            if types and a in types:
                return types[a]
            if a == "y_ptr":
                return f"*{out_dtype or dtype}"
            if a == "res_ptr":
                return f"*{res_dtype}"
            if a.endswith("_ptr"):
                return f"*{dtype}" if a in ("x_ptr", "scale_ptr", "shift_ptr") else "*fp32"
            return "fp32" if a == "eps" else "i32"
        signature = {a: kind(a) for a in fn.arg_names}
        missing = [q.name for q in fn.params if q.is_constexpr and q.name not in consts]
        assert not missing, f"constexpr flags left unset: {missing}"
        src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    plain = {"HAS_PB": False, "HAS_RES": False, "HAS_RB": False}
    kernels = []
    for dtype in ("fp32", "bf16"):
        for cl in (False, True):
            for pb in (False, True):
                kernels.append(compile_(norm._partials_kernel, {"CHANNELS_LAST": cl, "HAS_PB": pb,
                                                                "BLOCK": norm.CHUNK}, dtype))
            for ss in (False, True):
                for act in (False, True):
                    kernels.append(compile_(norm._apply_kernel, {"CHANNELS_LAST": cl, "HAS_SS": ss, "ACT": act,
                                                                 **plain, "BLOCK": norm.APPLY_BLOCK}, dtype))
            # the ResBlock fusions: the conv bias; plus the skip (identity, or a 1x1 conv with its bias)
            for res, rb in ((False, False), (True, False), (True, True)):
                kernels.append(compile_(norm._apply_kernel, {"CHANNELS_LAST": cl, "HAS_SS": True, "ACT": True,
                                                             "HAS_PB": True, "HAS_RES": res, "HAS_RB": rb,
                                                             "BLOCK": norm.APPLY_BLOCK}, dtype))
    kernels.append(compile_(norm._apply_kernel, {"CHANNELS_LAST": True, "HAS_SS": True, "ACT": True, **plain,
                                                 "BLOCK": norm.APPLY_BLOCK}, "bf16", "fp32"))
    kernels.append(compile_(norm._apply_kernel, {"CHANNELS_LAST": True, "HAS_SS": True, "ACT": True, "HAS_PB": True,
                                                 "HAS_RES": True, "HAS_RB": True, "BLOCK": norm.APPLY_BLOCK},
                            "bf16", "fp32", "bf16"))
    kernels.append(compile_(norm._merge_kernel, {"BLOCK": 256}))
    kernels.append(compile_(norm._merge_kernel, {"BLOCK": 256, "K": 1}))
    for dtype in ("fp32", "bf16"):
        for cl in (False, True):
            for channels in (64, 512):             # the widest tile (512 x 8) and the paper's full-resolution one
                block_c, block_p = norm.channel_norm_blocks(channels)
                for fused in (False, True):        # alone, or with to_out's bias and the attention's residual
                    kernels.append(compile_(norm._channel_norm_kernel, {
                        "CHANNELS_LAST": cl, "HAS_PB": fused, "HAS_RES": fused, "BLOCK_C": block_c,
                        "BLOCK_P": block_p}, dtype, None, "fp32"))
    # the training form's backward: x in float32 or bfloat16 (autocast), dy float32, dx in x's dtype
    for dtype in ("fp32", "bf16"):
        grad_types = {"dy_ptr": "*fp32", "dx_ptr": f"*{dtype}"}
        for cl in (False, True):
            for ss, act in ((True, True), (False, False)):
                flags = {"CHANNELS_LAST": cl, "HAS_SS": ss, "ACT": act}
                block_c, block_p = norm.channel_norm_blocks(64)
                kernels.append(compile_(norm._grad_sums_kernel, {**flags, "BLOCK_C": block_c, "BLOCK_P": block_p},
                                        dtype, types=grad_types, num_warps=8))
                kernels.append(compile_(norm._grad_input_kernel, {**flags, "BLOCK": norm.APPLY_BLOCK}, dtype,
                                        types=grad_types))
        # integer arguments equal to 1 become constants (a 1 x 1 lowest level: HW = K = 1)
        kernels.append(compile_(norm._grad_sums_kernel, {"CHANNELS_LAST": False, "HAS_SS": True, "ACT": True,
                                                         "BLOCK_C": 512, "BLOCK_P": 8, "HW": 1, "K": 1}, dtype,
                                types=grad_types, num_warps=8))
    assert len(kernels) == 2 * 2 * (2 + 4 + 3) + 4 + 2 * 2 * 2 * 2 + 2 * (2 * 2 * 2 + 1) and all(len(k.asm["cubin"]) > 1000 for k in kernels)

TRAINING_GRAD_CHECK = r"""
import json, torch, torch.nn.functional as F
from dsrdmpd.models.norm import GroupNormActFunction
torch.manual_seed(0)
rows = []
for cl in (False, True):
    fmt = torch.channels_last if cl else torch.contiguous_format
    for shape in [(2, 16, 10, 13), (1, 32, 40, 52)]:        # 40 x 52: several position blocks per channel
        for ss, act in ((True, True), (False, False), (False, True)):
            b, c = shape[:2]
            x = torch.randn(*shape) * 3 + 10                # off zero: the mean matters
            w, bias = torch.randn(c), torch.randn(c)
            sc, sh = torch.randn(b, c, 1, 1), torch.randn(b, c, 1, 1)
            gy = torch.randn(*shape)
            def run(dtype, fast):
                xs = x.to(dtype).contiguous(memory_format=fmt).requires_grad_()
                ps = [t.to(dtype).requires_grad_() for t in (w, bias, sc, sh)]
                if fast:
                    y = GroupNormActFunction.apply(xs, ps[0], ps[1], ps[2] if ss else None, ps[3] if ss else None,
                                                   4, 1e-5, act, dtype)
                else:
                    y = F.group_norm(xs, 4, ps[0], ps[1], 1e-5)
                    if ss:
                        y = y * (ps[2] + 1) + ps[3]
                    if act:
                        y = F.silu(y)
                (y * gy.to(dtype)).sum().backward()
                return [y, xs.grad] + [p.grad for p in (ps if ss else ps[:2])], xs.grad.is_contiguous(memory_format=fmt)
            ref, _ = run(torch.float64, False)
            out, kept = run(torch.float32, True)
            rows.append([((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(out, ref)] + [kept])
print(json.dumps(rows))
"""


def test_triton_group_norm_backward_in_the_interpreter():
    """GroupNormActFunction (the Triton forward, and the backward's two passes: per-channel
    sums over position blocks, then dx) under Triton's interpreter against float64 autograd
    of F.group_norm [+ scale/shift] [+ SiLU]: the output and the gradients of x, weight,
    bias, scale and shift within 1e-5 of their largest value (measured: under 6e-7), NCHW
    and channels-last, one and several position blocks; dx keeps x's layout."""
    rows = _in_triton_interpreter(TRAINING_GRAD_CHECK)
    assert len(rows) == 12
    for row in rows:
        *errs, kept = row
        assert kept and len(errs) in (4, 6) and max(errs) < 1e-5, row


TRAINING_STEP_CHECK = r"""
import json, torch
from dsrdmpd.builders import build_stage2
from dsrdmpd.models import norm
from dsrdmpd.models import unet_blocks
norm.on_cuda = lambda x: True       # the fast paths on CPU tensors, run by the interpreter
unet_blocks._eps = lambda dtype: 1e-5      # float32's eps in the float64 reference too (the authors' rule gives it 1e-3)
used = []
real = norm.GroupNormActFunction.apply
norm.GroupNormActFunction.apply = lambda *a: used.append(1) or real(*a)
torch.manual_seed(0)
net = build_stage2({"dim": 8, "perceptual_decoder": True}).net
with torch.no_grad():
    for name, p in net.named_parameters():
        if "norm.weight" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif "norm.bias" in name:
            p.normal_(0, 0.3)
x, t = torch.rand(1, 9, 16, 16) * 2 - 1, torch.tensor([600])     # batches of 2: the kernel test
w_res, w_noise = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
def grads(fast, dtype=torch.float32):
    torch.set_default_dtype(dtype)
    net.to(dtype)
    norm.set_fast_norm(net, fast)
    net.zero_grad(set_to_none=True)
    res, noise = net(x.to(dtype), t)
    ((res * w_res.to(dtype)).sum() + (noise * w_noise.to(dtype)).sum()).backward()   # linear: well conditioned
    torch.set_default_dtype(torch.float32)
    return {n: p.grad.double().clone() for n, p in net.named_parameters() if p.grad is not None}
exact = grads(False, torch.float64)
ref = grads(False)
n_native = len(used)
a = grads(True)
n_fast = len(used) - n_native
b = grads(True)
def total_rel(g):
    return (sum(((g[n] - exact[n]) ** 2).sum() for n in exact) / sum((exact[n] ** 2).sum() for n in exact)).sqrt().item()
top = max(exact[n].abs().max().item() for n in exact)
worst = max(((a[n] - exact[n]).abs().max() / exact[n].abs().max()).item()
            for n in exact if exact[n].abs().max() > 1e-3 * top)
n_norms = sum(isinstance(m, norm.GroupNormAct) for m in net.modules())
print(json.dumps([total_rel(ref), total_rel(a), worst, sorted(a) == sorted(exact),
                  all(torch.equal(a[n], b[n]) for n in a), n_native, n_fast, n_norms]))
"""


def test_a_stage2_backward_through_the_triton_group_norm_in_the_interpreter():
    """A whole stage-2 network's backward (test width, both decoders, a linear loss of both
    outputs) with every GroupNorm on the Triton form (counted) against float64 autograd of
    the native form: all parameter gradients together within 1e-4 (relative, as a vector)
    and within 3x the native float32 form's distance (measured 3.2e-6 and 3.4e-6), each gradient that is not ~0 within
    1e-3 of its largest entry (measured 1.8e-5); the same parameters get gradients; two runs
    bit-identical (no atomics: deterministic)."""
    native, fast, worst, same_params, deterministic, n_native, n_fast, n_norms = \
        _in_triton_interpreter(TRAINING_STEP_CHECK)
    assert n_native == 0 and n_fast == n_norms > 0
    assert fast < 1e-4 and fast < 3 * native and worst < 1e-3 and same_params and deterministic, (native, fast, worst)


def test_train_fast_norm_reaches_the_model_and_its_ema(synthetic_root, tiny_stage1, tmp_path):
    """train.fast_norm switches the stage-2 GroupNorms (and channel norms) of the trained
    network and of its EMA copy to their fast forms (on the CPU they keep the native path);
    off by default; a value other than true/false is refused naming the key."""
    from dsrdmpd.config import ConfigError, load_config
    from dsrdmpd.models.norm import FastNorm
    from dsrdmpd.training import Stage2Trainer
    from conftest import ROOT
    base = [f"data.root={synthetic_root}", f"train.stage1_checkpoint={tiny_stage1.weights}", "train.steps=1",
            "data.val_limit=1", "train.val_every=100", "train.save_every=100"]

    def norms(trainer):
        return [m.fast for net in (trainer.model, trainer.ema.ema_model) for m in net.modules()
                if isinstance(m, FastNorm)]
    off = Stage2Trainer(load_config(ROOT / "configs" / "stage2_tiny.yaml", base), tmp_path / "a")
    on = Stage2Trainer(load_config(ROOT / "configs" / "stage2_tiny.yaml", [*base, "train.fast_norm=true"]),
                       tmp_path / "b")
    try:
        assert norms(off) and not any(norms(off))
        assert all(norms(on))
    finally:
        off.close(), on.close()
    with pytest.raises(ConfigError, match="^train.fast_norm: expected"):
        load_config(ROOT / "configs" / "stage2_tiny.yaml", ["train.fast_norm=maybe"])



ATTENTION_CHECK = r"""
import json, torch
from dsrdmpd.models import linear_attention_triton as lat
from dsrdmpd.models.linear_attention_triton import context_chunk, linear_attention_core
torch.manual_seed(0)
rows = []
# 16 x 16: one context chunk per image; 40 x 52: 33 chunks and a part block; with 8 programs
# aimed at: chunks of 16 blocks, the last one partly past the image; bfloat16 qkv (autocast's
# conv output)
for target, dtype, cl, (b, h, w) in [(512, torch.float32, False, (1, 16, 16)), (512, torch.float32, False, (2, 40, 52)),
                                     (512, torch.float32, True, (2, 40, 52)), (8, torch.float32, True, (2, 40, 52)),
                                     (512, torch.bfloat16, True, (1, 40, 52))]:
    lat.TARGET_PROGRAMS = target
    qkv = (torch.randn(b, 384, h, w) * 2).to(dtype)
    if cl:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    q, k, v = (t.reshape(b, 4, 32, h * w) for t in qkv.double().chunk(3, dim=1))
    scale = 32 ** -0.5
    ref = torch.einsum("bhde,bhdn->bhen", torch.einsum("bhdn,bhen->bhde", k.softmax(-1), v) * (scale / (h * w)),
                       q.softmax(-2)).reshape(b, -1, h, w)
    out = linear_attention_core(qkv, 4, 32, scale)
    fmt = torch.channels_last if cl else torch.contiguous_format
    rows.append([str(dtype), context_chunk(b, h * w), ((out.double() - ref).abs().max() / ref.abs().max()).item(),
                 out.dtype == dtype and out.is_contiguous(memory_format=fmt)])
print(json.dumps(rows))
"""


def test_triton_linear_attention_in_the_interpreter():
    """The linear attention's core (k's softmax statistics, the context from chunk
    partials, q's softmax and the output product) under Triton's interpreter against
    float64 einsums of the native form: float32 within 1e-5 of the largest output
    (measured: under 6e-7), bfloat16 (output rounded to bfloat16) within one unit in the
    last place of the largest output (2^-7: the interpreter's conversion may truncate;
    measured 5.7e-3); NCHW and channels-last, one and
    many context chunks, chunks of many blocks, a part block; dtype and memory format
    kept."""
    rows = _in_triton_interpreter(ATTENTION_CHECK)
    assert [r[1] for r in rows] == [64, 64, 64, 1024, 64]
    for dtype, chunk, err, kept in rows:
        assert kept and err < (1e-5 if dtype == "torch.float32" else 2 ** -7 + 1e-5), (dtype, chunk, err)


def test_context_chunks_fill_the_card_at_batch_one():
    """Positions per context program: whole blocks, about TARGET_PROGRAMS programs for big
    images, never below one block nor above 8192 positions."""
    from dsrdmpd.models.linear_attention_triton import POSITIONS, TARGET_PROGRAMS, context_chunk
    for batch, positions in [(1, 256), (1, 65536), (1, 262144), (32, 65536), (1, 4096 * 4096)]:
        chunk = context_chunk(batch, positions)
        assert chunk % POSITIONS == 0 and POSITIONS <= chunk <= 8192
        programs = batch * -(-positions // chunk)
        assert programs >= min(TARGET_PROGRAMS, batch * -(-positions // POSITIONS)) or chunk == 8192
        assert chunk == POSITIONS or programs * 2 > TARGET_PROGRAMS
    assert context_chunk(1, 512 * 512) == 512


def test_linear_attention_fast_path_switch_and_shape_rule(monkeypatch):
    """The fast attention runs only when switched on (set_fast_norm), on CUDA, with
    autograd off, with Triton and the kernels' head shape; the CPU keeps the native form."""
    from dsrdmpd.models import linear_attention_triton as lat
    from dsrdmpd.models import norm as norm_module
    from dsrdmpd.models.unet_blocks import LinearAttention
    m = LinearAttention(64)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert not m.fast and not m.uses_fast_path(x)
        set_fast_norm(m, True)
        assert m.fast and not m.uses_fast_path(x)                 # CPU input
    assert lat.supported(4, 32) == (lat.triton is not None)
    assert not lat.supported(4, 24) and not lat.supported(3, 32) and not lat.supported(1, 8)
    assert not lat.supported(1, 128)                              # its tiles would spill registers
    if lat.triton is not None:                                    # as if on CUDA: the switch decides
        monkeypatch.setattr(norm_module, "on_cuda", lambda t: True)
        with torch.no_grad():
            assert m.uses_fast_path(x)
            assert not set_fast_norm(LinearAttention(64, heads=3), True).uses_fast_path(x)   # 96 channels
            set_fast_norm(m, False)
            assert not m.uses_fast_path(x)
        set_fast_norm(m, True)
        assert not m.uses_fast_path(x)                            # autograd on: the native form


def test_attention_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """The linear attention's three kernels through Triton's compiler to sm_90 machine code
    (no GPU needed; needs ``triton``): float32 and bfloat16 qkv, full-float32 and TF32 dots,
    channels-last and the NCHW specialisation (a position stride of 1 becomes a constant)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsrdmpd.models import linear_attention_triton as lat
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def compile_(fn, consts, dtype):
        def kind(a):
            if a in ("qkv_ptr", "out_ptr"):
                return f"*{dtype}"
            return "*fp32" if a.endswith("_ptr") else "i32"
        missing = [q.name for q in fn.params if q.is_constexpr and q.name not in consts]
        assert not missing, f"constexpr arguments left unset: {missing}"
        signature = {a: "constexpr" if a in consts else kind(a) for a in fn.arg_names}
        src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32))

    kernels = []
    # (qkv dtype, NCHW?, dots): true float32 channels-last, TF32 NCHW, bfloat16 autocast channels-last
    for dtype, nchw, precision in (("fp32", False, "ieee"), ("fp32", True, "tf32"), ("bf16", False, "tf32")):
        unit = {"sp": 1} if nchw else {}
        kernels.append(compile_(lat._key_stats_kernel, {"HD": 128, "BLOCK_P": lat.POSITIONS, **unit}, dtype))
        kernels.append(compile_(lat._context_kernel, {"HEADS": 4, "D": 32, "CHUNK": 512, "BLOCK_P": lat.POSITIONS,
                                                      "DOT_PRECISION": precision, **unit}, dtype))
        kernels.append(compile_(lat._output_kernel, {"HEADS": 4, "D": 32, "BLOCK_P": lat.POSITIONS,
                                                     "DOT_PRECISION": precision,
                                                     **({"sp": 1, "op": 1} if nchw else {})}, dtype))
    assert len(kernels) == 9 and all(len(k.asm["cubin"]) > 1000 for k in kernels)


GRAD_FLOW_CHECK = r"""
import json, torch
from dsrdmpd.models import norm, unet_blocks as ub
norm.on_cuda = lambda x: True       # the fast paths on CPU tensors, run by the interpreter
torch.manual_seed(0)
block = ub.ResBlock(16, 32, 64)     # a 1x1-conv skip
block.requires_grad_(False)         # frozen: only the time embedding trains
x, w = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)
temb = torch.randn(2, 64, requires_grad=True)
def run(fast):
    norm.set_fast_norm(block, fast)
    temb.grad = None
    y = block(x, temb)
    (y * w).sum().backward()
    return y.requires_grad, temb.grad.clone()
native, native_grad = run(False)
fast, fast_grad = run(True)
print(json.dumps([native, fast, ((fast_grad - native_grad).abs().max() / native_grad.abs().max()).item()]))
"""


def test_fast_path_keeps_gradients_of_a_frozen_block_s_time_embedding():
    """A ResBlock whose own weights and input need no gradient but whose time embedding
    does (fine-tuning the conditioning alone): with the fast norms on and autograd on, the
    output still records and the time embedding's gradient equals the native one within
    1e-5 (the inference kernels, which have no backward, must not run while autograd is on)."""
    native, fast, err = _in_triton_interpreter(GRAD_FLOW_CHECK)
    assert native and fast and err < 1e-5, (fast, err)


def test_one_layout_rule_for_the_fast_paths():
    """is_channels_last: 4-D channels-last tensors only; a tensor contiguous in both layouts
    (one channel, or 1 x 1 spatial) counts as NCHW, and so does anything strided otherwise;
    memory_format_of names the layout the fast kernels keep."""
    from dsrdmpd.models.layout import is_channels_last, memory_format_of
    cl = torch.channels_last
    assert is_channels_last(torch.rand(2, 3, 4, 5).contiguous(memory_format=cl))
    assert memory_format_of(torch.rand(2, 3, 4, 5).contiguous(memory_format=cl)) == cl
    for t in (torch.rand(2, 3, 4, 5), torch.rand(2, 1, 4, 5).contiguous(memory_format=cl),
              torch.rand(2, 3, 1, 1).contiguous(memory_format=cl), torch.rand(2, 3, 4, 5)[..., ::2],
              torch.rand(3, 4, 5)):
        assert not is_channels_last(t) and memory_format_of(t) == torch.contiguous_format, t.shape
