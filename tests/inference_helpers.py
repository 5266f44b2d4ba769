"""Tiny stand-in models for the inference tests: their outputs are known functions of the input.

`StubClassifier`: tumour probability = brightest FLAIR pixel / 255. On the synthetic slices
(`tests.synthetic`) tumour FLAIR is ~200 and brain ~90, so a threshold of 0.6 separates them.
`StubSegmenter`: mask probability = 1 where FLAIR > 150, else 0 - pointwise, so tiled and
direct predictions agree exactly, and on synthetic slices it reproduces the ground truth.
Both record every batch passed to `predict_on_batch` (`.batches`): the spies of the gating tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np
from keras import ops

from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.preprocessing import FLAIR_CHANNEL

TUMOUR_LEVEL = 150.0
GATE = 0.6


class _Recording(keras.Model):
    """A weightless Keras model that remembers the batches it was asked to predict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[np.ndarray] = []
        self.padded_lengths: list[int] = []  # batch lengths as called, padding included

    def predict_on_batch(self, x):
        # The pipeline pads batches to power-of-two lengths with all-zero images; record real inputs only.
        x = np.array(x, copy=True)
        self.padded_lengths.append(len(x))
        self.batches.append(x[np.any(x.reshape(len(x), -1) != 0, axis=1)])
        return super().predict_on_batch(x)

    @property
    def n_seen(self) -> int:
        """Slices (or tiles) predicted so far, padding excluded."""
        return sum(len(b) for b in self.batches)


class StubClassifier(_Recording):
    """(B, H, W, 3) raw -> (B, 1) max FLAIR / 255."""

    def call(self, x):
        flair = ops.cast(x[..., FLAIR_CHANNEL], "float32")
        return ops.expand_dims(ops.max(flair, axis=(1, 2)) / 255.0, -1)


class StubSegmenter(_Recording):
    """(B, H, W, 3) raw -> (B, H, W, 1) 1.0 where FLAIR > TUMOUR_LEVEL."""

    def call(self, x):
        return ops.cast(x[..., FLAIR_CHANNEL : FLAIR_CHANNEL + 1] > TUMOUR_LEVEL, "float32")


def stub_pipeline(tile_size: int = 64, **kwargs) -> TumorPipeline:
    """A TumorPipeline of the two stubs, gating at GATE unless `threshold` is given."""
    kwargs.setdefault("threshold", GATE)
    return TumorPipeline(StubClassifier(), StubSegmenter(), tile_size=tile_size, **kwargs)


def expected_mask(image: np.ndarray) -> np.ndarray:
    """What the stub segmenter predicts for `image`: uint8 0/1."""
    return (np.asarray(image)[..., FLAIR_CHANNEL] > TUMOUR_LEVEL).astype(np.uint8)


def slice_images(root: Path) -> list[Path]:
    """The image TIFFs (not masks) of a synthetic Kaggle-layout root."""
    return sorted(p for p in root.rglob("*.tif") if not p.stem.endswith("_mask"))


def file_hashes(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of each file, to check inputs are left untouched."""
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
