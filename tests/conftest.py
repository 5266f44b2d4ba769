"""Shared fixtures: a synthetic Kaggle-layout dataset and the optional shared development copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.synthetic import write_dataset  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle_3m"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only synthetic dataset (6 patients, 64x64 slices, one patient without tumour)."""
    return write_dataset(tmp_path_factory.mktemp("kaggle_3m"))


@pytest.fixture
def writable_synthetic_root(tmp_path) -> Path:
    """A fresh synthetic dataset a test may damage."""
    return write_dataset(tmp_path / "kaggle_3m")


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """The shared development copy of the LGG data; the test is skipped when it is absent."""
    if not (SHARED_DATA.is_dir() and any(SHARED_DATA.iterdir())):
        pytest.skip(f"shared LGG development copy not found at {SHARED_DATA} (CI without ../shared)")
    return SHARED_DATA
