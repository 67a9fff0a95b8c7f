"""Satellite rasters: GeoTIFFs the tests make themselves (rasterio), through
``dsrdmpd.raster`` and ``scripts/dehaze.py``: georeferencing and metadata, band choice,
the exact inverse of the radiometric mapping, nodata and masks, streamed = in-memory."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import rasterio  # noqa: E402  (a dependency: a missing install must fail, not skip)
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from dsrdmpd.builders import build_stage1, build_stage2  # noqa: E402
from dsrdmpd.cli import dehaze  # noqa: E402
from dsrdmpd.inference import Dehazer  # noqa: E402
from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2  # noqa: E402
from dsrdmpd.radiometry import ScaleSpec, cast_to, parse_scale, resolve_scale  # noqa: E402
from dsrdmpd.raster import (RasterError, RasterOptions, _avoid_nodata, _statistics, choose_bands,  # noqa: E402
                            dehaze_raster, parse_bands)

UTM = "EPSG:32633"
TRANSFORM = from_origin(500000, 4000000, 10, 10)


def write_raster(path, data, nodata=None, descriptions=None, crs=UTM, interp=None, tags=None):
    """data: (C, H, W) in its final dtype."""
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=data.dtype.name, crs=crs,
                       transform=TRANSFORM, nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = descriptions
        if interp:
            dst.colorinterp = interp
        if tags:
            dst.update_tags(**tags)
        dst.update_tags(1, WAVELENGTH="490")
    return path


def twelve_bit_bgrn(seed=0, h=301, w=457):
    """A 4-band (blue, green, red, NIR) uint16 scene with 12-bit values, a nodata corner (0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 1500 + 1200 * np.sin(yy / 37.0) * np.cos(xx / 53.0)
    data = np.stack([base + 300 * k + rng.normal(0, 80, (h, w)) for k in range(4)])
    data = np.clip(np.rint(data), 1, 4095).astype(np.uint16)
    data[:, :40, :60] = 0
    return data


@pytest.fixture()
def passthrough():
    return Dehazer(PassThroughStage1(), PassThroughStage2(), tile=128, overlap=32, tile_batch=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_stage1({"dim": 32}).eval(), build_stage2({"dim": 8, "sampling_timesteps": 2}).eval()


def test_scale_specs_parse_and_refuse():
    assert parse_scale("auto") == ScaleSpec("auto")
    assert parse_scale("0,4095") == ScaleSpec("range", 0, 4095)
    assert parse_scale(" p0.5, p99.5 ") == ScaleSpec("percentiles", 0.5, 99.5)
    assert parse_scale("-0.1,1e4") == ScaleSpec("range", -0.1, 10000)
    for bad in ("4095,0", "p50,p10", "p0,p101", "linear", "0;1"):
        with pytest.raises(ValueError, match="--scale"):
            parse_scale(bad)
    for infinite in ("0,1e400", "-1e308,1e308", "1e400,1e401"):     # would map every value to 0
        with pytest.raises(ValueError, match="must be finite"):
            parse_scale(infinite)
    assert parse_bands("4, 3,2") == [4, 3, 2]
    for bad in ("3,2", "1,1,2", "0,1,2", "r,g,b"):
        with pytest.raises(ValueError, match="--bands"):
            parse_bands(bad)


def test_auto_scale_and_percentiles_leave_out_invalid_pixels():
    sample = np.stack([np.arange(100, dtype=np.uint16).reshape(10, 10)] * 3)
    valid = np.ones((10, 10), bool)
    valid[0] = False                                   # values 0..9 are nodata
    s = resolve_scale(ScaleSpec("auto"), np.uint16, sample, valid)
    assert s.spec == ScaleSpec("percentiles", 0.5, 99.5)
    np.testing.assert_allclose(s.lo, np.percentile(np.arange(10, 100), 0.5))
    np.testing.assert_allclose(s.hi, np.percentile(np.arange(10, 100), 99.5))
    assert resolve_scale(ScaleSpec("auto"), np.uint8, sample.astype(np.uint8), None).hi.tolist() == [255] * 3
    assert resolve_scale(ScaleSpec("dtype"), np.uint16, sample, None).hi.tolist() == [65535] * 3
    with pytest.raises(ValueError, match="needs integer data"):
        resolve_scale(ScaleSpec("dtype"), np.float32, sample.astype(np.float32), None)
    with pytest.raises(ValueError, match="no valid pixels"):
        resolve_scale(ScaleSpec("auto"), np.uint16, sample, np.zeros((10, 10), bool))


def test_mapping_back_puts_the_clipped_part_back():
    s = resolve_scale(ScaleSpec("range", 100, 1100), np.uint16, np.full((3, 2, 2), 500, np.uint16), None)
    v = np.array([[[50, 100], [600, 3000]]] * 3, np.uint16)
    u = s.to_unit(v)
    assert u[0].tolist() == [[0.0, 0.0], [0.5, 1.0]]
    assert np.array_equal(s.from_unit(u, v, np.uint16), v)           # identity network: exact
    brighter = s.from_unit(torch.full_like(u, 0.75), v, np.uint16)
    assert brighter[0].tolist() == [[850 - 50, 850], [850, 850 + 1900]]      # 50 was 50 below lo, 3000 1900 above hi
    assert cast_to(np.array([-3.0, 70000.0, 2.5]), np.uint16).tolist() == [0, 65535, 2]


def test_a_valid_value_never_becomes_nodata():
    out = np.array([[[0, 5, 0]]], np.uint16)
    valid = np.array([[True, True, False]])
    assert _avoid_nodata(out.copy(), valid, 0)[0].tolist() == [[1, 5, 0]]
    out = np.array([[[65535, 7]]], np.uint16)
    assert _avoid_nodata(out, np.array([[True, True]]), 65535)[0].tolist() == [[65534, 7]]


def test_geotiff_round_trip_through_the_command(chain, tmp_path):
    """The issue's case: 4-band uint16, 12-bit values, nodata, UTM, --bands 3,2,1."""
    data = twelve_bit_bgrn(h=151, w=229)      # odd sizes, several network tiles' worth of padding
    (tmp_path / "in").mkdir()
    src = write_raster(tmp_path / "in" / "scene.tif", data, nodata=0, descriptions=("Blue", "Green", "Red", "NIR"),
                       tags={"ACQUISITION": "2026-06-01"})
    args = ["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
            "--input", str(src), "--bands", "3,2,1", "--device", "cpu"]
    assert dehaze.main(args + ["--output", str(tmp_path / "out")]) == 0
    assert dehaze.main(args + ["--output", str(tmp_path / "all"), "--keep-other-bands", "--scale", "0,4095"]) == 0
    valid = np.all(data > 0, axis=0)
    with rasterio.open(src) as a, rasterio.open(tmp_path / "out" / "restored" / "scene.tif") as b:
        assert (b.crs, b.transform, b.nodata, b.dtypes, b.width, b.height, b.count) == \
            (a.crs, a.transform, 0, ("uint16",) * 3, 229, 151, 3)
        assert b.descriptions == ("Blue", "Green", "Red")
        assert b.tags()["ACQUISITION"] == "2026-06-01" and b.tags()["DSRDMPD_SCALE"].startswith("p0.5,p99.5")
        assert b.tags(1)["WAVELENGTH"] == "490" and "DSRDMPD_SCALE_MIN" in b.tags(3)
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"
        out = b.read()
    assert (out[:, ~valid] == 0).all() and (out[:, valid] > 0).all()
    for k in range(3):                     # in the input's units: within the band's own valid range
        band = data[k][valid]
        assert band.min() <= out[k][valid].min() and out[k][valid].max() <= band.max()
    assert not np.array_equal(out, data[:3])                      # the networks did something
    with rasterio.open(tmp_path / "all" / "restored" / "scene.tif") as c:
        assert c.count == 4 and c.descriptions == ("Blue", "Green", "Red", "NIR")
        assert np.array_equal(c.read(4), data[3])                 # NIR passed through unchanged
        assert "0,4095" in c.tags()["DSRDMPD_SCALE"]


@pytest.mark.parametrize("kind", ["uint16-percentiles", "uint16-range", "uint8", "float32-nan", "int16"])
def test_identity_networks_give_the_input_back(kind, passthrough, tmp_path):
    rng = np.random.default_rng(1)
    data, nodata, scale = twelve_bit_bgrn()[:3], 0, ScaleSpec("auto")
    if kind == "uint16-range":
        scale = ScaleSpec("range", 500, 3000)                     # clips both ends: the excess comes back
    elif kind == "uint8":
        data, nodata = (data // 16).astype(np.uint8), None
    elif kind == "float32-nan":
        data = (data / 10000).astype(np.float32)
        data[:, :40, :60], nodata = np.nan, np.nan
    elif kind == "int16":
        data = (data.astype(np.int32) - 2000).astype(np.int16)
        data[:, :40, :60], nodata = -9999, -9999
        data[:, 100:104, 100:104] = rng.integers(-3000, 3000, (3, 4, 4))
    src = write_raster(tmp_path / "in.tif", data, nodata=nodata)
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(scale=scale, progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        out = o.read()
        assert o.dtypes[0] == data.dtype.name
    if kind == "float32-nan":
        assert np.array_equal(np.isnan(out), np.isnan(data))
        ok = ~np.isnan(data)
        np.testing.assert_allclose(out[ok], data[ok], rtol=1e-6, atol=0)
    else:
        assert np.array_equal(out, data)


@pytest.mark.parametrize("tile_batch,nodata_block", [(3, False), (1, True)])
def test_streamed_scene_equals_the_scene_tiled_in_memory(tiny, tmp_path, tile_batch, nodata_block):
    """Bit for bit. Tiles without a valid pixel are not run; that changes which tiles share
    a network call (float rounding), so the nodata-block case runs one tile per call."""
    data = twelve_bit_bgrn(seed=2, h=165, w=197)[:3]
    if nodata_block:
        data[:, 100:165, :75] = 0              # larger than a tile: the tile at (101, 0) is skipped
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    d = Dehazer(*tiny, tile=64, overlap=16, tile_batch=tile_batch)
    run_tiles, ran = d.run_tiles, []
    d.run_tiles = lambda xs, ns: (ran.append(len(xs)), run_tiles(xs, ns))[1]
    dehaze_raster(d, src, tmp_path / "out.tif", RasterOptions(progress=False))
    assert sum(ran) == (15 if nodata_block else 16)
    with rasterio.open(src) as s:
        scale = resolve_scale(ScaleSpec("auto"), np.uint16, *_statistics(s, [1, 2, 3]))
        values, valid = s.read(), np.all(s.read_masks() > 0, axis=0)
    restored = d(scale.to_unit(values, valid)[None]).restored[0]
    want = scale.from_unit(restored.clamp(0, 1), values, np.uint16)
    want[:, ~valid] = 0
    with rasterio.open(tmp_path / "out.tif") as o:
        got = o.read()
    assert len(d.tile_plan(165, 197).windows) == 16
    assert np.array_equal(got, want)


def test_memory_is_held_for_a_band_of_rows_only(passthrough, tmp_path, monkeypatch):
    """The accumulation buffer is (tile + stride + 256) rows x the padded width, whatever the height."""
    import dsrdmpd.raster as raster
    sizes = []
    real_zeros = torch.zeros

    def spy(*shape, **kw):
        t = real_zeros(*shape, **kw)
        sizes.append(t.numel())
        return t
    monkeypatch.setattr(raster.torch, "zeros", spy)
    data = np.full((3, 2000, 96), 1000, np.uint16)
    dehaze_raster(passthrough, write_raster(tmp_path / "tall.tif", data), tmp_path / "out.tif",
                  RasterOptions(progress=False))
    per_row = len({x for _, x in passthrough.tile_plan(2000, 96).windows})
    rows = 128 + 96 * -(-(3 - 1) // per_row) + 256        # a chunk of 3 tiles reaches 2 tile rows further
    assert max(sizes) == 3 * rows * 96 < data.size


def test_band_choice(tmp_path):
    data = np.ones((4, 64, 64), np.uint16)
    cases = [
        (None, None, None, ([3, 2, 1], None)),
        (("Blue", "Green", "Red", "NIR"), None, None, ([3, 2, 1], None)),
        (None, [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha], None, ([1, 2, 3], 4)),
        (None, None, [4, 1, 2], ([4, 1, 2], None)),
    ]
    for k, (desc, interp, bands, want) in enumerate(cases):
        path = write_raster(tmp_path / f"b{k}.tif", data, descriptions=desc, interp=interp)
        with rasterio.open(path) as src:
            if k == 0:
                with pytest.raises(RasterError, match=r"4 band\(s\) and no way to tell.*--bands R,G,B"):
                    choose_bands(src, bands, "b0.tif")
            else:
                assert choose_bands(src, bands, path.name) == want
    with rasterio.open(tmp_path / "b0.tif") as src:
        with pytest.raises(RasterError, match=r"asks for band 5, but the file has 4 band\(s\)"):
            choose_bands(src, [5, 2, 1], "b0.tif")
    gray = write_raster(tmp_path / "gray.tif", data[:1])
    with rasterio.open(gray) as src:
        with pytest.raises(RasterError, match=r"1 band\(s\) .*dehazing needs red, green and blue"):
            choose_bands(src, None, "gray.tif")
    three = write_raster(tmp_path / "rgb.tif", data[:3])
    with rasterio.open(three) as src:
        assert choose_bands(src, None, "rgb.tif") == ([1, 2, 3], None)


def test_ambiguous_bands_fail_the_item_with_one_line(chain, tmp_path, capsys):
    write_raster(tmp_path / "in.tif", twelve_bit_bgrn(h=70, w=70))
    code = dehaze.main(["--stage1", str(chain / "stage1_official.pth"), "--stage2", str(chain / "stage2_official.pt"),
                        "--input", str(tmp_path / "in.tif"), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "in.tif" in summary and "--bands R,G,B" in summary
    assert "Traceback" not in capsys.readouterr().err


def test_alpha_mask_and_cog(passthrough, tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(1, 255, (3, 150, 170)).astype(np.uint8)
    alpha = np.full((1, 150, 170), 255, np.uint8)
    alpha[0, :30] = 0
    src = write_raster(tmp_path / "rgba.tif", np.concatenate([rgb, alpha]),
                       interp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(cog=True, progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        assert o.count == 3 and o.crs == UTM and o.transform == TRANSFORM
        assert o.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert np.array_equal(o.read(), rgb)
        mask = o.dataset_mask()
    assert (mask[:30] == 0).all() and (mask[30:] == 255).all()


def test_statistics_of_a_large_scene_come_from_windows_spread_over_it(tmp_path, monkeypatch):
    import dsrdmpd.raster as raster
    data = twelve_bit_bgrn(seed=4, h=700, w=900)[:3]
    src = write_raster(tmp_path / "big.tif", data, nodata=0)
    monkeypatch.setattr(raster, "STATS_PIXELS", 1000)          # "large": take windows
    monkeypatch.setattr(raster, "STATS_WINDOWS", 3)
    with rasterio.open(src) as s:
        values, valid = raster._statistics(s, [3, 2, 1])
    assert values.shape == (3, 3 * 256, 3 * 256)
    with rasterio.open(src) as s:
        bh, bw = (b if b <= 256 else 1 for b in s.block_shapes[0])   # a striped file: strips of bh rows
    ys = sorted({min(700 - 256, int(round(p)) // bh * bh) for p in np.linspace(0, 444, 3)})
    xs = sorted({min(900 - 256, int(round(p)) // bw * bw) for p in np.linspace(0, 644, 3)})
    assert len(ys) == len(xs) == 3 and ys[0] == xs[0] == 0 and ys[-1] > 400 and xs[-1] == 644
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            window = values[:, 256 * i:256 * (i + 1), 256 * j:256 * (j + 1)]
            assert np.array_equal(window, data[[2, 1, 0], y:y + 256, x:x + 256])
    assert not valid[:40, :60].any() and valid[40:, 60:].all()   # the nodata corner is in the first window


def test_plain_tiff_without_georeferencing(passthrough, tmp_path, recwarn):
    import tifffile
    data = np.random.default_rng(5).integers(0, 65535, (80, 90, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", data)
    dehaze_raster(passthrough, tmp_path / "plain.tif", tmp_path / "out.tif", RasterOptions(progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        assert o.crs is None and np.array_equal(o.read(), data.transpose(2, 0, 1))
    assert not [w for w in recwarn if "georeferenc" in str(w.message).lower()]


def test_a_sparse_huge_raster_is_refused_before_reading(passthrough, tmp_path):
    """A sparse GeoTIFF declaring 200000 x 200000 pixels is 2 MB on disk; it is refused by its
    declared size (the limit named), and a lower limit refuses small rasters the same way."""
    small = write_raster(tmp_path / "small.tif", np.full((3, 40, 50), 7, np.uint8))
    with pytest.raises(RasterError, match=r"50 x 40 pixels \(0.002 Mpx\) is above the raster size limit of 0.001 Mpx"):
        dehaze_raster(passthrough, small, tmp_path / "out" / "small.tif", RasterOptions(max_pixels=1000))
    huge = tmp_path / "huge.tif"
    with rasterio.open(huge, "w", driver="GTiff", width=200000, height=200000, count=3, dtype="uint8", crs=UTM,
                       transform=TRANSFORM, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                       bigtiff="yes", sparse_ok=True):
        pass
    assert huge.stat().st_size < 5e6
    with pytest.raises(RasterError, match=r"huge\.tif: 200000 x 200000 pixels \(40000 Mpx\) is above the raster "
                                          r"size limit of 4000 Mpx \(--max-raster-pixels\)"):
        dehaze_raster(passthrough, huge, tmp_path / "out" / "huge.tif", RasterOptions(progress=False))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_corrupt_tile_is_reported_with_the_file_and_gdals_cause(passthrough, tmp_path):
    path = tmp_path / "corrupt.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 512, 512), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8", crs=UTM,
                       transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(raw))
    with pytest.raises(RasterError) as caught:
        dehaze_raster(passthrough, path, tmp_path / "out" / "corrupt.tif", RasterOptions(progress=False))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "See previous exception" not in message
    assert "IReadBlock failed" in message and "Decod" in message          # GDAL's own cause, not only 'failed'
    assert not list((tmp_path / "out").glob("*")), "no partial output may stay"


def test_raster_outputs_get_the_umask_mode(passthrough, tmp_path):
    src = write_raster(tmp_path / "s.tif", np.full((3, 40, 50), 9, np.uint8))
    old = os.umask(0o022)
    try:
        dehaze_raster(passthrough, src, tmp_path / "out" / "s.tif", RasterOptions(progress=False))
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "s.tif").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.tif"]


def test_a_non_finite_raster_output_is_refused(tmp_path):
    class NanStage2(PassThroughStage2):
        def sample(self, coarse, hazy, **_):
            return coarse * float("nan")
    src = write_raster(tmp_path / "s.tif", np.full((3, 40, 50), 9, np.uint8))
    with pytest.raises(RasterError, match=r"s\.tif: the output has 6000 NaN or infinite value\(s\)"):
        dehaze_raster(Dehazer(PassThroughStage1(), NanStage2()), src, tmp_path / "out" / "s.tif",
                      RasterOptions(progress=False))
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.parametrize("dtype,nodata", [("uint16", 0), ("float32", np.nan)])
def test_nodata_in_one_band_keeps_the_other_bands_values(passthrough, tmp_path, dtype, nodata):
    """A pixel that is nodata in one band only (a dark-water 0 in the NIR-free green band, a
    NaN in red) is left out of the networks' input; its other bands keep their valid values
    instead of becoming nodata, and the nodata band stays nodata."""
    data = twelve_bit_bgrn(seed=6, h=70, w=90)[:3].astype(dtype)
    data[1, 20:25, 30:40] = nodata
    data[0, 50:52, 5:9] = nodata
    src = write_raster(tmp_path / "in.tif", data, nodata=nodata)
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        out, mask = o.read(), o.read_masks()
    assert np.array_equal(np.isnan(out), np.isnan(data)) and np.isnan(out).sum() == (0 if dtype == "uint16" else 58)
    np.testing.assert_allclose(out, data, rtol=1e-6, atol=0)     # identity networks (float32 rounding); NaN == NaN
    with rasterio.open(src) as s:
        assert np.array_equal(mask, s.read_masks())


@pytest.mark.parametrize("georeference", ["gcps", "rpcs"])
def test_ground_control_points_and_rpcs_are_kept(passthrough, tmp_path, georeference):
    """Scenes not yet rectified carry their georeferencing as GCPs or RPCs instead of a
    transform; the output keeps them (a plain TIFF out would have lost the location)."""
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC
    src = write_raster(tmp_path / "in.tif", np.full((3, 40, 50), 9, np.uint8), crs=None)
    gcps = [GroundControlPoint(r, c, 500000 + 10 * c + r, 4000000 - 10 * r + c) for r, c in
            [(0, 0), (0, 50), (40, 0), (40, 50)]]
    rpc = RPC(height_off=100, height_scale=500, lat_off=40, lat_scale=0.1, line_den_coeff=[1] + [0] * 19,
              line_num_coeff=[0, 1] + [0] * 18, line_off=20, line_scale=20, long_off=15, long_scale=0.1,
              samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 0, 1] + [0] * 17, samp_off=25, samp_scale=25)
    with rasterio.open(src, "r+") as dst:
        if georeference == "gcps":
            dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(32633))
        else:
            dst.rpcs = rpc
    with rasterio.open(src) as s:
        assert (s.rpcs is not None) == (georeference == "rpcs")
        rpcs = s.rpcs.to_dict() if s.rpcs else None
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        if georeference == "gcps":
            assert [(g.row, g.col, g.x, g.y) for g in o.gcps[0]] == [(g.row, g.col, g.x, g.y) for g in gcps]
            assert o.gcps[1] == UTM
        else:
            assert o.rpcs is not None and o.rpcs.to_dict() == rpcs


def test_tags_of_every_metadata_domain_are_kept(passthrough, tmp_path):
    """GDAL's IMAGERY domain (acquisition time, cloud cover) and a product's own domains, on
    the dataset and on a band, come through like the default domain's tags."""
    src = write_raster(tmp_path / "in.tif", np.full((4, 40, 50), 9, np.uint16),
                       descriptions=("Blue", "Green", "Red", "NIR"), tags={"ACQUISITION": "2026-06-01"})
    with rasterio.open(src, "r+") as dst:
        dst.update_tags(ns="IMAGERY", CLOUDCOVER="12", ACQUISITIONDATETIME="2026-06-01T10:00:00Z")
        dst.update_tags(4, ns="L2A", QUANTIFICATION="10000")
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(keep_other_bands=True, progress=False))
    with rasterio.open(tmp_path / "out.tif") as o:
        assert o.tags(ns="IMAGERY") == {"CLOUDCOVER": "12", "ACQUISITIONDATETIME": "2026-06-01T10:00:00Z"}
        assert o.tags(4, ns="L2A") == {"QUANTIFICATION": "10000"}
        assert o.tags()["ACQUISITION"] == "2026-06-01" and o.tags(1)["WAVELENGTH"] == "490"
        assert o.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"      # the output's own structure


def test_many_kept_bands_do_not_bloat_the_output(passthrough, tmp_path, monkeypatch):
    """A row band larger than GDAL's block cache (a wide 13-band scene; here a 1 MB cache):
    the bands of a window are written together, so each output block is compressed once and
    the file is about the size of the same pixels written in one go (band by band, every
    block was written again for each band: several times larger)."""
    import dsrdmpd.raster as raster
    monkeypatch.setattr(raster, "GDAL_CACHE_MB", 1)
    yy, xx = np.mgrid[0:300, 0:1200]
    data = np.stack([1000 + 10 * k + (yy + xx * (k + 1)) % 700 for k in range(13)]).astype(np.uint16)
    src = write_raster(tmp_path / "in.tif", data)
    dehaze_raster(passthrough, src, tmp_path / "out.tif", RasterOptions(bands=[4, 3, 2], keep_other_bands=True,
                                                                        progress=False))
    with rasterio.open(src) as s, rasterio.open(tmp_path / "ref.tif", "w", **raster._output_profile(s, 13)) as ref:
        ref.write(data)
    with rasterio.open(tmp_path / "out.tif") as o:
        assert np.array_equal(o.read(), data)
    assert (tmp_path / "out.tif").stat().st_size < 1.5 * (tmp_path / "ref.tif").stat().st_size


def test_bands_named_exactly_red_green_blue_win_over_longer_names(tmp_path):
    """PlanetScope 8-band descriptions: 'blue' beside 'coastal_blue', 'green' beside
    'green_i'; the exact names decide. Two longer names alone stay ambiguous."""
    planet = ("coastal_blue", "blue", "green_i", "green", "yellow", "red", "rededge", "nir")
    path = write_raster(tmp_path / "planet.tif", np.ones((8, 40, 50), np.uint16), descriptions=planet)
    with rasterio.open(path) as src:
        assert choose_bands(src, None, "planet.tif") == ([6, 4, 2], None)
    two_blues = write_raster(tmp_path / "two.tif", np.ones((4, 40, 50), np.uint16),
                             descriptions=("Red", "Green", "Coastal Blue", "Deep Blue"))
    with rasterio.open(two_blues) as src:
        with pytest.raises(RasterError, match="no way to tell"):
            choose_bands(src, None, "two.tif")


@pytest.mark.parametrize("bits", [8, 16])
def test_a_palette_tiff_pair_is_read_in_its_colours(tmp_path, bits):
    """scripts/test.py reads TIFF pairs as plain images: a palette TIFF's values are indices
    into its colour map (read as grey levels before: 0, 1, 2, 3 / 255)."""
    import tifffile
    from dsrdmpd.imageio import read_image
    index = (np.arange(40 * 50).reshape(40, 50) % 4).astype(np.uint8)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 128], [10, 20, 255]])
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :4] = colours.T * 257 + (1 if bits == 16 else 0)      # 16-bit entries: not 257 x an 8-bit value
    tifffile.imwrite(tmp_path / "pal.tif", index, photometric="palette", colormap=colormap)
    image = read_image(tmp_path / "pal.tif")
    want = colormap[:, index] / 65535
    assert image.bit_depth == bits and "palette" in image.conversion
    np.testing.assert_allclose(image.tensor.numpy(), want, atol=1e-6)


def test_a_small_valid_area_between_the_statistics_windows_is_found(tmp_path, monkeypatch):
    """A large frame that is nodata but for a small area that none of the spread windows
    touches (a clipped area of interest): the statistics come from a decimated read of the
    whole scene instead of refusing the file as all nodata."""
    import dsrdmpd.raster as raster
    monkeypatch.setattr(raster, "STATS_PIXELS", 100_000)       # 700 x 900 counts as large here
    monkeypatch.setattr(raster, "STATS_WINDOWS", 2)            # two windows a side: the corners
    data = np.zeros((3, 700, 900), np.uint16)
    data[:, 300:400, 400:500] = np.arange(10000, dtype=np.uint16).reshape(100, 100) + 1
    src = write_raster(tmp_path / "aoi.tif", data, nodata=0)
    with rasterio.open(src) as s:
        values, valid = raster._statistics(s, [1, 2, 3])
    assert valid.sum() > 0.5 * 10000 / (900 * 700) * valid.size             # about the area's share of the read
    assert values.shape[1] * values.shape[2] <= 100_000 and set(np.unique(values[:, valid])) <= set(range(1, 10001))
    scale = resolve_scale(ScaleSpec("auto"), np.uint16, values, valid)
    assert scale.lo[0] < 300 and scale.hi[0] > 9700                       # the area's own range


def test_a_cmyk_tiff_is_dehazed_in_the_rgb_gdal_gives(passthrough, tmp_path, recwarn):
    """GDAL opens a CMYK TIFF as RGB + alpha (within one level of the plain formula of Pillow's
    convert('RGB')): dehaze.py's raster path takes those three bands, so identity networks give
    GDAL's RGB, not the raw inks."""
    from PIL import Image
    cmyk = (np.random.default_rng(5).random((24, 40, 4)) * 255).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    rgb = np.asarray(Image.open(tmp_path / "cmyk.tif").convert("RGB")).transpose(2, 0, 1)
    assert not np.array_equal(rgb, cmyk[..., :3].transpose(2, 0, 1))       # the raw inks are not the colours
    dehaze_raster(passthrough, tmp_path / "cmyk.tif", tmp_path / "out.tif", RasterOptions(scale=ScaleSpec("dtype"),
                                                                                         progress=False))
    with rasterio.open(tmp_path / "cmyk.tif") as src, rasterio.open(tmp_path / "out.tif") as out:
        assert out.count == 3 and np.array_equal(out.read(), src.read([1, 2, 3]))
        assert np.abs(out.read().astype(int) - rgb).max() <= 1
