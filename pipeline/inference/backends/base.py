"""What every backend shares: the names, the runner interface, the Keras runner, the error type.

Kept apart from the registry (`pipeline.inference.backends`) so that a backend module imports
this and the registry imports the backend modules, never the other way round.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np

__all__ = [
    "AUTO",
    "INT8",
    "KERAS",
    "OPENVINO",
    "PRECISIONS",
    "PRECISION_CHOICES",
    "VARIANTS",
    "BackendError",
    "KerasRunner",
    "Runner",
    "openvino_available",
]

AUTO = "auto"
KERAS = "keras"
OPENVINO = "openvino"
PRECISIONS = ("f32", "bf16")  # OpenVINO precision hints (`openvino_runner`)
INT8 = "int8"  # the pair's INT8 IR of a model (`pair_artifact.int8_irs`), run with the f32 hint
VARIANTS = (*PRECISIONS, INT8)  # what `--precision` forces (`openvino_runner.choose_variant`)
PRECISION_CHOICES = (AUTO, *VARIANTS)


class BackendError(RuntimeError):
    """A backend cannot run a model (not installed, export failed, disagreement with Keras)."""


class Runner(Protocol):
    """What `TumorPipeline` calls: one model on one batch.

    `pads_batches`: whether the pipeline pads each batch to a power-of-two bucket
    (`tumor_pipeline.batch_bucket`) so that the backend sees a handful of shapes.
    """

    name: str
    precision: str
    pads_batches: bool

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray: ...


class KerasRunner:
    """The reference backend: the Keras model itself, float32 outputs."""

    name = KERAS
    pads_batches = True  # a new batch length costs Keras a retrace: pad to power-of-two buckets

    def __init__(self, model: Any) -> None:
        self.model = model
        policy = getattr(getattr(model, "dtype_policy", None), "name", None)
        self.precision = str(policy or "float32")

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(x), np.float32)


def openvino_available() -> bool:
    """True when the `openvino` package can be imported."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False
