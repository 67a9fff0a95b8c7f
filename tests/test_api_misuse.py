"""The Python API (dsrdmpd.inference.Dehazer) under the inputs and habits of a demanding
user: odd dtypes and layouts, one image instead of a batch, empty batches, bad values,
seeds, and the global state a call must leave alone. Tiny random models, 40 x 40 images."""
import pytest
import torch

from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.inference import Dehazer


def fresh_models():
    torch.manual_seed(0)
    return build_stage1({"dim": 32}), build_stage2({"dim": 8})


@pytest.fixture(scope="module")
def models():
    return fresh_models()


@pytest.fixture(scope="module")
def dehazer(models):
    return Dehazer(*models)


@pytest.fixture(scope="module")
def hazy():
    return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(dehazer, hazy):
    return dehazer(hazy)


@pytest.fixture(scope="module")
def ref1(dehazer, hazy):
    """The second image alone (exact comparisons use the same batch size)."""
    return dehazer(hazy[1:])


def test_other_float_dtypes_run_in_float32_and_come_back_in_the_callers_dtype(dehazer, hazy, ref1):
    out = dehazer(hazy[1:].double())
    assert out.restored.dtype == out.coarse.dtype == torch.float64
    assert torch.equal(out.restored, ref1.restored.double())
    assert torch.equal(out.coarse, ref1.coarse.double())
    half = dehazer(hazy[1:].half()).restored
    assert half.dtype == torch.float16
    assert (half.float() - ref1.restored).abs().max() < 2e-2     # the input itself was rounded to float16


@pytest.mark.parametrize("bad, words", [
    (lambda x: (x * 255).to(torch.uint8), "dtype torch.uint8 (divide uint8 by 255)"),
    (lambda x: (x * 255).long(), "dtype torch.int64"),
    (lambda x: x > 0.5, "dtype torch.bool"),
    (lambda x: x * 255, "(0-255 values? divide by 255)"),
    (lambda x: x[:, :1], "got (2, 1, 40, 40)"),
    (lambda x: torch.cat([x, x[:, :1]], 1), "got (2, 4, 40, 40)"),
    (lambda x: x[None], "got (1, 2, 3, 40, 40)"),
    (lambda x: x.index_fill(3, torch.tensor([5]), float("nan")), "NaN or infinite"),
    (lambda x: x.to("meta"), "meta device"),
])
def test_unusable_input_is_a_one_line_error_naming_the_problem(dehazer, hazy, bad, words):
    with pytest.raises(ValueError) as err:
        dehazer(bad(hazy))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("thing", [[[0.5]], 0.5, None])
def test_a_non_tensor_is_a_type_error(dehazer, thing):
    with pytest.raises(TypeError, match="expected a torch.Tensor of hazy images"):
        dehazer(thing)


def test_an_empty_batch_gives_empty_outputs(dehazer, hazy):
    out = dehazer(hazy[:0])
    assert out.coarse.shape == out.restored.shape == (0, 3, 40, 40)


def test_one_image_without_a_batch_axis_keeps_its_rank(dehazer, hazy, ref1):
    out = dehazer(hazy[1])
    assert out.restored.shape == out.coarse.shape == (3, 40, 40)
    assert torch.equal(out.restored, ref1.restored[0])
    noise = torch.randn(3, 64, 64)        # and its start noise may come without one too
    assert torch.equal(dehazer(hazy[1], noise=noise).restored, dehazer(hazy[1:], noise=noise[None]).restored[0])


def test_the_input_memory_layout_does_not_change_the_result(dehazer, reference):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = dehazer(x).restored
    assert torch.equal(dehazer(x.contiguous(memory_format=torch.channels_last)).restored, expected)
    wide = torch.zeros(1, 3, 64, 80)
    wide[..., :64] = x
    assert torch.equal(dehazer(wide[..., :64]).restored, expected)      # a sliced view


def test_outputs_are_plain_tensors_usable_in_autograd_and_in_place(dehazer, hazy, ref1):
    x = hazy[1:].clone().requires_grad_()
    out = dehazer(x)
    assert not out.restored.requires_grad and torch.equal(out.restored, ref1.restored)
    assert out.restored.is_contiguous() and out.coarse.is_contiguous()
    assert not out.restored.is_inference() and not out.coarse.is_inference()
    ((out.restored - x) ** 2).sum().backward()       # e.g. as a target in a loss
    assert torch.allclose(x.grad, 2 * (x - out.restored).detach())
    out.restored.clamp_(0.1, 0.9)                     # and edited in place


def test_models_left_in_train_mode_run_in_eval_mode_and_keep_their_mode(hazy, ref1):
    s1, s2 = fresh_models()                          # the same weights as the shared ones, which stay untouched
    d = Dehazer(s1, s2)
    stats = {k: v.clone() for k, v in s1.state_dict().items() if "running" in k}
    s1.train()
    s2.train()
    try:
        out = d(hazy[1:])
        assert s1.training and s2.training and all(m.training for m in s1.modules())
    finally:
        s1.eval()
        s2.eval()
    assert torch.equal(out.restored, ref1.restored)          # BatchNorm used its running statistics
    # after a call in eval mode (the Dehazer keeps its list of modules), one BatchNorm alone in train mode
    d(hazy[1:])
    bn = next(m for m in s1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.train()
    assert torch.equal(d(hazy[1:]).restored, ref1.restored) and bn.training and not s1.training
    bn.eval()
    # a copy of the Dehazer given other networks (as tests/parity_cases.exact_chain makes) walks those
    import copy
    twin = copy.copy(d)
    twin.stage1 = copy.deepcopy(s1)
    twin_bn = next(m for m in twin.stage1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    twin_bn.train()
    assert torch.equal(twin(hazy[1:]).restored, ref1.restored) and twin_bn.training
    assert all(torch.equal(s1.state_dict()[k], v) for k, v in stats.items())   # and did not update them


def test_a_call_leaves_global_state_alone(models, hazy, ref1):
    d = Dehazer(*models, eta=0.5)                      # eta > 0 draws extra noise every step
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())
    d(hazy[:1])
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert flags == (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
                     torch.are_deterministic_algorithms_enabled())
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = Dehazer(*models)(hazy[1:])
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(saved)
    assert torch.equal(out.restored, ref1.restored)


def test_eta_noise_is_reproducible_and_each_images_own(models, hazy, reference):
    d = Dehazer(*models, eta=0.5)
    torch.manual_seed(7)
    both = d(hazy).restored
    torch.manual_seed(8)                               # neither the global RNG nor batch-mates play a part
    alone = d(hazy[1:]).restored[0]
    assert (alone - both[1]).abs().max() < 1e-4       # (float32 rounding of batched kernels)
    assert (both - reference.restored).abs().max() > 1e-2              # and eta does something


def test_batch_mates_repeats_and_seeds(dehazer, hazy, reference, ref1):
    assert (ref1.restored[0] - reference.restored[1]).abs().max() < 1e-4    # float32 rounding of batched kernels
    assert torch.equal(dehazer(hazy[1:]).restored, ref1.restored)
    assert torch.equal(dehazer(hazy[1:], seed=dehazer.seed).restored, ref1.restored)
    assert (dehazer(hazy[1:], seed=dehazer.seed + 1).restored - ref1.restored).abs().max() > 1e-2


@pytest.mark.parametrize("seed, error, words", [
    (1.5, TypeError, "seed must be an integer, got float 1.5"),
    ("1", TypeError, "seed must be an integer, got str '1'"),
    (True, TypeError, "seed must be an integer, got bool"),
    (2 ** 64, ValueError, "outside [-2**63, 2**64)"),
])
def test_a_seed_must_be_an_integer_in_range(models, dehazer, hazy, seed, error, words):
    with pytest.raises(error) as err:
        dehazer(hazy, seed=seed)
    assert words in str(err.value)
    with pytest.raises(error):
        Dehazer(*models, seed=seed)


def test_start_noise_of_the_wrong_shape_is_refused(dehazer, hazy):
    with pytest.raises(ValueError, match=r"padded shape \(2, 3, 64, 64\), got \(1, 3, 64, 64\)"):
        dehazer(hazy, noise=torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("h, w", [(1, 1), (8, 5), (3, 130)])
def test_tiny_and_elongated_images_keep_their_size(dehazer, h, w):
    out = dehazer(torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)))
    assert out.restored.shape == (1, 3, h, w)
    assert bool(torch.isfinite(out.restored).all()) and 0 <= out.restored.min() and out.restored.max() <= 1


@pytest.mark.parametrize("option, words", [
    ({"eta": -0.5}, "eta must be a finite number >= 0, got -0.5"),
    ({"eta": float("nan")}, "eta must be a finite number >= 0, got nan"),
    ({"steps": 0}, "steps must be an integer in [1, 1000]"),
    ({"steps": 1001}, "steps must be an integer in [1, 1000]"),
    ({"steps": 2.5}, "steps must be an integer in [1, 1000]"),
])
def test_sampling_options_out_of_range_are_refused(models, option, words):
    with pytest.raises(ValueError) as err:
        Dehazer(*models, **option)
    assert words in str(err.value)


def test_checkpoints_and_config_may_be_given_as_paths(models, hazy, ref1, tmp_path):
    from pathlib import Path
    from dsrdmpd.builders import save_stage
    s1, s2 = models
    save_stage(s1, tmp_path / "s1.pt", 1, {"dim": 32})
    save_stage(s2, tmp_path / "s2.pt", 2, {"dim": 8})
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("stage1: {dim: 32}\nstage2: {dim: 8}\nsampling: {seed: 0}\n")
    d = Dehazer.from_checkpoints(Path(tmp_path / "s1.pt"), Path(tmp_path / "s2.pt"), config=Path(cfg))
    assert torch.equal(d(hazy[1:]).restored, ref1.restored)
