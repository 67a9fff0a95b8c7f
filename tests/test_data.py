"""Pairing by name key, image modes, bad files, batch order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dsrdmpd.data import DataError, PairedImageDataset, PairingError, StepBatchSampler, find_pairs, split_pairs
from dsrdmpd.imageio import ImageReadError, read_image, write_image

from conftest import png_bytes, png_chunks


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _rgb(h=16, w=16, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_pairs_by_key_not_by_order(tmp_path):
    """The two folders list their files in different orders (the GT names start with a
    prefix that sorts the other way); each hazy image is paired with the GT of its key,
    whose pixels are identical here, so a pairing by position would show."""
    ns = ["1", "2", "10"]
    for i, n in enumerate(ns):
        img = _rgb(seed=int(n))
        _png(tmp_path / "input" / f"{n}-inputs.png", img)
        _png(tmp_path / "target" / f"{'zyx'[i]}_{n}.png", img)
    listed = [p.name for p in sorted((tmp_path / "target").iterdir())]
    assert listed == ["x_10.png", "y_2.png", "z_1.png"]          # the opposite order to the hazy side
    pairs = find_pairs(tmp_path / "input", tmp_path / "target", r"(.+)-inputs", r"[xyz]_(.+)")
    assert [p.key for p in pairs] == ["1", "2", "10"]
    ds = PairedImageDataset(pairs)
    for i in range(3):
        assert torch.equal(ds[i]["hazy"], ds[i]["gt"])


def test_natural_order_ignores_case_and_reads_digit_runs():
    """Keys sort by digit value and without regard to case (names equal but for case by
    their exact text); a lone '²' is text, not a number (str.isdigit says it is one)."""
    from dsrdmpd.data.pairing import natural_key
    keys = ["img10", "B1", "img2", "a1", "A1", "²", "x10", "x2"]
    assert sorted(keys, key=natural_key) == ["A1", "a1", "B1", "img2", "img10", "x2", "x10", "²"]


def test_satehaze1k_preset(tmp_path):
    _png(tmp_path / "test" / "input" / "7-inputs.png", _rgb())
    _png(tmp_path / "test" / "target" / "7-targets.png", _rgb())
    pairs = split_pairs({"preset": "satehaze1k", "root": str(tmp_path)}, "test")
    assert len(pairs) == 1 and pairs[0].key == "7"


def test_generic_preset_with_custom_folders(tmp_path):
    _png(tmp_path / "blur" / "a_blur.png", _rgb())
    _png(tmp_path / "gt" / "a.png", _rgb())
    pairs = split_pairs({"preset": "paired", "root": str(tmp_path), "hazy_dir": "blur", "gt_dir": "gt",
                         "hazy_key": r"(.+)_blur"}, "any")
    assert pairs[0].key == "a"


def test_unmatched_files_are_named(tmp_path):
    for n in ["1", "2", "3"]:
        _png(tmp_path / "hazy" / f"{n}.png", _rgb())
    for n in ["1", "3", "4"]:
        _png(tmp_path / "GT" / f"{n}.png", _rgb())
    with pytest.raises(PairingError) as err:
        find_pairs(tmp_path / "hazy", tmp_path / "GT")
    assert "hazy without ground truth: 2.png" in str(err.value)
    assert "ground truth without hazy: 4.png" in str(err.value)


def test_macos_appledouble_files_are_not_images(tmp_path):
    """'._1.png' beside '1.png' (what macOS leaves on shared drives) is metadata: folder runs
    and pairing skip it, while a real image whose name starts with '._' is kept."""
    from dsrdmpd.imageio import list_images
    for side in ("hazy", "GT"):
        for n in ("1", "2"):
            _png(tmp_path / side / f"{n}.png", _rgb())
    (tmp_path / "GT" / "._1.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60))
    (tmp_path / "hazy" / "._2.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    assert [p.key for p in find_pairs(tmp_path / "hazy", tmp_path / "GT")] == ["1", "2"]
    assert [p.name for p in list_images(tmp_path / "hazy")] == ["1.png", "2.png"]
    _png(tmp_path / "hazy" / "._3.png", _rgb())
    assert [p.name for p in list_images(tmp_path / "hazy")] == ["._3.png", "1.png", "2.png"]


def test_a_broken_link_fails_by_name_instead_of_vanishing(tmp_path):
    """A link whose target is gone is still listed and paired, so its item fails with the
    reason instead of silently missing from the results; a link to a folder is not an image."""
    from dsrdmpd.imageio import list_images
    for side in ("hazy", "GT"):
        _png(tmp_path / side / "1.png", _rgb())
    (tmp_path / "hazy" / "2.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "GT" / "2.png").symlink_to(tmp_path / "GT" / "1.png")
    (tmp_path / "hazy" / "dir.png").symlink_to(tmp_path / "GT", target_is_directory=True)
    assert [p.name for p in list_images(tmp_path / "hazy")] == ["1.png", "2.png"]
    assert [p.key for p in find_pairs(tmp_path / "hazy", tmp_path / "GT")] == ["1", "2"]
    with pytest.raises(ImageReadError, match=r"2.png: broken link \(to .*gone.png\)"):
        read_image(tmp_path / "hazy" / "2.png")


def test_duplicate_keys_and_rule_mismatch(tmp_path):
    _png(tmp_path / "hazy" / "1.png", _rgb())
    _png(tmp_path / "hazy" / "1.jpg", _rgb())
    with pytest.raises(PairingError, match="1.jpg and 1.png have the same key"):
        find_pairs(tmp_path / "hazy", tmp_path / "hazy")
    with pytest.raises(PairingError, match="not matching the key rule"):
        find_pairs(tmp_path / "hazy", tmp_path / "hazy", r"(.+)-inputs")


def test_unreadable_and_truncated_images_are_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="bad.png: not a readable image"):
        read_image(bad)
    good = _png(tmp_path / "trunc.png", _rgb(64, 64))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc.png: cannot decode image"):
        read_image(good)


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    """Phone and drone frames are stored unrotated with an EXIF orientation: each of the 8 is
    read as Pillow's exif_transpose shows it (8-bit PNG, JPEG), and a 16-bit PNG (read through
    pypng) is turned alike; an image without the tag is as stored."""
    from PIL import ImageOps
    rgb = _rgb(5, 7)
    for o in range(1, 9):
        path = tmp_path / f"o{o}.png"
        Image.fromarray(rgb).save(path, exif=_exif(o))
        want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        got = read_image(path).tensor.permute(1, 2, 0).numpy()
        assert got.shape == want.shape and np.array_equal((got * 255).round().astype(np.uint8), want), o
    Image.fromarray(_rgb(40, 56)).save(tmp_path / "frame.jpg", exif=_exif(6))
    img = read_image(tmp_path / "frame.jpg")
    assert img.tensor.shape == (3, 56, 40) and "EXIF orientation 6" in img.conversion
    grey16 = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000 + 7)
    Image.fromarray(grey16).save(tmp_path / "g16.png", exif=_exif(8))
    img = read_image(tmp_path / "g16.png")
    assert img.bit_depth == 16
    assert np.array_equal((img.tensor[0].numpy() * 65535).round(), np.rot90(grey16, 1))


def test_exif_after_the_image_data_is_found(tmp_path):
    """The PNG specification lets the eXIf chunk come after the image data (some cameras and
    editors put it there): the orientation is found there too, for 8-bit (Pillow) and 16-bit
    (pypng) PNGs alike."""
    grey16 = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000 + 7)
    for name, pixels in (("rgb.png", _rgb(5, 7)), ("g16.png", grey16)):
        path = tmp_path / name
        Image.fromarray(pixels).save(path, exif=_exif(6))
        chunks = png_chunks(path.read_bytes())
        exif = [c for c in chunks if c[0] == b"eXIf"]
        rest = [c for c in chunks if c[0] != b"eXIf"]
        assert len(exif) == 1 and rest[-1][0] == b"IEND"
        path.write_bytes(png_bytes(rest[:-1] + exif + rest[-1:]))      # eXIf between the last IDAT and IEND
        assert [k for k, _ in png_chunks(path.read_bytes())].index(b"eXIf") > [k for k, _ in rest].index(b"IDAT")
        img = read_image(path)
        assert img.tensor.shape == (3, 7, 5) and "EXIF orientation 6" in img.conversion, name
        want = np.rot90(pixels, -1)          # 6: turned 90 degrees clockwise to be upright
        got = img.tensor.permute(1, 2, 0).numpy() if pixels.ndim == 3 else img.tensor[0].numpy()
        peak = 65535 if pixels.dtype == np.uint16 else 255
        assert np.array_equal((got * peak).round(), want), name


def test_a_cmyk_jpeg_is_read_as_rgb_and_says_so(tmp_path):
    """A print-ready CMYK JPEG (Adobe marker) is read in RGB by Pillow's formula, without colour
    management: close to the RGB it was made from, and summary.md's conversion note says so."""
    rgb = _rgb(16, 24)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.jpg", quality=100)
    with Image.open(tmp_path / "print.jpg") as im:
        assert im.mode == "CMYK"
    img = read_image(tmp_path / "print.jpg")
    assert img.tensor.shape == (3, 16, 24) and img.bit_depth == 8
    assert np.abs(img.tensor.permute(1, 2, 0).numpy() * 255 - rgb).mean() < 2     # JPEG's loss only
    assert img.conversion == "CMYK converted to RGB (no colour management)"
    assert read_image(_png(tmp_path / "plain.png", rgb)).conversion == ""


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "gray16"])
def test_mode_conversions_are_documented(tmp_path, kind):
    rgb = _rgb()
    if kind == "gray":
        path, note = _png(tmp_path / "g.png", rgb[..., 0]), "grayscale replicated"
    elif kind == "rgba":
        path, note = _png(tmp_path / "a.png", np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])), "alpha"
    elif kind == "palette":
        path = tmp_path / "p.png"
        Image.fromarray(rgb).convert("P").save(path)
        note = "palette"
    else:
        path = tmp_path / "g16.png"
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(path)
        note = "grayscale replicated"
    img = read_image(path)
    assert img.tensor.shape == (3, 16, 16) and img.tensor.dtype == torch.float32
    assert 0 <= img.tensor.min() and img.tensor.max() <= 1
    assert note in img.conversion
    if kind == "gray16":
        assert img.bit_depth == 16
        torch.testing.assert_close(img.tensor[0], torch.from_numpy(rgb[..., 0]).float() / 255)


def test_dataset_warns_on_conversion_and_rejects_size_mismatch(tmp_path):
    _png(tmp_path / "hazy" / "1.png", _rgb()[..., 0])
    _png(tmp_path / "GT" / "1.png", _rgb())
    _png(tmp_path / "hazy" / "2.png", _rgb(16, 16))
    _png(tmp_path / "GT" / "2.png", _rgb(16, 32))
    ds = PairedImageDataset(find_pairs(tmp_path / "hazy", tmp_path / "GT"))
    with pytest.warns(UserWarning, match="1.png: grayscale replicated"):
        ds[0]
    with pytest.raises(DataError, match=r"size mismatch: .*2.png is \(16, 16\) but .*2.png is \(16, 32\)"):
        ds[1]


def test_tiff_photometric_is_read_as_shown(tmp_path):
    """White-is-zero grey TIFFs (scans, bilevel documents) are inverted as Pillow shows them,
    1-bit ones read as black and white; CMYK and CIELab TIFFs are refused by name (their
    first three samples are not RGB)."""
    import tifffile
    grey = _rgb(6, 9)[..., 0]
    tifffile.imwrite(tmp_path / "white0.tif", grey, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "bilevel.tif", grey > 100, photometric="miniswhite")
    for name in ("white0.tif", "bilevel.tif"):
        shown = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=np.float32) / 255
        img = read_image(tmp_path / name)
        assert img.bit_depth == 8
        np.testing.assert_allclose(img.tensor.numpy(), np.broadcast_to(shown, (3, 6, 9)), atol=1e-6)
    assert read_image(tmp_path / "white0.tif").tensor[0, 0, 0] == pytest.approx(1 - grey[0, 0] / 255)
    tifffile.imwrite(tmp_path / "cmyk.tif", _rgb(6, 9, 1).repeat(2, axis=2)[..., :4], photometric="separated")
    with pytest.raises(ImageReadError, match=r"cmyk.tif: SEPARATED TIFF .*convert it to RGB"):
        read_image(tmp_path / "cmyk.tif")


def test_a_tiff_stack_of_grey_pages_is_not_read_as_rgb(tmp_path):
    """Three grey pages stored as one stack would be three colour channels: refused, naming
    the pages; a planar RGB page (one page, three samples) is still RGB."""
    import tifffile
    rgb = _rgb(6, 9)
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(rgb, 2, 0), photometric="minisblack")
    with pytest.raises(ImageReadError, match=r"stack.tif: a stack of 3 pages"):
        read_image(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif").tensor.numpy(),
                               np.moveaxis(rgb, 2, 0) / 255, atol=1e-6)


def test_a_16bit_png_with_significant_bits_keeps_its_values(tmp_path):
    """A 16-bit PNG from a 12-bit sensor says so in an sBIT chunk; its stored values are
    still 16-bit (a 12-bit value times 16): read as stored / 65535, not shifted to 12 bits
    and read 16 times too dark."""
    import io
    import png
    stored = (np.random.default_rng(3).integers(0, 4096, (6, 9 * 3)) * 16).astype(np.uint16)
    buf = io.BytesIO()
    png.Writer(9, 6, greyscale=False, bitdepth=16).write(buf, stored)
    chunks = []
    for kind, data in png.Reader(bytes=buf.getvalue()).chunks():
        chunks.append((kind, data))
        if kind == b"IHDR":
            chunks.append((b"sBIT", bytes([12, 12, 12])))
    with open(tmp_path / "sensor12.png", "wb") as f:
        png.write_chunks(f, chunks)
    img = read_image(tmp_path / "sensor12.png")
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.tensor.permute(1, 2, 0).numpy().reshape(6, 27), stored / 65535, atol=1e-6)


@pytest.mark.parametrize("h, w", [(2, 2), (5, 3), (4, 1), (6, 9)])
def test_a_planar_tiff_of_any_size_is_read_as_rgb(tmp_path, h, w):
    """Planar TIFFs store samples first (3, H, W); the layout comes from the file, not from
    guessing by shape, so images 1 to 4 pixels wide are not misread (a 2 x 2 one was read
    as 3 x 3 grey)."""
    import tifffile
    rgba = _rgb(h, w, 2).repeat(2, axis=2)[..., :4]
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgba[..., :3], 2, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "pa.tif", np.moveaxis(rgba, 2, 0), photometric="rgb", planarconfig="separate",
                     extrasamples=[2])
    for name in ("p.tif", "pa.tif"):
        img = read_image(tmp_path / name)
        np.testing.assert_allclose(img.tensor.numpy(), np.moveaxis(rgba[..., :3], 2, 0) / 255, atol=1e-6)


def test_tiff_16bit_round_trip(tmp_path):
    """Values that 8 bits cannot hold (k / 65535, k not a multiple of 257) survive."""
    levels = torch.arange(3 * 20 * 24, dtype=torch.float32).view(3, 20, 24) * 37 + 11
    img = levels / 65535
    write_image(img, tmp_path / "x.tif", bit_depth=16)
    back = read_image(tmp_path / "x.tif")
    assert back.bit_depth == 16
    assert torch.equal((back.tensor * 65535).round(), levels)
    import tifffile
    assert tifffile.imread(tmp_path / "x.tif").dtype == np.uint16


def test_step_batch_sampler_is_a_function_of_step():
    full = list(StepBatchSampler(10, 3, seed=5, total_steps=9))
    resumed = list(StepBatchSampler(10, 3, seed=5, start_step=4, total_steps=9))
    assert full[4:] == resumed
    epoch0 = [i for b in full[:3] for i, _ in b]
    assert len(set(epoch0)) == 9 and all(e == 0 for b in full[:3] for _, e in b)
    shards = [list(StepBatchSampler(10, 3, seed=5, total_steps=9, rank=r, world=2)) for r in range(2)]
    assert shards[0] == full[0::2] and shards[1] == full[1::2]


def test_augmentation_is_deterministic_and_the_same_for_hazy_and_gt(tmp_path):
    """Crops and flips are a function of (seed, epoch, index), and hazy and GT get the same
    ones: with identical files the two stay identical, while the crops do move around."""
    img = _rgb(32, 40)
    _png(tmp_path / "hazy" / "1.png", img)
    _png(tmp_path / "GT" / "1.png", img)
    ds = PairedImageDataset(find_pairs(tmp_path / "hazy", tmp_path / "GT"), crop=16, flip=True, seed=2)
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(a["hazy"], b["hazy"]) and a["hazy"].shape == (3, 16, 16)
    crops = set()
    for e in range(12):
        item = ds[(0, e)]
        assert torch.equal(item["hazy"], item["gt"]), f"epoch {e}: hazy and GT augmented differently"
        crops.add(tuple(item["hazy"].flatten()[:4].tolist()))
    assert len(crops) > 3


def _two_region_sources():
    """Sources whose red channel says where a pixel came from: below 0.5 in the first 70 %
    of the longer side (the training part), above 0.5 in the last 30 % (held out)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in ((200, 300), (320, 180)):
        img = 0.35 + 0.3 * torch.rand((3, h, w), generator=g)          # texture, passes the flatness check
        red = torch.full((h, w), 0.2)
        if w >= h:
            red[:, round(w * 0.7):] = 0.8
        else:
            red[round(h * 0.7):, :] = 0.8
        img[0] = red + 0.05 * torch.rand((h, w), generator=g)
        out.append(img)
    return out


def test_synthetic_test_scenes_come_from_pixels_training_never_sees(tmp_path, monkeypatch):
    """Every source is split along its longer side; training and validation crops come from
    the first part only, test crops from the held-out part only (told apart by the red level,
    in the haze-free GT)."""
    from dsrdmpd.data import synthetic
    src = torch.arange(3 * 40 * 100, dtype=torch.float32).reshape(3, 40, 100)
    train, held = synthetic.split_regions(src)
    assert held.shape == (3, 40, 30) and torch.equal(torch.cat([train, held], -1), src)
    train, held = synthetic.split_regions(src.transpose(1, 2))
    assert held.shape == (3, 30, 40)
    monkeypatch.setattr(synthetic, "source_images", _two_region_sources)
    root = synthetic.make_synthetic_dataset(tmp_path, n_train=12, n_test=6, size=32, seed=4, n_valid=3, test_size=48)
    for split, n, size in (("train", 12, 32), ("valid", 3, 32), ("test", 6, 48)):
        reds = [read_image(root / split / "GT" / f"{i:04d}.png").tensor for i in range(n)]
        assert all(r.shape == (3, size, size) for r in reds)
        if split == "test":
            assert all(float(r[0].min()) > 0.5 for r in reds)
        else:
            assert all(float(r[0].max()) < 0.5 for r in reds)


def test_synthetic_test_split_does_not_depend_on_the_training_split(tmp_path):
    """Same seed: the same test scenes whatever n_train / n_valid; the training pairs are a
    function of the seed (a longer training split starts with the shorter one)."""
    from dsrdmpd.data.synthetic import make_synthetic_dataset
    a = make_synthetic_dataset(tmp_path / "a", n_train=2, n_test=2, size=32, seed=5, test_size=48)
    b = make_synthetic_dataset(tmp_path / "b", n_train=3, n_test=2, size=32, seed=5, n_valid=1, test_size=48)
    c = make_synthetic_dataset(tmp_path / "c", n_train=2, n_test=2, size=32, seed=6, test_size=48)
    for sub in ("test/hazy/0000.png", "test/GT/0001.png", "train/hazy/0000.png", "train/GT/0001.png"):
        assert torch.equal(read_image(a / sub).tensor, read_image(b / sub).tensor), sub
        assert not torch.equal(read_image(a / sub).tensor, read_image(c / sub).tensor), sub
    assert read_image(a / "test/hazy/0000.png").tensor.shape == (3, 48, 48)
