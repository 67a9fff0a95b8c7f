"""Every dataset the paper evaluates: its layout preset pairs a tiny folder made here,
the shipped configs find it, and the reproduction suite tabulates ours beside the
reported values (with difference and source), skipping absent datasets with a note."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from dsrdmpd.cli import reproduce
from dsrdmpd.config import load_config
from dsrdmpd.data import PairingError, split_pairs
from dsrdmpd.evaluation import items_from_pairs
from dsrdmpd.training.common import plan_data

from conftest import ROOT


def _img(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_satehaze1k(root, n=(3, 2, 2)):
    """Haze1k_<level>/dataset layout; the test split mixes .png and .jpg copies."""
    for split, count in zip(("train", "valid", "test"), n):
        for i in range(count):
            ext = ".jpg" if split == "test" and i == 1 else ".png"
            _img(root / split / "input" / f"{i + 1}-inputs{ext}", i)
            _img(root / split / "target" / f"{i + 1}-targets{ext}", 100 + i)
    return root


def make_raindrop(root):
    for split in ("train", "test_a", "test_b"):
        for i in range(2):
            _img(root / split / "data" / f"{i}_rain.png", i)
            _img(root / split / "gt" / f"{i}_clean.png", 10 + i)
    return root


def make_realblur(root, variant="J"):
    """Scenes with the same file names in every scene folder, paired by the list files."""
    for split, scenes in (("train", (1, 2)), ("test", (3, 4))):
        lines = []
        for sc in scenes:
            for k in (1, 2):
                d = f"RealBlur-{variant}_ECC_IMCORR_centroid_itensity_ref/scene{sc:03d}"
                _img(root / d / "gt" / f"gt_{k}.png", sc * 10 + k)
                _img(root / d / "blur" / f"blur_{k}.png", sc * 10 + k + 5)
                lines.append(f"{d}/gt/gt_{k}.png {d}/blur/blur_{k}.png")
        (root / f"RealBlur_{variant}_{split}_list.txt").write_text("\n".join(lines) + "\n")
    return root


def make_paired(root, splits=("train", "test")):
    """The layout the LHID / DHID configs spell out: {split}/hazy, {split}/GT, same names."""
    for split in splits:
        for i in range(2):
            _img(root / split / "hazy" / f"{split}{i}.png", i)
            _img(root / split / "GT" / f"{split}{i}.png", 20 + i)
    return root


def test_satehaze1k_real_layout_with_its_valid_split(tmp_path):
    root = make_satehaze1k(tmp_path / "Haze1k_thin" / "dataset")
    cfg = load_config(ROOT / "configs" / "stage1_satehaze1k_thin.yaml", [f"data.root={root}"])
    plan = plan_data(cfg["data"])
    assert [p.key for p in plan.train] == ["1", "2", "3"] and [p.key for p in plan.val] == ["1", "2"]
    assert plan.val_source == "split 'valid'" and not plan.val_on_test
    test = split_pairs(cfg["data"], "test")
    assert [(p.hazy.name, p.gt.name) for p in test] == [("1-inputs.png", "1-targets.png"),
                                                         ("2-inputs.jpg", "2-targets.jpg")]


def test_raindrop_layout(tmp_path):
    root = make_raindrop(tmp_path / "RainDrop")
    cfg = load_config(ROOT / "configs" / "stage1_raindrop.yaml", [f"data.root={root}"])
    for split in ("train", "test_a", "test_b"):
        pairs = split_pairs(cfg["data"], split)
        assert [(p.key, p.hazy.name, p.gt.name) for p in pairs] == [("0", "0_rain.png", "0_clean.png"),
                                                                    ("1", "1_rain.png", "1_clean.png")]


@pytest.mark.parametrize("variant", ["J", "R"])
def test_realblur_pairs_from_list_files(tmp_path, variant):
    root = make_realblur(tmp_path / "RealBlur", variant)
    cfg = load_config(ROOT / "configs" / f"stage1_realblur_{variant.lower()}.yaml", [f"data.root={root}"])
    pairs = split_pairs(cfg["data"], "test")
    assert len(pairs) == 4
    assert all(p.gt.parent.name == "gt" and p.hazy.parent.name == "blur" and p.gt.name[3:] == p.hazy.name[5:]
               for p in pairs)
    assert pairs[0].hazy.parent.parent.name == "scene003"
    names = [i.name for i in items_from_pairs(pairs)]           # blur_1.png repeats across scenes
    assert len(set(names)) == 4 and names[0].endswith("scene003_blur_blur_1.png")


def test_realblur_list_naming_a_missing_file(tmp_path):
    root = make_realblur(tmp_path / "RealBlur")
    (root / "RealBlur_J_test_list.txt").write_text("x/gt/gt_9.png x/blur/blur_9.png\n")
    with pytest.raises(PairingError, match=r"listed files not found: .*gt_9\.png, .*blur_9\.png"):
        split_pairs({"preset": "realblur", "root": str(root)}, "test")


@pytest.mark.parametrize("line, problem", [
    ("../outside/gt.png x/blur/blur_1.png", "'../outside/gt.png' is not a path inside the dataset root"),
    ("/etc/gt.png x/blur/blur_1.png", "'/etc/gt.png' is not a path inside the dataset root"),
    ("a/../../gt.png x/blur/blur_1.png", "'a/../../gt.png' is not a path inside the dataset root"),
    ("a.png b.png c.png", "expected '<gt path> <degraded path>' \\(two paths without spaces\\), got 'a.png b.png c.png'"),
])
def test_realblur_list_lines_are_strict_and_stay_inside_the_root(tmp_path, line, problem):
    root = make_realblur(tmp_path / "RealBlur")
    (tmp_path / "outside").mkdir()
    _img(tmp_path / "outside" / "gt.png", 1)
    (root / "RealBlur_J_test_list.txt").write_text("\n" + line + "\n")
    with pytest.raises(PairingError, match=rf"RealBlur_J_test_list\.txt:2: {problem}"):
        split_pairs({"preset": "realblur", "root": str(root)}, "test")


def test_realblur_list_symlink_out_of_the_root_is_refused(tmp_path):
    root = make_realblur(tmp_path / "RealBlur")
    _img(tmp_path / "secret.png", 1)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "RealBlur_J_test_list.txt").write_text("link.png link.png\n")
    with pytest.raises(PairingError, match=r":1: 'link.png' leads outside the dataset root"):
        split_pairs({"preset": "realblur", "root": str(root)}, "test")


def test_realblur_distinct_paths_are_never_listed_twice(tmp_path):
    """a_b/c.png and a/b_c.png give the same underscore key: both are kept, with distinct
    keys (and output names); the same path twice is named with both lines."""
    root = tmp_path / "rb"
    for rel in ("a_b/c.png", "a/b_c.png", "g1.png", "g2.png"):
        _img(root / rel, 3)
    (root / "list.txt").write_text("g1.png a_b/c.png\ng2.png a/b_c.png\n")
    pairs = split_pairs({"preset": "realblur", "root": str(root), "list_file": "list.txt"}, "test")
    assert [p.hazy for p in pairs] == [root / "a_b" / "c.png", root / "a" / "b_c.png"]
    assert len({p.key for p in pairs}) == 2 and all(p.key.startswith("a_b_c-") for p in pairs)
    assert len({i.name for i in items_from_pairs(pairs)}) == 2
    (root / "list.txt").write_text("g1.png a_b/c.png\ng2.png ./a_b/c.png\n")
    with pytest.raises(PairingError, match=r"list\.txt:2: ./a_b/c.png is listed twice \(first on line 1\)"):
        split_pairs({"preset": "realblur", "root": str(root), "list_file": "list.txt"}, "test")


@pytest.mark.parametrize("name", ["lhid", "dhid"])
def test_lhid_dhid_configs_on_the_generic_preset(tmp_path, name):
    root = make_paired(tmp_path / name.upper())
    cfg = load_config(ROOT / "configs" / f"stage1_{name}.yaml", [f"data.root={root}"])
    assert cfg["data"]["preset"] == "paired" and cfg["data"]["resize"] == 512
    assert [p.key for p in split_pairs(cfg["data"], "train")] == ["train0", "train1"]
    (root / "test" / "GT" / "test1.png").unlink()
    with pytest.raises(PairingError, match="hazy without ground truth: test1.png"):
        split_pairs(cfg["data"], "test")


def test_table_writer_on_known_numbers(tmp_path):
    paper = {"sources": {"X": {"citation": "Someone et al., 'A paper'"}},
             "datasets": {"A": {"psnr": 26.0, "ssim": 0.9, "source": "X", "table": "Table 1",
                                "checked_against_paper": False},
                          "B": {"psnr": 20.0, "ssim": 0.8, "source": "X", "table": "Table 2",
                                "checked_against_paper": True}},
             "peers": {"Other": {"A": {"psnr": 25.5, "ssim": 0.91}}}}
    rows = [reproduce.table_row("A", {"psnr_stage2": 27.5, "ssim_stage2": 0.875, "psnr_stage1": 25.0,
                                      "ssim_stage1": 0.85}, paper["datasets"]["A"], "test split"),
            reproduce.table_row("B", {}, paper["datasets"]["B"], "skipped: not found: root=x")]
    assert rows[0]["diff_psnr"] == pytest.approx(1.5) and rows[0]["diff_ssim"] == pytest.approx(-0.025)
    assert rows[1]["diff_psnr"] is None
    md = reproduce.write_tables(rows, paper, tmp_path, "paper")
    assert "| A | 27.50 | 0.8750 | 26.00 | 0.9000 | +1.50 | -0.0250 | X, Table 1 (second-hand) | 25.00 / 0.8500 |" in md
    assert "| B |  |  | 20.00 | 0.8000 |  |  | X, Table 2 |  | skipped: not found: root=x |" in md
    assert "- X: Someone et al., 'A paper'" in md and "| Other | 25.50 / 0.9100 |  |" in md
    table = list(csv.DictReader(open(tmp_path / "tables.csv")))
    assert table[0]["diff_psnr"] == "1.5" and table[0]["checked_against_paper"] == "False"


def test_suite_with_two_datasets_present_and_the_rest_absent(chain, tmp_path):
    """The shipped suite and reported values; SateHaze1k-thin and RealBlur-J made here
    (tiny, in their real layouts, run with the chain fixture's checkpoints)."""
    sh = make_satehaze1k(tmp_path / "Haze1k_thin" / "dataset", n=(1, 1, 2))
    rb = make_realblur(tmp_path / "RealBlur")
    s1, s2 = chain / "stage1_official.pth", chain / "stage2_official.pt"
    sets = [f"datasets.SateHaze1k-thin.root={sh}", f"datasets.RealBlur-J.root={rb}"]
    for ds in ("SateHaze1k-thin", "RealBlur-J"):
        sets += [f"datasets.{ds}.stage1={s1}", f"datasets.{ds}.stage2={s2}"]
    for ds in ("RSID", "SateHaze1k-moderate", "SateHaze1k-thick", "LHID", "DHID", "RainDrop-test_a", "RealBlur-R"):
        sets.append(f"datasets.{ds}.root={tmp_path / 'absent' / ds}")       # never there, whatever the cwd
    argv = ["--output", str(tmp_path / "out"), "--device", "cpu"]
    for item in sets:
        argv += ["--set", item]
    rows = {r["dataset"]: r for r in reproduce.run(argv)}
    assert len(rows) == 10            # 9 datasets and the SateHaze1k average
    sh_row = rows["SateHaze1k-thin"]
    ours = {r["name"]: r for r in csv.DictReader(open(tmp_path / "out" / "SateHaze1k-thin" / "metrics.csv"))}
    assert len(ours) == 2
    assert sh_row["psnr"] == pytest.approx(np.mean([float(r["psnr_stage2"]) for r in ours.values()]), abs=1e-5)
    assert sh_row["reported_psnr"] == 26.03 and sh_row["reported_ssim"] == 0.9191
    assert sh_row["diff_psnr"] == pytest.approx(sh_row["psnr"] - 26.03)
    assert sh_row["source"] == "EM-SNN, Table 2 (second-hand)"
    assert rows["RealBlur-J"]["psnr"] is not None and rows["RealBlur-J"]["reported_psnr"] is None
    assert len(list((tmp_path / "out" / "RealBlur-J" / "restored").iterdir())) == 4
    for ds in ("RSID", "LHID", "DHID", "RainDrop-test_a", "RealBlur-R", "SateHaze1k-thick"):
        assert rows[ds]["psnr"] is None and rows[ds]["note"].startswith("skipped: not found: root=")
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "| LHID |  |  | 29.39 | 0.8854 |  |  | EM-SNN, Table 1 (second-hand) |" in md
    assert "EM-SNN: Shao et al." in md and "| DehazeFormer-b |" in md
