"""Shared test helpers. Parity fixtures come from $DSRDMPD_PARITY_DIR (default
../shared/fixtures/official relative to the project root). Without them the parity
tests skip, unless DSRDMPD_REQUIRE_FIXTURES=1 or CI=true, where they fail."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("DSRDMPD_PARITY_DIR", ROOT.parent / "shared" / "fixtures" / "official"))
REALDATA_DIR = Path(os.environ.get("DSRDMPD_REALDATA_DIR", ROOT.parent / "shared" / "realdata"))

# In CI (CI=true) or with DSRDMPD_REQUIRE_FIXTURES=1 missing fixtures are failures, not skips.
REQUIRE_FIXTURES = os.environ.get("DSRDMPD_REQUIRE_FIXTURES") == "1" or os.environ.get("CI") == "true"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fixture_files(pattern: str) -> list:
    files = sorted(PARITY_DIR.glob(pattern)) if PARITY_DIR.is_dir() else []
    if not files:
        return [pytest.param(None, marks=pytest.mark.skipif(
            not REQUIRE_FIXTURES, reason=f"no {pattern} in {PARITY_DIR}"), id="missing")]
    return [pytest.param(f, id=f.name) for f in files]


def require(path):
    if path is None:
        pytest.fail(f"parity fixtures required but missing in {PARITY_DIR}")
    return path


def load_fixture(path: Path) -> dict:
    return torch.load(require(path), map_location="cpu", weights_only=False)
