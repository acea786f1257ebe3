"""Shared test fixtures: paths to the shipped sample and to the real data beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_dicom"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real labelled CT); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The shipped synthetic study (baseline and day 14 series plus ground truth); it must be there."""
    if not (SAMPLE_DIR / "truth.json").exists():
        pytest.fail("sample_dicom/ is missing: regenerate it with python scripts/make_sample_dicom.py")
    return SAMPLE_DIR
