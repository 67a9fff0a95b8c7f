"""The benchmark (dsrdmpd/benchmark.py) on the CPU at tiny widths: tables, columns, FLOP
count, peaks, time limit. Speed itself is not asserted."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsrdmpd import benchmark
from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.inference import Dehazer
from dsrdmpd.models.unet_blocks import ChannelLayerNorm

from conftest import ROOT

TINY = ["--dim1", "32", "--dim2", "8", "--train-size", "0", "--repeats", "1", "--warmup", "0"]


def test_flops_counted_on_meta_equal_a_real_cpu_count():
    """Within 0.5 %: the meta device runs attention through its math form, the CPU through
    its fused kernel, counted slightly differently (0.14 % apart at these widths)."""
    args = SimpleNamespace(stage1=None, stage2=None, dim1=32, dim2=8, plain=False)
    torch.manual_seed(0)
    d = Dehazer(build_stage1({"dim": 32}), build_stage2({"dim": 8}))
    with FlopCounterMode(display=False) as counter:
        d(torch.rand(1, 3, 64, 64))
    assert benchmark.count_flops(args, 64, 1) == pytest.approx(counter.get_total_flops(), rel=5e-3)
    assert counter.get_total_flops() > 0


def test_peak_table_and_override():
    assert benchmark.peak_tflops("NVIDIA H200", "tf32") == 494.5
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert benchmark.peak_tflops("NVIDIA H200", "bf16-stage1") == 67.0
    assert benchmark.peak_tflops("Some GPU", "fp32") is None
    assert benchmark.peak_tflops("Some GPU", "fp32", 100.0) == 100.0


def test_compile_phases_are_summed_over_frames():
    metrics = {"bytecode_tracing": [1.5, 2.0], "OutputGraph.call_user_compiler": [10.0],
               "build_guards": [0.25, 0.5], "compile_file": [99.0]}
    assert benchmark.compile_phases(metrics) == {"tracing_s": 3.5, "backend_s": 10.0, "guards_s": 0.75}
    assert benchmark.compile_phases({"bytecode_tracing": [1.0], "build_guards": []}) == {"tracing_s": 1.0}
    assert benchmark.compile_phases({}) == {}


def test_this_torch_records_the_compile_phases_the_benchmark_reads():
    """The phase names are torch's (a private table): one compile fills all three here, so a
    torch that renames one fails this test instead of leaving a blank column on a GPU."""
    from torch._dynamo import utils as dynamo_utils
    torch.compile(lambda x: torch.sin(x) + 1, backend="eager")(torch.rand(3))
    assert set(benchmark.compile_phases(dynamo_utils.compilation_time_metrics)) == set(benchmark.COMPILE_PHASES)


def test_variants_table_on_the_cpu(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "fp32", "fp32+fastnorm", "--pairs", "64x2",
                           "--peak-tflops", "1", "--out", str(out)] + TINY) == 0
    md = (out / "benchmark.md").read_text()
    assert "| size | batch | variant | ms / image | img/s | launches / image" in md
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "benchmark.csv"))}
    assert set(rows) == {"fp32", "fp32+fastnorm"}
    args = SimpleNamespace(stage1=None, stage2=None, dim1=32, dim2=8, plain=False)
    flops = 2 * benchmark.count_flops(args, 64, 1)       # the table counts one image (cached per process)
    for r in rows.values():
        assert r["size"] == "64" and r["batch"] == "2"
        assert float(r["tflops_per_image"]) == pytest.approx(flops / 2 / 1e12, abs=1e-6)     # CSV: 6 decimals
        assert float(r["tflop_s"]) == pytest.approx(flops / float(r["seconds"]) / 1e12, rel=1e-4, abs=1e-6)
        assert float(r["fraction_of_peak"]) == pytest.approx(float(r["tflop_s"]), abs=1e-6)  # peak 1 TFLOP/s
        assert float(r["ms_per_image"]) == pytest.approx(1000 * float(r["seconds"]) / 2, rel=1e-4)
        assert not r.get("launches_per_image")                # CUDA only
    assert rows["fp32+fastnorm"]["psnr_vs_fp32"] == "inf"      # the CPU keeps PyTorch's GroupNorm: identical


def test_breakdown_table_on_the_cpu(tmp_path):
    """--breakdown: one table per size, batch and variant; every class's own time, the
    work outside modules once per call, shares adding up to the whole."""
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "--pairs", "64x2", "--breakdown", "fp32", "--out", str(out)]
                          + TINY) == 0
    md = (out / "benchmark.md").read_text()
    assert "64 x 64, batch 2, `fp32`:" in md and "| module | calls / image | ms / image (own) | share |" in md
    rows = [r for r in csv.DictReader(open(out / "benchmark.csv")) if r["kind"] == "breakdown"]
    by = {r["module"]: r for r in rows}
    assert float(by["(outside modules)"]["calls_per_image"]) == 0.5          # one call for 2 images
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1, abs=1e-4)
    # exact call counts: each of the 5 sampling steps runs the encoder, the middle and the
    # residual decoder (not the noise decoder); one call for the batch of 2
    net = build_stage2({"dim": 8}).net
    per_step = sum(isinstance(m, ChannelLayerNorm) for part in (net.encoder, net.middle, net.residual_decoder)
                   for m in part.modules())
    assert per_step and float(by["ChannelLayerNorm"]["calls_per_image"]) == 5 * per_step / 2
    for r in rows:
        assert float(r["own_ms_per_image"]) <= float(r["total_ms_per_image"]) + 1e-6


def test_a_case_past_its_time_limit_becomes_a_row(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "fp32+cl", "--variant-sizes", "64", "--case-timeout", "0.5",
                           "--out", str(out)] + TINY) == 0
    assert "stopped after 0 s" in (out / "benchmark.md").read_text() or \
        "stopped after 1 s" in (out / "benchmark.md").read_text()


def test_a_training_case_past_its_time_limit_becomes_a_row(tmp_path):
    """The training table survives a case that fails or runs too long (its row says so)."""
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "--case-timeout", "0.5", "--out", str(out)] + TINY +
                          ["--train-size", "64"]) == 0
    md = (out / "benchmark.md").read_text()
    assert "| fast (cached stage 1, residual decoder only) | stopped after" in md
    assert "| straightforward (stage 1 every step, full network) | stopped after" in md


def test_sizes_and_scene_cases_past_their_time_limit_become_rows(tmp_path):
    """A case of the sizes table or a tiled scene that fails or runs too long is a row saying
    so, and the run goes on to the next table (gpu_check.sh's scene step used to end in a
    traceback with no table)."""
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "64", "--variants", "--case-timeout", "0.3", "--train-size", "0",
                           "--scene", "128", "--tile", "64", "--out", str(out)] + TINY) == 0
    md = (out / "benchmark.md").read_text()
    assert re.search(r"\| 64 \| stopped after \d s \|", md)
    assert re.search(r"\| 128x128 \| 9 \| stopped after \d s \|", md)      # 3 x 3 64-px tiles: default overlap 32
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert {(r["kind"], r["size"]) for r in rows if r["error"].startswith("stopped after")} == \
        {("sizes", "64"), ("scene", "128")}


def test_first_call_tables_stop_at_a_phase_past_its_time_limit(tmp_path):
    """The compile and AOT tables run their phases in fresh processes; a phase that runs too
    long is a row saying so, with every column of the table, and the phases after it are skipped."""
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "--compile-sizes", "64", "--aot-sizes", "64",
                           "--case-timeout", "0.3", "--out", str(out)] + TINY) == 0
    md = (out / "benchmark.md").read_text()
    assert re.search(r"^\| 64 \| cold \| stopped after \d s \| \| \| \| \|$", md, re.M)
    assert re.search(r"^\| 64 \| build \| stopped after \d s \| \| \| \| \| \| \|$", md, re.M)
    assert "| warm |" not in md and "| load |" not in md
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [(r["kind"], r.get("cache") or r.get("package")) for r in rows] == [("compile", "cold"), ("aot", "build")]


def test_a_variant_group_keeps_the_rows_measured_before_a_failure():
    """On CUDA the variants of one size and batch share a process: each row comes back as it
    is measured, so a variant that crashes (here one the process does not know) or runs out
    of time loses only itself and the ones after it, not the rows already measured."""
    args = SimpleNamespace(device="cpu", threads=1, warmup=0, repeats=1, profile=False, peak_tflops=0.0,
                           stage1=None, stage2=None, dim1=32, dim2=8, plain=False, case_timeout=300)
    with pytest.raises(benchmark.CaseFailed, match="failed") as failure:
        benchmark.run_case(args, kind="pipeline", size=64, batch=1, variants=["fp32", "no-such-variant"], flops=None)
    assert [r["variant"] for r in failure.value.rows] == ["fp32"]
    assert failure.value.rows[0]["seconds"] > 0


def test_aot_rows_build_then_load(tmp_path, monkeypatch):
    """The AOT table's case, in this process with the compile replaced by the stand-in of
    tests/test_aot.py (a real build takes minutes): the first call builds the three programs
    (export, compile and load times in the row, summed over them), a later one loads only;
    both beside eager fp32."""
    from dsrdmpd import aot
    from test_aot import StandIn
    stand_in = StandIn(delay=0.05)                        # each of the 3 compiles takes 50 ms at least
    monkeypatch.setattr(aot, "compile_package", stand_in.compile)
    monkeypatch.setattr(aot, "load_package", stand_in.load)
    args = SimpleNamespace(stage1=None, stage2=None, dim1=32, dim2=8, plain=False, repeats=1)
    rows = [benchmark._first_aot_call(args, dict(kind="aot", size=64, variant="fp32", package=phase,
                                                 aot_dir=str(tmp_path)), "cpu", torch) for phase in ("build", "load")]
    build, load = rows
    assert build["builds"] == 3 and load["builds"] == 0 and stand_in.compiles == 3      # stage 1, terms, step
    assert {"export_s", "compile_s", "load_s"} <= set(build) and "compile_s" not in load and "load_s" in load
    assert build["compile_s"] >= 3 * 0.05                      # summed over the three programs
    assert build["first_call_s"] >= build["export_s"] + build["compile_s"] + build["load_s"]
    for r in rows:
        assert "aot_dir" not in r and r["eager_fp32_seconds"] > 0 and r["psnr_vs_fp32"] > 100


def test_script_is_a_thin_entry_point():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--pairs", "64by2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--pairs takes SIZExBATCH" in proc.stderr


def test_scoring_table_times_both_window_forms(tmp_path):
    """--scoring SIZE: one row per protocol with the 2-D window and the separable form timed
    side by side (the speed-up is their ratio), in benchmark.md and benchmark.csv."""
    out = tmp_path / "bench"
    assert benchmark.main(["--sizes", "--variants", "--scoring", "24", "--out", str(out)] + TINY) == 0
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [r["protocol"] for r in rows] == ["paper (float32 RGB)", "standard (float64 RGB)", "y (float64 luma)"]
    md = (out / "benchmark.md").read_text()
    for r in rows:
        assert r["kind"] == "scoring" and r["size"] == "24"
        old, new = float(r["seconds_2d"]), float(r["seconds"])
        assert old > 0 and new > 0
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| 24 | {r['protocol']} | "))
        old_ms, new_ms, speedup = (float(c.rstrip("x")) for c in line.strip("| ").split(" | ")[2:])
        # the table rounds to 0.1 ms and 0.01x, the CSV to 1e-6 s: equal up to those roundings
        assert abs(old_ms - 1000 * old) <= 0.051 and abs(new_ms - 1000 * new) <= 0.051
        # the speed-up rounds the unrounded ratio to 0.01x; old / new carries the CSV's 5e-7 s roundings:
        # the two errors add up
        assert abs(speedup - old / new) <= 0.005 + (old / new) * (5e-7 / old + 5e-7 / new) + 1e-9


@pytest.mark.parametrize("argv,message", [
    (["--train-size", "48"], "--train-size 48: a training crop must be a multiple of 16 and at least 64"),
    (["--train-size", "0", "--scene", "512", "--tile", "64", "--overlap", "64"],
     r"--tile / --overlap: tile overlap 64 must be in \[0, tile size 64\)"),
    (["--train-size", "0", "--repeats", "0"], "argument --repeats: 0: must be at least 1"),
    (["--train-size", "0", "--variant-sizes", "64", "100"], "--variant-sizes 100: the networks run at sizes that are"),
    (["--train-size", "0", "--scene", "256", "--scene-variant", "nope"], "unknown scene variant 'nope'"),
    (["--train-size", "0", "--aot-sizes", "64", "--aot-variant", "fp32+graphs"],
     "--aot-variant must be a variant without compile or graphs"),
    (["--train-size", "0", "--aot-sizes", "72"], "--aot-sizes 72: the networks run at sizes that are"),
    (["--train-size", "0", "--breakdown", "tf32+fastnorm+graphs"],
     r"--breakdown tf32\+fastnorm\+graphs: the breakdown sees modules run eagerly"),
    (["--train-size", "0", "--breakdown", "fp64"], r"unknown variants \['fp64'\]"),
])
def test_bad_arguments_are_refused_before_any_case_runs(argv, message, capsys):
    """A training crop the networks refuse, or a tiling the Dehazer refuses, is a one-line
    usage error at once (it used to fail in every case's child process with a traceback)."""
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--device", "cpu", "--sizes", "--variants", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and "Traceback" not in "\n".join(err)
