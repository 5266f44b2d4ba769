"""Tiny untrained models for tests: a saved classifier/segmenter pair that builds in seconds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_CLASSIFIER = {"image_size": 32, "weights": "none", "dense_units": 8}
TINY_SEGMENTER = {"base_filters": 4, "depth": 2}
# Untrained ResNet50 heads often saturate: with many seeds every synthetic slice scores ~0 or ~1,
# 1e-5 apart. With this seed the tiny classifier's probabilities spread over ~0.33-0.40, so tests
# can put a threshold between slices that float16 storage cannot move them across.
TINY_PAIR_SEED = 2


def make_tiny_classifier():
    """An untrained ResNet50 classifier (random weights, 32x32 internal size)."""
    from pipeline.models.resnet_classifier import build_classifier

    return build_classifier(**TINY_CLASSIFIER)


def make_tiny_segmenter():
    """An untrained ResUNet with 4 base filters and depth 2 (inputs divisible by 4)."""
    from pipeline.models.resunet import build_resunet

    return build_resunet(**TINY_SEGMENTER)


def make_tiny_pair(directory: str | os.PathLike, seed: int = TINY_PAIR_SEED, **meta) -> Path:
    """Build and save an untrained tiny pair in `directory` with `save_pair`; return the directory.

    The weights come from `keras.utils.set_random_seed(seed)` (which seeds Python, NumPy and
    TensorFlow globally), so every run gets the same pair. `meta` overrides the pair metadata
    (threshold 0.5, segmenter_tile_size 64 by default). Builds two models (a few seconds), so
    call it once per session from a fixture.
    """
    import keras

    from pipeline.models.model_io import save_pair

    keras.utils.set_random_seed(seed)

    record = {"threshold": 0.5, "segmenter_tile_size": 64, "policy": "float32",
              "backbone_weights": "none", "tiny_test_pair": True}
    record.update(meta)
    return save_pair(directory, make_tiny_classifier(), make_tiny_segmenter(), record)


def copy_pair(pair: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A copy of the pair directory `pair` at `directory` (to change it without touching the shared one)."""
    return Path(shutil.copytree(pair, directory))
