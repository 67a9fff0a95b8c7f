"""Shared test helpers.

Parity fixtures (compact form, weights rebuilt by tests/fixture_recipe.py) live in the
repository: tests/fixtures/official (both stages, the chain, the full-size key manifest),
tests/fixtures/official_variants (the coarse-only stage-2 variant) and three more seeds
and sizes of the same recipe, tests/fixtures/more_seeds/seed{101,202,303} (all cases but
the manifest). They always run: the parity tests over every set (``any_chain`` for the
chain), other tests that only need a chain over the first (``chain``).
$DSRDMPD_PARITY_DIR (one folder, or several joined by ':') points the same tests at other
folders of the same form instead; kinds of case absent from those folders are skipped,
but a run that finds no fixture at all fails.

Real remote-sensing pairs come from $DSRDMPD_REALDATA_DIR (default ../shared/realdata):
they cannot be redistributed, so without them those tests skip, except under CI=true or
DSRDMPD_REQUIRE_REALDATA=1, where a missing folder is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

import parity_cases
from fixture_recipe import write_official_checkpoints

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_PARITY_DIRS = [FIXTURES / "official", FIXTURES / "official_variants",
                       *(FIXTURES / "more_seeds" / f"seed{s}" for s in (101, 202, 303))]
_ENV_PARITY = os.environ.get("DSRDMPD_PARITY_DIR", "")
CUSTOM_PARITY = bool(_ENV_PARITY.strip())
PARITY_DIRS = [Path(p) for p in _ENV_PARITY.split(os.pathsep) if p.strip()] if CUSTOM_PARITY else DEFAULT_PARITY_DIRS

REALDATA_DIR = Path(os.environ.get("DSRDMPD_REALDATA_DIR", ROOT.parent / "shared" / "realdata"))
REQUIRE_REALDATA = os.environ.get("DSRDMPD_REQUIRE_REALDATA") == "1" or os.environ.get("CI") == "true"

# 2 threads: the development machine's cores, shared by the pytest-xdist workers (-n 2: one
# each); a GPU machine's check (scripts/gpu_check.sh) gives its CPU-side parts (CPU reference
# runs, fixtures) more with DSRDMPD_TEST_THREADS
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(int(os.environ.get("DSRDMPD_TEST_THREADS") or 0)
                      or max(1, min(2, os.cpu_count() or 1) // WORKERS))


def parity_paths(pattern: str) -> list:
    return [f for d in PARITY_DIRS if d.is_dir() for f in sorted(d.glob(pattern))]


def fixture_files(pattern: str) -> list:
    """pytest params, one per fixture file matching ``pattern`` in the parity folders. The
    in-repository folders must hold every kind (a missing one fails); custom folders may
    hold some kinds only (the others skip with the reason)."""
    files = parity_paths(pattern)
    if not files:
        where = ", ".join(map(str, PARITY_DIRS))
        marks = [pytest.mark.skip(reason=f"no {pattern} in {where}")] if CUSTOM_PARITY else []
        return [pytest.param(None, marks=marks, id="missing")]   # require(None) fails the test
    return [pytest.param(f, id=f"{f.parent.name}/{f.name}") for f in files]


def png_chunks(data: bytes) -> list:
    """A PNG file's chunks as (type, data) pairs, in file order (CRCs not checked)."""
    out, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        out.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return out


def png_bytes(chunks) -> bytes:
    """A PNG file of the (type, data) chunks given, each with its length and CRC."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I4s", len(d), k) + d + struct.pack(">I", zlib.crc32(k + d))
                                          for k, d in chunks)


def require(path):
    if path is None:
        pytest.fail(f"parity fixtures missing in {', '.join(map(str, PARITY_DIRS))}")
    return path


def require_realdata(folder):
    if folder is None:
        pytest.fail(f"real data required (CI=true or DSRDMPD_REQUIRE_REALDATA=1) but no pairs under {REALDATA_DIR}")
    return folder


def load_fixture(path: Path) -> dict:
    return parity_cases.load_fixture(require(path))


def realdata_sets() -> list:
    """pytest params, one per real-data folder holding hazy/ and GT/; ``train/`` folders are
    left out when their parent has pairs (the same sources, formats and sizes)."""
    sets = sorted(h.parent for h in REALDATA_DIR.rglob("hazy") if (h.parent / "GT").is_dir()) \
        if REALDATA_DIR.is_dir() else []
    sets = [s for s in sets if not (s.name == "train" and (s.parent / "hazy").is_dir())]
    if not sets:
        reason = f"no real-data pairs (hazy/ + GT/) under {REALDATA_DIR}"
        marks = [] if REQUIRE_REALDATA else [pytest.mark.skip(reason=reason + " (they cannot be redistributed)")]
        return [pytest.param(None, marks=marks, id="missing")]   # require_realdata(None) fails the test
    return [pytest.param(s, id=str(s.relative_to(REALDATA_DIR))) for s in sets]


CHAINS = fixture_files("chain")


_LAID_OUT = {}       # source chain folder -> its laid-out copy: ``chain`` and ``any_chain`` share one


def _lay_out_chain(src, tmp_path_factory) -> Path:
    src = require(src)
    if src not in _LAID_OUT:
        folder = tmp_path_factory.mktemp(f"chain_{src.parent.name}")
        shutil.copytree(src / "data", folder / "data")
        for name in ("expected_metrics.json", "expected_outputs.pt", "weights.pt"):
            shutil.copy2(src / name, folder / name)
        write_official_checkpoints(src, folder)
        _LAID_OUT[src] = folder
    return _LAID_OUT[src]


@pytest.fixture(scope="session", params=CHAINS if CUSTOM_PARITY else CHAINS[:1])
def chain(request, tmp_path_factory) -> Path:
    """A chain fixture laid out as a user with the authors' released files would have it:
    ``data/{hazy,GT}``, ``expected_*``, the compact ``weights.pt``, and the checkpoints rebuilt from the recipe written
    in the official formats (``stage1_official.pth``, ``stage2_official.pt``). The first
    in-repository set (every set given by $DSRDMPD_PARITY_DIR)."""
    return _lay_out_chain(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=CHAINS)
def any_chain(request, tmp_path_factory) -> Path:
    """As ``chain``, for every chain set (the parity tests of the chain run on all)."""
    return _lay_out_chain(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def chain_meta(chain) -> dict:
    return json.loads((chain / "expected_metrics.json").read_text())


@pytest.fixture()
def passthrough_networks(monkeypatch):
    """The commands load stand-in networks that return their input
    (dsrdmpd.models.passthrough), for tests of the machinery around the networks: files,
    formats, scores, batching, records. Seed and tiling options still reach the Dehazer."""
    from dsrdmpd.inference import Dehazer
    from dsrdmpd.models.passthrough import PassThroughStage1, PassThroughStage2

    def load(*args, **kwargs):
        keep = {k: kwargs[k] for k in ("seed", "tile", "overlap", "tile_batch") if k in kwargs}
        return Dehazer(PassThroughStage1(), PassThroughStage2(), **keep)
    monkeypatch.setattr(Dehazer, "from_checkpoints", staticmethod(load))


@pytest.fixture(scope="session")
def chain_exact():
    """``chain_exact(folder)``: {image name: float64 run of the folder's Dehazer} for a
    ``chain`` / ``any_chain`` folder (parity_cases.chain_exact_results), computed once per
    set in a session and shared by the chain parity tests and the speed-option tests."""
    return parity_cases.chain_exact_results


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Synthetic hazy/clear pairs (8 train, 2 valid, 2 test, 64 x 64, seed 1) shared by the
    training tests."""
    from dsrdmpd.data.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=8, n_test=2, size=64, seed=1, n_valid=2)


def tiny_stage1_config(root, *more: str) -> dict:
    """The config ``tiny_stage1`` trains with (configs/stage1_tiny.yaml, batch 2, one epoch,
    no validation) on ``root``, plus overrides ``more``: a run resumed from its last.pt with
    this config and the same data differs from it in nothing."""
    from dsrdmpd.config import load_config
    return load_config(ROOT / "configs" / "stage1_tiny.yaml",
                       [f"data.root={root}", "train.batch_size=2", "train.epochs=1", "data.val_split=null", *more])


@pytest.fixture(scope="session")
def tiny_stage1(synthetic_root, tmp_path_factory):
    """A tiny stage 1 (configs/stage1_tiny.yaml, 14.7M parameters) trained one epoch (4 steps,
    batch 2, no validation) on ``synthetic_root``, once per session: ``last`` its training
    checkpoint (with Adam's state), ``weights`` its inference weights alone (a third of the
    bytes: what the stage-2 training tests freeze, as a user's best.pt)."""
    from types import SimpleNamespace
    from dsrdmpd.training import Stage1Trainer
    run = tmp_path_factory.mktemp("tiny_stage1")
    trainer = Stage1Trainer(tiny_stage1_config(synthetic_root), run)
    trainer.train()
    trainer.save_weights("weights.pt")
    return SimpleNamespace(last=run / "checkpoints" / "last.pt", weights=run / "checkpoints" / "weights.pt")
