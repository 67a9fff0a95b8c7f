"""Speed options keep outputs within their stated tolerance of the float32 reference.

CPU tests run everywhere (tiny widths, the official chain fixture); CUDA tests skip
without a GPU. bf16 accuracy depends on the weights (see test_bf16_accuracy_cpu).
"""
from __future__ import annotations

import math

import pytest
import torch

from dsrdmpd.builders import build_stage2
from dsrdmpd.imageio import read_image
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.unet_blocks import Attention, set_fused_attention


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def chain_reference(chain):
    path = chain
    hazy = torch.stack([read_image(p).tensor for p in sorted((path / "data" / "hazy").iterdir())])
    ckpts = (str(path / "stage1_official.pth"), str(path / "stage2_official.pt"))
    reference = Dehazer.from_checkpoints(*ckpts)(hazy)
    return ckpts, hazy, reference


def test_fused_attention_equals_explicit():
    torch.manual_seed(0)
    attn = Attention(16).eval()
    x = torch.randn(2, 16, 12, 20)
    with torch.no_grad():
        fused = attn(x)
        attn.fused = False
        explicit = attn(x)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)
    assert (fused - explicit).abs().max() < 1e-5 and fused.abs().max() > 1e-2


def test_fused_attention_sample_equals_explicit():
    torch.manual_seed(0)
    s2 = build_stage2({"dim": 8}).eval()
    c, x = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    fused = s2.sample(c, x, seed=1)
    explicit = set_fused_attention(s2, False).sample(c, x, seed=1)
    assert (fused - explicit).abs().max() < 1e-4


def test_channels_last_matches_float32(chain_reference):
    ckpts, hazy, ref = chain_reference
    out = Dehazer.from_checkpoints(*ckpts, channels_last=True)(hazy)
    assert (out.coarse - ref.coarse).abs().max() < 1e-5
    assert (out.restored - ref.restored).abs().max() < 5e-4


@pytest.mark.parametrize("precision,min_coarse_db,min_restored_db", [("bf16-stage1", 55, 38), ("bf16", 55, 20)])
def test_bf16_accuracy_cpu(chain_reference, precision, min_coarse_db, min_restored_db):
    """bf16 accuracy depends on the weights (their scale sets how far bfloat16's 8-bit
    mantissa errors grow through the network) and on how many outputs sit in the clamp's
    saturated range, so it varies between seeds. Restored PSNR against float32, measured by
    ``tests/parity_report.py --skip-parity --bf16`` (three of the in-repository chain sets
    and 3 random tiny models so far; README "Tests"), was at least 45.3 dB (bf16-stage1) and 27.9 dB
    (bf16); the lowest seed known, from issue 20 (another machine), gave 42.8 / 23.6 dB.
    The bounds, 38 and 20 dB, sit 4.8 and 3.6 dB below the lowest of all these (a margin
    for other CPUs' kernels); the official set itself gives about 50.8 / 32.7 dB here."""
    ckpts, hazy, ref = chain_reference
    dehazer = Dehazer.from_checkpoints(*ckpts, precision=precision)
    dtypes = {1: set(), 2: set()}       # what the convolutions of each stage really computed in
    for stage, model in ((1, dehazer.stage1), (2, dehazer.stage2.net)):
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, i, o, s=stage: dtypes[s].add(o.dtype))
    out = dehazer(hazy)
    assert dtypes[1] == {torch.bfloat16}
    assert dtypes[2] == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    assert out.restored.dtype == torch.float32 and out.restored.shape == ref.restored.shape
    assert min_coarse_db < psnr(out.coarse, ref.coarse) < 200
    assert psnr(out.restored, ref.restored) > min_restored_db


def test_tile_batching_equals_one_tile_per_call():
    torch.manual_seed(0)
    from dsrdmpd.builders import build_stage1
    s1, s2 = build_stage1({"dim": 32}).eval(), build_stage2({"dim": 8, "sampling_timesteps": 2}).eval()
    x = torch.rand(2, 3, 96, 160)
    one = Dehazer(s1, s2, tile=64, overlap=16, tile_batch=1)(x).restored
    many = Dehazer(s1, s2, tile=64, overlap=16, tile_batch=5)(x).restored
    assert (one - many).abs().max() < 1e-4        # batched convs differ from single ones by rounding only


def test_unknown_precision_is_refused():
    torch.manual_seed(0)
    from dsrdmpd.builders import build_stage1
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}), precision="fp16")


@needs_cuda
@pytest.mark.parametrize("opts,min_db", [({}, 80), ({"channels_last": True}, 60), ({"precision": "tf32"}, 40),
                                         ({"precision": "bf16-stage1"}, 38),
                                         ({"precision": "bf16-stage1", "channels_last": True}, 38),
                                         ({"precision": "bf16"}, 20)])
def test_gpu_options_against_cpu_float32(chain_reference, opts, min_db):
    ckpts, hazy, ref = chain_reference
    out = Dehazer.from_checkpoints(*ckpts, device="cuda", **opts)(hazy)
    assert psnr(out.restored.cpu(), ref.restored) > min_db


@needs_cuda
def test_gpu_compile_matches_eager(chain_reference):
    ckpts, hazy, _ = chain_reference
    eager = Dehazer.from_checkpoints(*ckpts, device="cuda")(hazy).restored
    compiled = Dehazer.from_checkpoints(*ckpts, device="cuda", compile=True)(hazy).restored
    assert psnr(compiled, eager) > 60


@pytest.mark.parametrize("precision,inside", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_tensorfloat32_flags_for_a_cuda_dehazer(precision, inside):
    """The flag logic alone (runs on the CPU: the flags can be set without a GPU): on a CUDA
    device only precision='tf32' allows TF32, and PyTorch's flags come back afterwards."""
    from dsrdmpd.builders import build_stage1
    torch.manual_seed(0)
    d = Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}), precision=precision)
    d.device = torch.device("cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for before in (True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = before
            with d._float32_mode():
                assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (inside, inside)
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (before, before)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
