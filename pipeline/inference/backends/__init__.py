"""Inference backends: how `TumorPipeline` runs its two Keras models.

A backend turns a Keras model into a *runner*: an object with `predict_on_batch(x)` taking
float32 (B, H, W, 3) raw pixel values and returning the model's float32 output, plus the
`name` and `precision` it runs with, and `pads_batches`: whether the pipeline should pad each
batch to a power-of-two bucket (`tumor_pipeline.batch_bucket`) so that it sees a handful of
shapes (Keras, which retraces per shape) or pass it as it is (OpenVINO).

    keras      the reference: `model.predict_on_batch` (training framework, Grad-CAM, GPUs)
    openvino   the models exported once to OpenVINO IR (cached by the model files' sha256,
               `ir_cache`), compiled per static batch shape, run on the CPU plugin
               (`openvino_runner`), checked against Keras at export (`agreement`)
    auto       `$LGG_BACKEND` when set (keras or openvino: a site's or the test suite's choice),
               else openvino when it is installed and no GPU is visible, else keras

Keras stays the source of truth: the `.keras` files are what training writes and releases
ship; IR files are a derived cache, rebuilt when the model files change.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "add_backend_arguments",
    "BACKENDS",
    "BackendError",
    "KerasRunner",
    "Runner",
    "make_runner",
    "openvino_available",
    "resolve_backend",
]

AUTO = "auto"
BACKEND_ENV = "LGG_BACKEND"
BACKENDS = ("keras", "openvino")
CHOICES = (AUTO, *BACKENDS)
PRECISIONS = ("f32", "bf16")  # OpenVINO precision hints (`openvino_runner`)
PRECISION_CHOICES = (AUTO, *PRECISIONS)


def add_backend_arguments(parser: Any) -> None:
    """`--backend` and `--precision`, the same on every command that runs the models."""
    parser.add_argument(
        "--backend", choices=CHOICES, default=AUTO,
        help="what runs the models: openvino (CPU, IR cached under .cache/openvino), keras (the "
             "reference; Grad-CAM always uses it) or auto (default: openvino on a CPU when installed)")
    parser.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=AUTO,
        help="OpenVINO precision hint: auto (default: bf16 with AMX; on other bf16 CPUs the faster of "
             "f32/bf16, timed once), f32 or bf16; ignored by keras")


class BackendError(RuntimeError):
    """A backend cannot run a model (not installed, export failed, disagreement with Keras)."""


class Runner(Protocol):
    """What `TumorPipeline` calls: one model on one padded batch."""

    name: str
    precision: str

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray: ...


class KerasRunner:
    """The reference backend: the Keras model itself, float32 outputs."""

    name = "keras"
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


def resolve_backend(name: str = AUTO) -> str:
    """`auto`, `keras` or `openvino` -> the concrete backend name.

    `auto`: `$LGG_BACKEND` when set, else openvino when it is installed and TensorFlow sees no
    GPU (on a GPU, Keras under `mixed_float16` is the fast path), else keras. ValueError naming
    the choices otherwise.
    """
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(CHOICES)}")
    if name != AUTO:
        return name
    chosen = os.environ.get(BACKEND_ENV, "").strip()
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV}={chosen!r} is not a backend; valid: {', '.join(BACKENDS)}")
        return chosen
    from pipeline.models.precision import gpu_available

    return "openvino" if openvino_available() and not gpu_available() else "keras"


def make_runner(
    model: Any,
    backend: str = "keras",
    *,
    sha256: str | None = None,
    precision: str = AUTO,
    cache_dir: Any = None,
    check: bool = True,
    int8_xml: Any = None,
) -> Runner:
    """A runner for `model` on `backend` (`keras`, `openvino`; resolve `auto` first).

    openvino only: `sha256` of the model's `.keras` file keys the IR cache (else a fingerprint
    of the model's config and weights); `precision` is `auto`, `f32` or `bf16`
    (`openvino_runner.choose_precision`); `cache_dir` overrides the cache root; `check` runs
    the agreement check against Keras when the IR is first exported; `int8_xml`: the pair's
    INT8 IR of the model (`backends.int8`), preferred under `precision="auto"`. Raises
    BackendError when the backend cannot serve the model.
    """
    if backend == "keras":
        return KerasRunner(model)
    if backend != "openvino":
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)} (resolve 'auto' first)")
    if not openvino_available():
        raise BackendError("the openvino backend needs the `openvino` package (pinned in requirements.txt)")
    from pipeline.inference.backends.openvino_runner import openvino_runner

    return openvino_runner(model, sha256=sha256, precision=precision, cache_dir=cache_dir, check=check,
                           int8_xml=int8_xml)
