"""dsrdmpd-score and dsrdmpd-reproduce as a researcher meets them: folders given as files,
names differing by case or by a suffix, images one folder down, conversions on reading,
and a suite where one dataset fails. Tiny images; no model is run."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import png
import pytest
import yaml
from PIL import Image

from dsrdmpd.cli import reproduce, score
from dsrdmpd.data import DataError
from dsrdmpd.scoring import ScoringError, affix_rule, gt_references, match_restored


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == np.uint16:
        png.from_array(arr.reshape(arr.shape[0], -1), "RGB;16").save(str(path))
    else:
        Image.fromarray(arr).save(path, **kw)
    return path


def rgb(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def args(tmp_path: Path, *extra: str) -> list:
    return ["--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--output", str(tmp_path / "s"),
            "--no-progress", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_a_folder_given_as_a_file_says_so(tmp_path, capsys):
    save(tmp_path / "gt" / "a.png", rgb(0))
    save(tmp_path / "out" / "a.png", rgb(0))
    for flag, role in (("--restored", "restored"), ("--gt", "ground-truth")):
        argv = args(tmp_path)
        argv[argv.index(flag) + 1] = str(tmp_path / ("out" if flag == "--restored" else "gt") / "a.png")
        assert score.main(argv) == 2
        err = one_error_line(capsys)
        assert f"{role} folder {tmp_path}" in err and err.endswith("a.png: is a file, not a folder")


def test_an_output_that_is_a_file_is_refused_before_scoring(tmp_path, capsys):
    save(tmp_path / "gt" / "a.png", rgb(0))
    save(tmp_path / "out" / "a.png", rgb(1))
    (tmp_path / "s").write_text("not a folder")
    assert score.main(args(tmp_path)) == 2
    assert "--output" in one_error_line(capsys) and (tmp_path / "s").read_text() == "not a folder"


def test_names_differing_only_in_case_pair_when_the_pair_is_unique(tmp_path):
    save(tmp_path / "gt" / "scene1.png", rgb(0))
    save(tmp_path / "gt" / "scene2.png", rgb(1))
    save(tmp_path / "out" / "SCENE1.jpg", rgb(0), quality=100)
    save(tmp_path / "out" / "Scene2.png", rgb(1))
    pairs = match_restored(tmp_path / "out", gt_references(tmp_path / "gt"))
    assert [(p.hazy.name, p.gt.name) for p in pairs] == [("SCENE1.jpg", "scene1.png"), ("Scene2.png", "scene2.png")]
    score.run(args(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "s" / "metrics.csv")))
    assert [r["gt"] for r in rows] == ["scene1.png", "scene2.png"] and float(rows[1]["psnr_paper"]) == float("inf")
    save(tmp_path / "gt" / "Scene2.png", rgb(2))      # now 'Scene2' names a GT exactly: the exact one wins
    with pytest.raises(ScoringError, match=r"ground truth without restored \(1\): scene2\.png$"):
        match_restored(tmp_path / "out", gt_references(tmp_path / "gt"))


def test_a_name_equal_to_two_ground_truths_ignoring_case_is_an_error(tmp_path):
    save(tmp_path / "gt" / "ab.png", rgb(0))
    save(tmp_path / "gt" / "AB.png", rgb(1))
    save(tmp_path / "out" / "Ab.png", rgb(0))
    with pytest.raises(ScoringError, match="Ab.png: matches more than one ground truth"):
        match_restored(tmp_path / "out", gt_references(tmp_path / "gt"))


def test_a_common_suffix_is_named_with_the_key_rule_that_pairs_it(tmp_path, capsys):
    for n in ("1", "2"):
        save(tmp_path / "gt" / f"{n}.png", rgb(int(n)))
        save(tmp_path / "out" / f"{n}_dehazed.png", rgb(int(n)))
    assert score.main(args(tmp_path)) == 2
    assert "--restored-key '(.+)_dehazed' would pair them" in one_error_line(capsys)
    score.run(args(tmp_path, "--restored-key", "(.+)_dehazed"))          # the hint works as given
    assert len(list(csv.DictReader(open(tmp_path / "s" / "metrics.csv")))) == 2
    other = tmp_path / "other"                                           # GT with a suffix, outputs without
    for n in ("1", "2"):
        save(other / "gt" / f"{n}_gt.png", rgb(int(n)))
        save(other / "out" / f"{n}.png", rgb(int(n)))
    assert score.main(args(other)) == 2
    assert "--gt-key '(.+)_gt' would pair them" in one_error_line(capsys)
    mixed = tmp_path / "mixed"                                           # no one rule explains both names
    save(mixed / "gt" / "1.png", rgb(1))
    save(mixed / "gt" / "2.png", rgb(2))
    save(mixed / "out" / "1_dehazed.png", rgb(1))
    save(mixed / "out" / "2_out.png", rgb(2))
    assert score.main(args(mixed)) == 2
    assert "would pair them" not in one_error_line(capsys)
    names = [str(i) for i in range(60)]                                  # the rule is checked on every name
    assert affix_rule([f"{n}_dehazed" for n in names], names) == "(.+)_dehazed"
    assert affix_rule([f"{n}_dehazed" for n in names[:55]] + ["55_out"], names) is None


def test_images_one_folder_down_are_pointed_at(tmp_path, capsys):
    save(tmp_path / "gt" / "1.png", rgb(1))
    save(tmp_path / "out" / "restored" / "1.png", rgb(1))
    save(tmp_path / "out" / "panels" / "1.png", rgb(1))
    assert score.main(args(tmp_path)) == 2
    assert "its subfolders with images: panels/ (1 images), restored/ (1 images)" in one_error_line(capsys)


def test_conversions_on_reading_are_listed_with_the_scores(tmp_path, capsys):
    g = rgb(3)
    save(tmp_path / "gt" / "grey.png", g)
    save(tmp_path / "out" / "grey.png", g[..., 0])
    save(tmp_path / "gt" / "alpha.png", g)
    save(tmp_path / "out" / "alpha.png", np.dstack([g, np.zeros(g.shape[:2], np.uint8)]))
    save(tmp_path / "gt" / "deep.png", g.astype(np.uint16) * 257)
    save(tmp_path / "out" / "deep.png", g)
    save(tmp_path / "gt" / "plain.png", g)
    save(tmp_path / "out" / "plain.png", g)
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # shown turned by 90 degrees
    save(tmp_path / "gt" / "turned.png", rgb(4, 12, 14))
    save(tmp_path / "out" / "turned.jpg", rgb(4, 12, 14), exif=exif.tobytes())
    assert score.main(args(tmp_path)) == 1
    summary = (tmp_path / "s" / "summary.md").read_text()
    table = summary.split("Converted on reading")[1].split("## Failed")[0]
    assert "| grey.png | restored: grayscale replicated to RGB |" in table
    assert "| alpha.png | restored: alpha channel dropped |" in table
    assert "| deep.png | restored 8-bit, ground truth 16-bit |" in table
    assert "plain.png" not in table
    assert "| turned.jpg | size mismatch:" in summary and "(restored: turned upright (EXIF orientation 6))" in summary
    out = capsys.readouterr().out
    assert "converted on reading" in out and str(tmp_path / "s" / "summary.md") in out
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "s" / "metrics.csv"))}
    assert float(rows["deep.png"]["psnr_paper"]) == float("inf") and float(rows["alpha.png"]["ssim_paper"]) == 1.0


def test_a_float_result_a_little_outside_0_1_is_clipped_and_noted(tmp_path, capsys):
    """A method's float TIFF result that overshoots [0, 1] a little (an unclamped network
    output) is clipped, as the protocols clamp our own outputs, and the summary says so;
    one in another scale (0-255) or with NaN is refused for its pair; a ground truth, or an
    input being dehazed, is never clipped."""
    import tifffile
    g = rgb(5)
    save(tmp_path / "gt" / "over.png", g)
    save(tmp_path / "gt" / "clean.png", g)
    save(tmp_path / "gt" / "scale.png", g)
    save(tmp_path / "gt" / "nan.png", g)
    over = g.astype(np.float32) / 255
    over[0, 0], over[1, 1] = [-0.02, 0.5, 1.03], [1.0, 0.0, 0.25]
    (tmp_path / "out").mkdir()
    tifffile.imwrite(tmp_path / "out" / "over.tif", over, photometric="rgb")
    clean = np.clip(over, 0, 1)
    tifffile.imwrite(tmp_path / "out" / "clean.tif", clean, photometric="rgb")
    tifffile.imwrite(tmp_path / "out" / "scale.tif", g.astype(np.float32), photometric="rgb")
    bad = clean.copy()
    bad[2, 2, 1] = np.nan
    tifffile.imwrite(tmp_path / "out" / "nan.tif", bad, photometric="rgb")
    tifffile.imwrite(tmp_path / "gt" / "gtover.tif", over, photometric="rgb")      # a ground truth is not clipped
    save(tmp_path / "out" / "gtover.png", g)
    assert score.main(args(tmp_path)) == 1
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "s" / "metrics.csv"))}
    assert set(rows) == {"over.tif", "clean.tif"}
    assert rows["over.tif"]["psnr_paper"] == rows["clean.tif"]["psnr_paper"] != "inf"
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "| over.tif | restored: float values in [-0.02, 1.03] clipped to [0, 1]; restored 16-bit" in summary
    assert "| clean.tif | restored 16-bit, ground truth 8-bit |" in summary
    assert "scale.tif: floating-point image with values in [0, 255], outside [0, 1] by more than 0.5 " \
           "(another scale?)" in summary
    assert "nan.tif: floating-point image with NaN or infinite values" in summary
    assert "gtover.tif: floating-point image with values in [-0.02, 1.03], outside [0, 1]" in summary
    from dsrdmpd.imageio import ImageReadError, read_image
    with pytest.raises(ImageReadError, match=r"over.tif: floating-point image with values in \[-0.02, 1.03\], "
                                             r"outside \[0, 1\]$"):
        read_image(tmp_path / "out" / "over.tif")


# ---------------------------------------------------------------- the reproduce table

def test_a_failing_dataset_is_noted_and_the_table_still_written(tmp_path, monkeypatch, capsys):
    """A suite of three: A evaluates, B fails (its error noted in its row), C is missing.
    Our numbers name their checkpoints; the exit code is 1."""
    for n in ("s1.pth", "s2.pt"):
        (tmp_path / n).write_text("a checkpoint")
    suite = {"protocol": "paper", "seed": 3, "datasets": {}}
    for ds in ("A", "B", "C"):
        root = tmp_path / ds
        if ds != "C":
            root.mkdir()
        suite["datasets"][ds] = {"preset": "rsid", "root": str(root), "stage1": str(tmp_path / "s1.pth"),
                                 "stage2": str(tmp_path / "s2.pt")}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"datasets": {}}))

    def fake_test(cli):                       # dsrdmpd-test stands in: A works, B's input is bad
        if cli[cli.index("--data-root") + 1].endswith("B"):
            raise DataError("no images found in B/test/hazy")
        out = Path(cli[cli.index("--output") + 1])
        out.mkdir(parents=True)
        (out / "metrics.csv").write_text("name,psnr_stage2\n1.png,25.0\n2.png,26.0\nbad.png,\n")
        return {"psnr_stage1": 20.0, "ssim_stage1": 0.5, "psnr_stage2": 25.5, "ssim_stage2": 0.75}

    monkeypatch.setattr(reproduce.evaluate, "run", fake_test)
    argv = ["--suite", str(tmp_path / "suite.yaml"), "--paper", str(tmp_path / "paper.yaml"),
            "--output", str(tmp_path / "t")]
    assert reproduce.main(argv) == 1
    assert "1 of the table's entries had problems (B)" in one_error_line(capsys)
    md = (tmp_path / "t" / "tables.md").read_text()
    assert "| A | 25.50 | 0.7500 |" in md and "| B |  |  |" in md
    assert "failed: no images found in B/test/hazy" in md and "skipped: not found: root=" in md
    assert (f"- A: `dsrdmpd-test` with stage 1 `{tmp_path / 's1.pth'}`, stage 2 `{tmp_path / 's2.pt'}` "
            "(weights model, seed 3); 2 image(s) scored, per image in `A/metrics.csv`") in md
    assert "- B:" not in md and "- C:" not in md
    rows = list(csv.DictReader(open(tmp_path / "t" / "tables.csv")))
    assert [r["psnr"] for r in rows] == ["25.5", "", ""]


def test_reproduce_with_nothing_found_says_no_number_of_ours(tmp_path, capsys):
    suite = {"datasets": {"A": {"preset": "rsid", "root": str(tmp_path / "none")}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"datasets": {}}))
    assert reproduce.main(["--suite", str(tmp_path / "suite.yaml"), "--paper", str(tmp_path / "paper.yaml"),
                           "--output", str(tmp_path / "t")]) == 0
    assert "Where the numbers come from:\n\n- ours: none (no dataset was evaluated)\n" in \
        (tmp_path / "t" / "tables.md").read_text()
    (tmp_path / "f").write_text("x")
    assert reproduce.main(["--suite", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "f" / "t")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_peer_folder_matching_no_dataset_is_a_usage_error(tmp_path, capsys):
    suite = {"datasets": {"SateHaze1k-thin": {"preset": "rsid", "root": str(tmp_path / "none")}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"datasets": {}}))
    (tmp_path / "peer" / "SateHaze1k_thin").mkdir(parents=True)          # '_' where the suite has '-'
    base = ["--suite", str(tmp_path / "suite.yaml"), "--paper", str(tmp_path / "paper.yaml"),
            "--output", str(tmp_path / "t")]
    assert reproduce.main(base + ["--peer", f"Mine={tmp_path / 'peer'}"]) == 2
    assert "holds no folder named as a suite dataset (SateHaze1k-thin); it holds: SateHaze1k_thin" in \
        one_error_line(capsys)
    assert reproduce.main(base + ["--peer", f"Mine={tmp_path / 'nowhere'}"]) == 2
    assert "peer Mine: folder not found" in one_error_line(capsys)
    assert not (tmp_path / "t").exists()
    (tmp_path / "peer" / "SateHaze1k-thin").mkdir()                      # found; its GT is not: noted, exit 1
    assert reproduce.main(base + ["--peer", f"Mine={tmp_path / 'peer'}"]) == 1
    assert "Mine not scored: " in (tmp_path / "t" / "tables.md").read_text()


def test_identical_pairs_are_counted_and_the_others_averaged(tmp_path, capsys):
    for n, seed in (("1", 1), ("2", 2), ("3", 3)):
        save(tmp_path / "gt" / f"{n}.png", rgb(seed))
    save(tmp_path / "out" / "1.png", rgb(1))                              # identical: PSNR inf
    save(tmp_path / "out" / "2.png", rgb(5))
    save(tmp_path / "out" / "3.png", rgb(6))
    score.run(args(tmp_path, "--protocol", "paper,y"))
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "s" / "metrics.csv"))}
    want = {p: (float(rows["2.png"][f"psnr_{p}"]) + float(rows["3.png"][f"psnr_{p}"])) / 2 for p in ("paper", "y")}
    line = (f"PSNR is infinite (identical images) for 1 of 3 pair(s), so its mean is infinite; mean PSNR of the "
            f"other 2: paper {want['paper']:.3f} dB, y {want['y']:.3f} dB.")
    assert line in (tmp_path / "s" / "summary.md").read_text() and line in capsys.readouterr().out
    save(tmp_path / "out" / "2.png", rgb(2))
    save(tmp_path / "out" / "3.png", rgb(3))
    score.run(args(tmp_path))                                            # all identical: no mean of others
    assert "for 3 of 3 pair(s), so its mean is infinite." in (tmp_path / "s" / "summary.md").read_text()


def test_key_rules_are_checked_before_any_folder_is_read(tmp_path, capsys):
    save(tmp_path / "gt" / "1.png", rgb(1))
    save(tmp_path / "out" / "1.png", rgb(1))
    for extra, words in ((["--restored-key", "(.+"], "--restored-key '(.+': not a valid regular expression"),
                         (["--gt-key", ".+"], "--gt-key '.+': needs exactly one group"),
                         (["--hazy-key", "(.+)_hazy"], "--hazy-key applies only with --data-root and --preset paired")):
        assert score.main(args(tmp_path, *extra)) == 2
        assert words in one_error_line(capsys)
    argv = ["--restored", str(tmp_path / "out"), "--data-root", str(tmp_path), "--preset", "satehaze1k",
            "--gt-key", "(.+)_gt", "--output", str(tmp_path / "s")]
    assert score.main(argv) == 2
    assert "--gt-key applies only with --gt, or --data-root and --preset paired" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_suite_without_datasets_or_with_an_unknown_protocol_is_refused(tmp_path, capsys):
    for suite, words in (({"protocol": "paper"}, "no datasets listed"),
                         ({"protocol": "ycbcr", "datasets": {"A": {"root": "x"}}}, "protocol 'ycbcr' is not one of")):
        (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
        assert reproduce.main(["--suite", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "t")]) == 2
        assert words in one_error_line(capsys)
        assert not (tmp_path / "t").exists()


def test_suite_keys_and_dataset_overrides_are_checked(tmp_path, capsys):
    """A misspelt suite or dataset key, and --set for a dataset the suite does not list,
    are refused by name (they were taken quietly: a typo added a dataset of one setting)."""
    suite = {"seed": 0, "datasets": {"RSID": {"preset": "rsid", "root": str(tmp_path / "none")}}}
    base = ["--suite", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "t")]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    for extra, words in ((["--set", "datasets.RSDI.root=/data"], "lists no dataset 'RSDI' (did you mean RSID?); "
                          "it lists: RSID (add a new dataset in the suite file)"),
                         (["--set", "datasets.RSID.rot=/data"], "unknown setting 'rot' (did you mean root?)"),
                         (["--set", "sed=3"], "unknown suite key 'sed' (did you mean seed?)")):
        assert reproduce.main(base + extra) == 2
        assert words in one_error_line(capsys)
    for bad, words in (({"seed": 0, "dataset": suite["datasets"]}, "unknown suite key 'dataset' (did you mean datasets?)"),
                       ({"datasets": {"RSID": {"preset": "rsid", "stage_1": "a.pt"}}},
                        "dataset RSID: unknown setting 'stage_1' (did you mean stage1?)")):
        (tmp_path / "suite.yaml").write_text(yaml.safe_dump(bad))
        assert reproduce.main(base) == 2
        assert words in one_error_line(capsys)
    assert not (tmp_path / "t").exists()
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert reproduce.main(base + ["--set", f"datasets.RSID.root={tmp_path / 'other'}"]) == 0
