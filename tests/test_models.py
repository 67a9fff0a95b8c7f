"""Shapes, size rules, fast path == straightforward path, checkpoints (tiny widths)."""
from __future__ import annotations

import pytest
import torch

from dsrdmpd.builders import build_stage1, build_stage2, load_stage1, load_stage2, save_stage
from dsrdmpd.checkpoints import CheckpointError, load_into
from dsrdmpd.diffusion import start_noise
from dsrdmpd.inference import Dehazer, padded_size
from dsrdmpd.models import MCESSUNet, ResidualDiffusionUNet

S2 = {"dim": 8, "dim_mults": [1, 2, 4, 8], "perceptual_decoder": True}


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    s1 = build_stage1({"dim": 32}).eval()
    s2 = build_stage2(S2).eval()
    _randomize(s2.net)
    return s1, s2


@pytest.mark.parametrize("h,w", [(60, 64), (64, 72), (48, 48), (80, 100)])
def test_stage1_size_rule_error(h, w):
    model = MCESSUNet(32).eval()
    with pytest.raises(ValueError, match="multiples of 16 and at least 64"):
        model(torch.rand(1, 3, h, w))


@pytest.mark.parametrize("dim", [0, 48])
def test_stage1_width_rule(dim):
    with pytest.raises(ValueError, match=f"stage-1 dim must be a positive multiple of 32, got {dim}"):
        MCESSUNet(dim)


@pytest.mark.parametrize("dim", [0, 12])
def test_stage2_width_rule(dim):
    with pytest.raises(ValueError, match=rf"stage-2 dim must be a positive multiple of 8 \(its GroupNorm groups\), got {dim}"):
        ResidualDiffusionUNet(dim, dim_mults=(1, 2))


def test_stage2_size_rule_error(tiny):
    _, s2 = tiny
    with pytest.raises(ValueError, match="multiple of 8"):
        s2.net(torch.rand(1, 9, 36, 40), torch.tensor([3]))


@pytest.mark.parametrize("h,w", [(37, 50), (64, 64), (70, 129), (5, 9)])
def test_api_pads_and_crops_back(tiny, h, w):
    s1, s2 = tiny
    out = Dehazer(s1, s2)(torch.rand(2, 3, h, w))
    assert out.coarse.shape == out.restored.shape == (2, 3, h, w)
    assert out.restored.min() >= 0 and out.restored.max() <= 1
    assert padded_size(h, w)[0] % 16 == 0 and padded_size(h, w)[0] >= 64


def test_fast_path_equals_straightforward(tiny):
    _, s2 = tiny
    c, x = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    fast = s2.sample(c, x, seed=3, fast=True)
    slow = s2.sample(c, x, seed=3, fast=False)
    assert (fast - slow).abs().max() < 1e-5
    other_seed = s2.sample(c, x, seed=4, fast=True)
    assert (fast - other_seed).abs().max() > 1e-3, "seed has no effect"


def test_fast_path_skips_noise_decoder_and_caches_fusion(tiny, monkeypatch):
    _, s2 = tiny
    calls = {"noise": 0, "fusion": 0}
    noise_fwd = s2.net.noise_decoder.forward
    fusion_fwd = type(s2.net.residual_decoder.fusions[0]).forward

    def count_noise(*a, **k):
        calls["noise"] += 1
        return noise_fwd(*a, **k)

    def count_fusion(self, *a, **k):
        calls["fusion"] += 1
        return fusion_fwd(self, *a, **k)

    monkeypatch.setattr(s2.net.noise_decoder, "forward", count_noise)
    monkeypatch.setattr(type(s2.net.residual_decoder.fusions[0]), "forward", count_fusion)
    s2.sample(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), steps=5, fast=True)
    assert calls == {"noise": 0, "fusion": 4}       # 4 levels, once each for 5 steps
    calls.update(noise=0, fusion=0)
    s2.sample(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), steps=5, fast=False)
    assert calls == {"noise": 5, "fusion": 40}      # 2 decoders x 4 levels x 5 steps


def test_start_noise_is_per_image_and_seeded():
    n = start_noise((3, 3, 8, 8), seed=7)
    ref = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    for i in range(3):
        assert torch.equal(n[i:i + 1], ref)


def test_sampler_grid_is_float32_whatever_the_default_dtype():
    """The authors' grid is float32 linspace truncated to ints; a float64 default dtype (the
    float64 reference runs set it) must not change it. For 26 steps of 1000 the two differ
    (so this test can fail), and the grid is cached: computed afresh here under float64."""
    from dsrdmpd.diffusion.schedule import RDDMSchedule, time_grid
    want = list(reversed(torch.linspace(-1, 999, 27, dtype=torch.float32).int().tolist()))
    assert want != list(reversed(torch.linspace(-1, 999, 27, dtype=torch.float64).int().tolist()))
    time_grid.cache_clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert RDDMSchedule.build(1000).sampling_times(26) == want
    finally:
        torch.set_default_dtype(default)
        time_grid.cache_clear()


def test_sampler_schedule_grid(tiny):
    _, s2 = tiny
    assert s2.schedule.sampling_times(5) == [999, 799, 599, 399, 199, -1]
    assert abs(float(s2.schedule.alphas_cumsum[-1]) - 1) < 1e-6
    assert abs(float(s2.schedule.betas2_cumsum[-1]) - 1) < 1e-6


def test_eta_positive_adds_noise(tiny):
    _, s2 = tiny
    c, x = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    a = s2.sample(c, x, seed=0, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = s2.sample(c, x, seed=0, eta=0.0)
    assert (a - b).abs().max() > 1e-4 and a.min() >= 0 and a.max() <= 1


def test_project_checkpoint_round_trip(tiny, tmp_path):
    s1, s2 = tiny
    save_stage(s1, tmp_path / "s1.pt", 1, {"stage1": {"dim": 32}})
    save_stage(s2, tmp_path / "s2.pt", 2, {"stage2": {**S2, "timesteps": 1000, "sampling_timesteps": 5,
                                                      "objective": "pred_res", "sum_scale": 1.0}})
    s1b, s2b = load_stage1(tmp_path / "s1.pt"), load_stage2(tmp_path / "s2.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(s1(x), s1b(x))
    c = torch.rand(1, 3, 32, 32)
    assert torch.equal(s2.sample(c, c, seed=1), s2b.sample(c, c, seed=1))


def test_float16_official_state_dict_loads(tiny, tmp_path):
    s1, _ = tiny
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in s1.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    loaded = load_stage1(tmp_path / "half.pth")
    assert loaded.encoder[0].conv1.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.encoder[0].conv1.weight, s1.encoder[0].conv1.weight.half().float())


def test_mismatch_lists_missing_unexpected_and_wrong_shape(tiny):
    _, s2 = tiny
    sd = dict(s2.net.state_dict())
    sd.pop("stem.bias")
    sd["bogus.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(1)
    sd["stem.weight"] = torch.zeros(8, 9, 3, 3)
    with pytest.raises(CheckpointError) as err:
        load_into(s2.net, sd, "file.pt")
    msg = str(err.value)
    assert "file.pt" in msg and "missing keys (1): stem.bias" in msg
    assert "unexpected keys (2)" in msg and "bogus.weight" in msg
    assert "wrong-shape keys (1): stem.weight" in msg


def test_wrong_variant_is_reported(tiny, tmp_path):
    _, s2 = tiny
    torch.save({"model": {f"model.{k}": v for k, v in s2.net.state_dict().items()}}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(128\): noise_decoder\.fusions"):
        load_stage2(tmp_path / "m.pt", cfg={**S2, "perceptual_decoder": False})


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_stage1(bad)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_stage1(tmp_path / "nothere.pth")


def test_plain_variant_has_no_fusion():
    net = ResidualDiffusionUNet(8, (1, 2, 4, 8), perceptual_decoder=False)
    assert net.residual_decoder.fusions is None and net.noise_decoder.fusions is None
    res, noise = net(torch.rand(1, 9, 16, 16), torch.tensor([10]))
    assert res.shape == noise.shape == (1, 3, 16, 16)


def test_misspelt_model_key_is_an_error_with_a_suggestion():
    from dsrdmpd.config import ConfigError
    with pytest.raises(ConfigError, match=r"stage2\.sampling_timestep \(did you mean stage2\.sampling_timesteps\?\)"):
        build_stage2({"dim": 8, "sampling_timestep": 3})
    with pytest.raises(ConfigError, match=r"unknown config key stage1\.width"):
        build_stage1({"width": 32})
    with pytest.raises(ConfigError, match=r"loss_type 'l2' is not supported"):
        build_stage2({"dim": 8, "loss_type": "l2"})


@pytest.mark.parametrize("cfg", [{"dim": 8}, {"dim": 8, "dim_mults": [1, 2]}, {"dim": 8, "input_condition": False},
                                 {"dim": 8, "perceptual_decoder": False}])
def test_fusion_cache_equals_what_a_forward_pass_fills_in(cfg):
    """ResidualDiffusionUNet.fusion_cache (the ahead-of-time pipeline's fusion-terms program)
    computes each level's term at that level's size from the input alone: the same tensors
    the fast sampler's first network call caches."""
    torch.manual_seed(0)
    net = build_stage2(cfg).net.eval()
    x_in = torch.rand(2, net.in_channels, 32, 48) * 2 - 1
    filled = {}
    with torch.no_grad():
        net(x_in, torch.tensor([3, 7]), need_noise_decoder=False, fusion_cache=filled)
        direct = net.fusion_cache(x_in)
    assert sorted(direct) == sorted(filled) == (list(range(len(cfg.get("dim_mults", [1, 2, 4, 8]))))
                                                if cfg.get("perceptual_decoder", True) else [])
    for i in filled:
        assert torch.equal(direct[i], filled[i])


def test_sample_with_a_network_stand_in_calls_it_once_per_step():
    """sample(network=...) routes every step's network call through the stand-in, with the
    fusion cache the fast sampler keeps; the same network gives the same result."""
    torch.manual_seed(0)
    s2 = build_stage2({"dim": 8}).eval()
    c, x = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    seen = []

    def network(x_in, t, cache):
        seen.append((int(t[0]), cache is not None))
        return s2.net(x_in, t, need_noise_decoder=False, fusion_cache=cache)[0]
    ref = s2.sample(c, x, seed=3, steps=4)
    out = s2.sample(c, x, seed=3, steps=4, network=network)
    assert torch.equal(out, ref)
    assert [t for t, _ in seen] == list(s2.schedule.sampling_times(4)[:-1]) and all(k for _, k in seen)


@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 9, 13)])
def test_linear_attention_on_channels_last_input_runs_in_place_and_equals_the_nchw_form(shape, monkeypatch):
    """Channels-last input takes the layout-keeping form (q, k, v from their own weight
    slices, the heads' contexts as diagonal blocks of one product): the same result as the
    NCHW einsum form within float32 rounding, residual included, returned channels-last;
    NCHW input keeps the einsum form."""
    from dsrdmpd.models.unet_blocks import LinearAttention
    torch.manual_seed(0)
    m = LinearAttention(64).eval()
    b, h, w = shape
    x, r = torch.randn(b, 64, h, w), torch.randn(b, 64, h, w)
    taken = []
    real = LinearAttention._attend_channels_last
    monkeypatch.setattr(LinearAttention, "_attend_channels_last", lambda self, t: taken.append(1) or real(self, t))
    with torch.no_grad():
        ref, ref_r = m(x), m(x, residual=r)
        assert not taken
        xc = x.contiguous(memory_format=torch.channels_last)
        out, out_r = m(xc), m(xc, residual=r.contiguous(memory_format=torch.channels_last))
    assert len(taken) == 2
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5) and torch.allclose(out_r, ref_r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out_r, ref + r, rtol=1e-5, atol=1e-5)


def _fusion_as_the_authors(m, coarse, hazy, size):
    """ConditionalFeatureFusion as the authors compute it: both encoders at full
    resolution, then F.interpolate (bilinear, align_corners=True) to ``size``."""
    import torch.nn.functional as F
    f = F.interpolate(m.coarse_encoder(coarse), size=size, mode="bilinear", align_corners=True)
    g = F.interpolate(m.hazy_encoder(hazy), size=size, mode="bilinear", align_corners=True)
    fg = torch.cat((f, g), dim=1)
    gate = torch.sigmoid(m.gate_conv2(F.leaky_relu(m.gate_conv1(fg), 0.1)))
    return f * gate + m.shift_conv2(F.leaky_relu(m.shift_conv1(fg), 0.1))


# (H, W) -> (h, w): 1/8 and 1/4 (second convolution at the read positions only), a
# non-square image with ratios that are not powers of two, one output sample, and the
# sizes that keep the full convolution (1/2: the taps cover every row; the same size)
FUSION_SIZES = [((64, 48), (8, 6), True), ((64, 64), (16, 16), True), ((96, 40), (12, 10), True),
                ((40, 24), (1, 1), True), ((32, 48), (16, 24), False), ((16, 24), (16, 24), False)]


@pytest.mark.parametrize("image,size,at_taps", FUSION_SIZES)
def test_fusion_encoders_at_the_read_positions_equal_the_full_resize(image, size, at_taps):
    """The fusion layer evaluates its encoders' second convolution only where the bilinear
    resize reads (levels at 1/4 of the image size or smaller) and resizes from those
    values: in float64 the term and every parameter's gradient equal the authors' form
    (full-size encoders, F.interpolate) within 1e-12 of their largest value; in float32 the
    term within 8 ulps of its magnitude (measured: 0 to 1 ulp); the full-size second
    convolution runs only where the taps would cover most of the image (counted)."""
    from dsrdmpd.models import ConditionalFeatureFusion
    torch.manual_seed(0)
    m = ConditionalFeatureFusion(16, hidden=8).double()
    coarse, hazy = (torch.rand(2, 3, *image, dtype=torch.float64) * 2 - 1 for _ in range(2))
    weight = torch.randn(2, 16, *size, dtype=torch.float64)
    full_convs = []
    m.coarse_encoder[2].register_forward_hook(lambda *a: full_convs.append(1))
    grads = []
    for form in (_fusion_as_the_authors, type(m).__call__):
        m.zero_grad()
        term = form(m, coarse, hazy, size)
        (term * weight).sum().backward()
        grads.append((term.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert len(full_convs) == (1 if at_taps else 2)
    (ref, ref_grads), (new, new_grads) = grads
    assert new.shape == (2, 16, *size)
    assert (new - ref).abs().max() <= 1e-12 * ref.abs().max()
    for n, g in ref_grads.items():
        assert (new_grads[n] - g).abs().max() <= 1e-12 * g.abs().max(), n
    m32 = m.float()
    with torch.no_grad():
        ref32 = _fusion_as_the_authors(m32, coarse.float(), hazy.float(), size)
        new32 = m32(coarse.float(), hazy.float(), size)
    assert (new32 - ref32).abs().max() <= 8 * torch.finfo(torch.float32).eps * ref32.abs().max()


@pytest.mark.parametrize("n_in,n_out", [(256, 32), (63, 16), (40, 1), (7, 7), (100, 13)])
def test_bilinear_taps_reproduce_pytorchs_resize(n_in, n_out):
    """bilinear_taps' indices and weights, applied to a random signal, give
    F.interpolate(bilinear, align_corners=True) along that axis: within 2 float32 ulps of
    the signal's magnitude in float32 (the same float32 scale and source index; PyTorch's CPU
    kernel orders the lerp's arithmetic differently: measured up to 1 ulp), within 1e-15 in
    float64. Wrong indices or weights are off by a sizeable fraction of the signal."""
    import torch.nn.functional as F
    from dsrdmpd.models.perceptual import bilinear_taps
    for dtype, ulps in ((torch.float32, 2), (torch.float64, 5)):
        signal = torch.randn(1, 1, n_in, 1, generator=torch.Generator().manual_seed(n_in), dtype=dtype)
        ref = F.interpolate(signal, size=(n_out, 1), mode="bilinear", align_corners=True).view(-1)
        index, weight = bilinear_taps(n_in, n_out, dtype=dtype)
        s = signal.view(-1)
        ours = weight[:n_out] * s[index[:n_out]] + weight[n_out:] * s[index[n_out:]]
        assert index.min() >= 0 and index.max() < n_in
        assert (ours - ref).abs().max() <= ulps * torch.finfo(dtype).eps * s.abs().max()


def test_fusion_gathers_stay_out_of_deterministic_cuda_training():
    """gathers_allowed: the read-position form runs with autograd off, on the CPU, and on
    CUDA while recording only without deterministic algorithms (its deterministic backward
    sorts indices, which the captured deterministic training step must not meet)."""
    from types import SimpleNamespace
    from dsrdmpd.models.perceptual import gathers_allowed
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            for cuda in (False, True):
                image = SimpleNamespace(is_cuda=cuda)
                with torch.no_grad():
                    assert gathers_allowed(image)
                with torch.enable_grad():
                    assert gathers_allowed(image) == (not (cuda and deterministic)), (cuda, deterministic)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
