"""dsrdmpd-score (scoring existing results) and the reproduce table's scored peers.

Every protocol is checked against scikit-image and against a numpy version written here,
on odd sizes and 16-bit files; the Y conversion against known values; CIEDE2000 against
published pairs of Sharma, Wu and Dalal (2005)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from scipy.ndimage import correlate
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dsrdmpd.cli import reproduce, score
from dsrdmpd.metrics import PROTOCOLS, ciede2000, rgb_to_y
from dsrdmpd.scoring import ScoringError, gt_references, match_restored

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- independent references

def np_y(rgb01: np.ndarray) -> np.ndarray:
    """BT.601 luma of (H, W, 3) RGB in [0, 1], written out channel by channel."""
    r, g, b = (rgb01[..., i].astype(np.float64) for i in range(3))
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def np_psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def np_ssim_padded(a: np.ndarray, b: np.ndarray) -> float:
    """The paper protocol's SSIM: (H, W, 3) in [0, 1], 11x11 Gaussian (1.5), zero padding, mean over everything."""
    x = np.arange(11) - 5
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    filt = lambda z: correlate(z, win, mode="constant", cval=0.0)
    maps = []
    for c in range(3):
        p, q = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mp, mq = filt(p), filt(q)
        spp, sqq, spq = filt(p * p) - mp ** 2, filt(q * q) - mq ** 2, filt(p * q) - mp * mq
        maps.append(((2 * mp * mq + 1e-4) * (2 * spq + 9e-4)) / ((mp ** 2 + mq ** 2 + 1e-4) * (spp + sqq + 9e-4)))
    return float(np.mean(maps))


def sk_ssim(a, b, data_range, channel_axis=None):
    return structural_similarity(b, a, data_range=data_range, channel_axis=channel_axis, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)


def references(out: np.ndarray, gt: np.ndarray, peak: int) -> dict:
    """Every column, from integer (H, W, 3) images with maximum ``peak``, by numpy and by skimage."""
    a, b = out.astype(np.float64) / peak, gt.astype(np.float64) / peak
    ya, yb = np_y(a), np_y(b)
    u8 = lambda x: np.round(x * 255).astype(np.uint8)
    ref = {"psnr_paper": np_psnr(a, b, 1.0), "ssim_paper": np_ssim_padded(a, b),
           "psnr_standard": np_psnr(u8(a), u8(b), 255.0), "psnr_y": np_psnr(ya, yb, 255.0),
           "ciede2000": float(deltaE_ciede2000(rgb2lab(a), rgb2lab(b)).mean())}
    sk = {"psnr_paper": peak_signal_noise_ratio(b, a, data_range=1.0),
          "psnr_standard": peak_signal_noise_ratio(u8(b), u8(a), data_range=255),
          "ssim_standard": sk_ssim(u8(a), u8(b), 255, channel_axis=2),
          "psnr_y": peak_signal_noise_ratio(yb, ya, data_range=255), "ssim_y": sk_ssim(ya, yb, 255)}
    return {"numpy": ref, "skimage": sk}


TOL = {"psnr": 1e-4, "ssim": 2e-6, "ciede2000": 1e-5}     # CSV keeps 6 decimals; float32 reading


def assert_columns(row: dict, refs: dict) -> None:
    for kind, values in refs.items():
        for col, want in values.items():
            assert float(row[col]) == pytest.approx(want, abs=TOL[col.split("_")[0]]), (kind, col)


# ---------------------------------------------------------------- files

def noisy_pair(rng, h, w, peak, dtype):
    gt = rng.integers(0, peak + 1, (h, w, 3))
    out = np.clip(gt + rng.normal(0, 0.06 * peak, gt.shape), 0, peak).round()
    return out.astype(dtype), gt.astype(dtype)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == np.uint16 and path.suffix == ".png":
        png.from_array(arr.reshape(arr.shape[0], -1), "RGB;16").save(str(path))
    elif path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(str(path), arr, photometric="rgb")
    else:
        Image.fromarray(arr).save(path)
    return path


def read_rows(folder: Path) -> dict:
    return {r["name"]: r for r in csv.DictReader(open(folder / "metrics.csv"))}


ALL = "paper,standard,y"


# ---------------------------------------------------------------- Y conversion

def test_y_of_known_colours():
    colours = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = rgb_to_y(colours.T.reshape(1, 3, 1, 5)).flatten().tolist()
    assert y == pytest.approx([235.0, 16.0, 81.481, 144.553, 40.966], abs=1e-9)
    rgb = np.random.default_rng(3).random((7, 9, 3))
    ours = rgb_to_y(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.abs(ours - np_y(rgb)).max() < 1e-9


# ---------------------------------------------------------------- protocols, odd sizes, 8 and 16 bits

def test_every_protocol_on_odd_8bit_images_against_skimage_and_numpy(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(37, 29), (23, 41)]):
        out, gt = noisy_pair(rng, h, w, 255, np.uint8)
        save(tmp_path / "out" / f"{i}.png", out)
        save(tmp_path / "gt" / f"{i}.png", gt)
    means = score.run(["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--protocol", ALL,
                       "--output", str(tmp_path / "s"), "--no-progress"])
    rows = read_rows(tmp_path / "s")
    assert list(rows) == ["0.png", "1.png"] and rows["0.png"]["height"] == "37" and rows["1.png"]["width"] == "41"
    for i in range(2):
        out = np.asarray(Image.open(tmp_path / "out" / f"{i}.png"))
        gt = np.asarray(Image.open(tmp_path / "gt" / f"{i}.png"))
        assert_columns(rows[f"{i}.png"], references(out, gt, 255))
    assert means["psnr_y"] == pytest.approx(np.mean([float(r["psnr_y"]) for r in rows.values()]), abs=1e-5)
    assert means["psnr_y"] > means["psnr_paper"] + 1          # luma noise averages down: protocols differ
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert all(PROTOCOLS[p] in summary for p in ("paper", "standard", "y")) and "CIEDE2000" in summary


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_files_are_scored_at_16_bits(tmp_path, suffix):
    rng = np.random.default_rng(1)
    out, gt = noisy_pair(rng, 25, 19, 65535, np.uint16)
    out[0, 0] = gt[0, 0] + 1                                   # a difference 8 bits cannot hold
    save(tmp_path / "out" / f"a{suffix}", out)
    save(tmp_path / "gt" / f"a{suffix}", gt)
    score.run(["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--protocol", ALL,
               "--output", str(tmp_path / "s"), "--no-progress"])
    assert_columns(read_rows(tmp_path / "s")[f"a{suffix}"], references(out, gt, 65535))


def test_crop_border_drops_the_border_from_every_column(tmp_path):
    rng = np.random.default_rng(2)
    out, gt = noisy_pair(rng, 31, 27, 255, np.uint8)
    out[:3], out[:, -3:] = 255 - gt[:3], 255 - gt[:, -3:]     # the border is all wrong
    save(tmp_path / "out" / "a.png", out)
    save(tmp_path / "gt" / "a.png", gt)
    score.run(["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--protocol", ALL,
               "--crop-border", "3", "--output", str(tmp_path / "s"), "--no-progress"])
    row = read_rows(tmp_path / "s")["a.png"]
    assert (row["height"], row["width"]) == ("25", "21")
    assert_columns(row, references(out[3:-3, 3:-3], gt[3:-3, 3:-3], 255))


# ---------------------------------------------------------------- CIEDE2000

# Sharma, Wu & Dalal (2005), Color Res. Appl. 30(1), test data: (Lab 1, Lab 2, CIEDE2000).
SHARMA = [((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
          ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
          ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
          ((50.0, 2.5, 0.0), (61.0, -5.0, 29.0), 22.8977),
          ((50.0, 2.5, 0.0), (56.0, -27.0, -3.0), 31.9030),
          ((50.0, 2.5, 0.0), (58.0, 24.0, 15.0), 19.4535),
          ((50.0, 2.5, 0.0), (50.0, 3.1736, 0.5854), 1.0000)]


def test_ciede2000_on_published_pairs():
    """skimage's formula gives the published values; ours, fed the sRGB colours of the
    in-gamut pairs (pair 1 is outside sRGB), gives each pair's value per pixel and their mean."""
    for lab1, lab2, want in SHARMA:
        assert float(deltaE_ciede2000(np.array(lab1), np.array(lab2))) == pytest.approx(want, abs=5e-5)
    inside = SHARMA[1:]
    rgb = lambda k: torch.from_numpy(lab2rgb(np.array([[p[k] for p in inside]]))).permute(2, 0, 1)
    a, b = rgb(0), rgb(1)
    for i, (_, _, want) in enumerate(inside):
        assert ciede2000(a[:, :, i:i + 1], b[:, :, i:i + 1])[0] == pytest.approx(want, abs=5e-5)
    assert ciede2000(a, b)[0] == pytest.approx(np.mean([p[2] for p in inside]), abs=5e-5)
    assert ciede2000(torch.stack([a, a]), torch.stack([b, a])) == pytest.approx([np.mean([p[2] for p in inside]), 0])


# ---------------------------------------------------------------- names, sizes, presets

def test_mismatched_names_are_a_named_error(tmp_path, capsys):
    img = np.zeros((12, 12, 3), np.uint8)
    for n in ("1", "2", "3"):
        save(tmp_path / "gt" / f"{n}.png", img)
    for n in ("1", "2", "x"):
        save(tmp_path / "out" / f"{n}.png", img)
    with pytest.raises(ScoringError, match=r"(?s)restored without ground truth \(1\): x\.png.*ground truth without "
                                           r"restored \(1\): 3\.png"):
        match_restored(tmp_path / "out", gt_references(tmp_path / "gt"))
    assert score.main(["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"),
                       "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "x.png" in err and "3.png" in err
    assert not (tmp_path / "s" / "metrics.csv").exists()
    save(tmp_path / "out" / "3.png", img)                     # every GT matched, one restored file left over
    with pytest.raises(ScoringError, match=r"restored without ground truth \(1\): x\.png$"):
        match_restored(tmp_path / "out", gt_references(tmp_path / "gt"))


def test_outputs_named_by_input_key_or_gt_pair_with_a_preset_dataset(tmp_path):
    """SateHaze1k: restored files named like the input, like the GT or by the bare key all pair."""
    rng = np.random.default_rng(4)
    root = tmp_path / "Haze1k_thin" / "dataset"
    arrays = {}
    for n, out_name in (("1", "1-inputs.png"), ("2", "2-targets.png"), ("10", "10.png")):
        out, gt = noisy_pair(rng, 13, 15, 255, np.uint8)
        save(root / "test" / "input" / f"{n}-inputs.png", gt)
        save(root / "test" / "target" / f"{n}-targets.png", gt)
        save(tmp_path / "out" / out_name, out)
        arrays[out_name] = (out, gt)
    score.run(["--restored", str(tmp_path / "out"), "--data-root", str(root), "--preset", "satehaze1k",
               "--split", "test", "--protocol", "y", "--output", str(tmp_path / "s"), "--no-progress"])
    rows = read_rows(tmp_path / "s")
    assert [(r["name"], r["gt"]) for r in rows.values()] == [("1-inputs.png", "1-targets.png"),
                                                            ("2-targets.png", "2-targets.png"),
                                                            ("10.png", "10-targets.png")]
    for name, (out, gt) in arrays.items():
        assert float(rows[name]["psnr_y"]) == pytest.approx(np_psnr(np_y(out / 255), np_y(gt / 255), 255), abs=1e-4)
    save(tmp_path / "out" / "1.png", arrays["1-inputs.png"][0])            # a second output for pair 1
    with pytest.raises(ScoringError, match="1-inputs.png and 1.png|1.png and 1-inputs.png"):
        score.run(["--restored", str(tmp_path / "out"), "--data-root", str(root), "--preset", "satehaze1k",
                   "--output", str(tmp_path / "s2")])


def test_size_mismatch_fails_that_pair_only(tmp_path, capsys):
    rng = np.random.default_rng(5)
    out, gt = noisy_pair(rng, 16, 17, 255, np.uint8)
    save(tmp_path / "out" / "good.png", out)
    save(tmp_path / "gt" / "good.png", gt)
    save(tmp_path / "out" / "bad.png", out[:15])
    save(tmp_path / "gt" / "bad.png", gt)
    assert score.main(["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"),
                       "--output", str(tmp_path / "s"), "--no-progress"]) == 1
    assert list(read_rows(tmp_path / "s")) == ["good.png"]
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "## Failed: 1 pair(s)" in summary and "| bad.png | size mismatch:" in summary and "(15, 17)" in summary
    assert "1 of 2 pair(s) could not be scored" in capsys.readouterr().err


def test_unknown_protocol_is_a_usage_error(tmp_path, capsys):
    assert score.main(["--restored", str(tmp_path), "--gt", str(tmp_path), "--protocol", "paper,ycbcr",
                       "--output", str(tmp_path / "s")]) == 2
    assert "ycbcr" in capsys.readouterr().err


# ---------------------------------------------------------------- reported values and the reproduce table

def test_shipped_paper_results_name_table_source_protocol_and_hand():
    paper = yaml.safe_load(open(ROOT / "configs" / "paper_results.yaml"))
    values = [(f"DS-RDMPD {k}", v) for k, v in paper["datasets"].items()]
    values += [(f"{m} {k}", v) for m, vs in paper["peers"].items() for k, v in vs.items()]
    for name, v in values:
        assert v["hand"] in ("first-hand", "second-hand", "unknown"), name
        if v["psnr"] is None:
            assert v["hand"] == "unknown" and v["note"].startswith("unknown"), name
        else:
            assert v["table"] in ("Table 1", "Table 2") and v["source"] in paper["sources"], name
    assert all("protocol" in s for s in paper["sources"].values())
    assert paper["datasets"]["RSID"]["psnr"] is None and paper["datasets"]["RSID"]["hand"] == "unknown"
    avg = paper["datasets"]["SateHaze1k-average"]
    parts = [paper["datasets"][p] for p in avg["average_of"]]
    assert avg["psnr"] == pytest.approx(np.mean([p["psnr"] for p in parts]), abs=0.005)
    assert avg["ssim"] == pytest.approx(np.mean([p["ssim"] for p in parts]), abs=0.00005)


def test_reproduce_table_with_a_scored_peer_column(tmp_path):
    """Two tiny RSID-layout datasets without our checkpoints; a peer's outputs for both,
    scored under the suite's protocol (y) against the same GT, beside the reported values."""
    rng = np.random.default_rng(6)
    suite = {"protocol": "y", "datasets": {}}
    want = {}
    for ds in ("A", "B"):
        root = tmp_path / ds
        psnrs = []
        for n in ("1", "2"):
            out, gt = noisy_pair(rng, 14, 13, 255, np.uint8)
            save(root / "test" / "hazy" / f"{n}.png", gt)
            save(root / "test" / "GT" / f"{n}.png", gt)
            save(tmp_path / "peer" / ds / f"{n}.png", out)
            psnrs.append(np_psnr(np_y(out / 255), np_y(gt / 255), 255))
        want[ds] = float(np.mean(psnrs))
        suite["datasets"][ds] = {"preset": "rsid", "root": str(root), "split": "test",
                                 "stage1": str(tmp_path / "none.pth"), "stage2": str(tmp_path / "none.pt")}
    paper = {"sources": {"S": {"citation": "Someone et al.", "protocol": "unknown"}},
             "datasets": {"A": {"psnr": 30.0, "ssim": 0.9, "source": "S", "table": "Table 3", "hand": "second-hand"},
                          "B": {"psnr": None, "ssim": None, "source": None, "hand": "unknown", "note": "unknown"},
                          "AB": {"psnr": 29.0, "ssim": 0.8, "source": "S", "table": "Table 3", "hand": "first-hand",
                                 "average_of": ["A", "B"]}},
             "peers": {"Other": {"A": {"psnr": 28.5, "ssim": 0.85, "source": "S", "table": "Table 3",
                                       "hand": "second-hand"}}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper))
    rows = {r["dataset"]: r for r in reproduce.run(["--suite", str(tmp_path / "suite.yaml"), "--paper",
                                                    str(tmp_path / "paper.yaml"), "--output", str(tmp_path / "t"),
                                                    "--peer", f"Mine={tmp_path / 'peer'}"])}
    assert list(rows) == ["A", "B", "AB"]
    for ds in ("A", "B"):
        assert rows[ds]["psnr"] is None and rows[ds]["scored"]["Mine"]["psnr"] == pytest.approx(want[ds], abs=1e-6)
    assert rows["AB"]["scored"]["Mine"]["psnr"] == pytest.approx((want["A"] + want["B"]) / 2, abs=1e-6)
    assert rows["A"]["source"] == "S, Table 3 (second-hand)" and rows["A"]["reported_protocol"] == "unknown"
    assert rows["AB"]["source"] == "S, Table 3" and rows["B"]["hand"] == "unknown"
    md = (tmp_path / "t" / "tables.md").read_text()
    assert "| Mine PSNR / SSIM (scored here) |" in md
    assert ("- Mine on A: 2 image(s) scored here with `dsrdmpd-score`; per image in `peers/Mine/A/metrics.csv`"
            in md and "- ours: none (no dataset was evaluated)" in md)
    cell = f"{rows['A']['scored']['Mine']['psnr']:.2f} / {rows['A']['scored']['Mine']['ssim']:.4f}"
    assert "| A |  |  | 30.00 | 0.9000 |  |  | S, Table 3 (second-hand) |  | skipped: not found: stage1=" in md
    assert f"| unknown | {cell} |" in md
    assert f"| Mine (scored here) | {cell} |" in md and "| Other | 28.50 / 0.8500 |  |  | S, Table 3" in md
    assert f"Mine (scored here): scored by this package on the same ground truth, {PROTOCOLS['y']}" in md
    table = list(csv.DictReader(open(tmp_path / "t" / "tables.csv")))
    assert float(table[1]["Mine_psnr_scored"]) == pytest.approx(want["B"], abs=1e-6)
    assert (tmp_path / "t" / "peers" / "Mine" / "A" / "metrics.csv").is_file()


def test_thin_script_runs_the_command(tmp_path):
    import os
    import subprocess
    import sys
    save(tmp_path / "gt" / "1.png", np.zeros((12, 12, 3), np.uint8))
    save(tmp_path / "out" / "2.png", np.zeros((12, 12, 3), np.uint8))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "score.py"), "--restored", str(tmp_path / "out"),
                           "--gt", str(tmp_path / "gt"), "--output", str(tmp_path / "s")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: restored files in")
    assert "2.png" in proc.stderr and "1.png" in proc.stderr and "Traceback" not in proc.stderr


def test_a_value_marked_with_an_unknown_hand_is_refused():
    from dsrdmpd.cli.errors import UsageError
    with pytest.raises(UsageError, match="third-hand"):
        reproduce.table_row("A", {}, {"psnr": 1.0, "ssim": 0.5, "source": "S", "hand": "third-hand"}, "")
    assert reproduce.table_row("A", {}, {"psnr": 1.0, "source": "S", "hand": "first-hand"}, "")["source"] == "S"
