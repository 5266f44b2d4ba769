"""Shared fixtures: a synthetic Kaggle-layout dataset and the optional shared development copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs the models on Keras unless a test asks for a backend (tests/test_backends.py):
# an OpenVINO export costs seconds per model pair, and most tests are about something else.
os.environ.setdefault("LGG_BACKEND", "keras")

from tests.synthetic import write_dataset  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle_3m"


@pytest.fixture(scope="session", autouse=True)
def _openvino_cache(tmp_path_factory):
    """OpenVINO IR exports of the suite go to a temporary cache, never the project's .cache."""
    previous = os.environ.get("LGG_OPENVINO_CACHE")
    os.environ["LGG_OPENVINO_CACHE"] = str(tmp_path_factory.mktemp("openvino_cache"))
    yield
    if previous is None:
        os.environ.pop("LGG_OPENVINO_CACHE", None)
    else:
        os.environ["LGG_OPENVINO_CACHE"] = previous


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only synthetic dataset (6 patients, 64x64 slices, one patient without tumour)."""
    return write_dataset(tmp_path_factory.mktemp("kaggle_3m"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Path:
    """The tiny untrained pair (`tests.model_helpers.make_tiny_pair`), built once per session.

    Shared and read-only: a test or fixture that changes a pair takes a copy (`copy_pair`).
    """
    from tests.model_helpers import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny_pair") / "pair")


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
