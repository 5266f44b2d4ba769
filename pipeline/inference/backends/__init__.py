"""Inference backends: how `TumorPipeline` runs its two Keras models.

A backend turns a Keras model into a *runner* (`base.Runner`): an object with
`predict_on_batch(x)` taking float32 (B, H, W, 3) raw pixel values and returning the model's
float32 output, plus the `name` and `precision` it runs with, and `pads_batches`: whether the
pipeline should pad each batch to a power-of-two bucket (`tumor_pipeline.batch_bucket`) so that
it sees a handful of shapes (Keras, which retraces per shape) or pass it as it is (OpenVINO).

    keras      the reference: `model.predict_on_batch` (training framework, Grad-CAM, GPUs)
    openvino   the models exported once to OpenVINO IR (cached by the model files' sha256,
               `ir_cache`), compiled per static batch shape, run on the CPU plugin
               (`openvino_runner`), checked against Keras at export (`pipeline.models.agreement`);
               runs each model as the fastest variant (f32, bf16, the pair's INT8 IR) that the
               pair's variant record says gives Keras' answers on this CPU class (`variant_check`)
    auto       `$LGG_BACKEND` when set (keras or openvino: a site's or the test suite's choice),
               else openvino when it is installed and no GPU is visible, else keras (`resolve_backend`)

`REGISTRY` maps each name to a `Backend` (its runner factory, whether it is installed, whether it
takes INT8 IRs); a new backend is one module and one `register_backend` call.

Keras stays the source of truth: the `.keras` files are what training writes and releases
ship; IR files are a derived cache, rebuilt when the model files change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.inference.backends.base import (
    AUTO,
    KERAS,
    OPENVINO,
    PRECISION_CHOICES,
    PRECISIONS,
    BackendError,
    KerasRunner,
    Runner,
    openvino_available,
)

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "KERAS",
    "OPENVINO",
    "PRECISIONS",
    "PRECISION_CHOICES",
    "REGISTRY",
    "Backend",
    "BackendError",
    "KerasRunner",
    "Runner",
    "backend",
    "choices",
    "make_runner",
    "openvino_available",
    "register_backend",
    "resolve_backend",
]

BACKEND_ENV = "LGG_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One backend: `factory(model, sha256=, precision=, cache_dir=, check=, int8_xml=, variants=)
    -> Runner`,
    `available()` (installed here), and whether it runs a pair's INT8 IRs (`takes_int8`)."""

    name: str
    factory: Callable[..., Runner]
    available: Callable[[], bool]
    takes_int8: bool = False


REGISTRY: dict[str, Backend] = {}


def register_backend(spec: Backend) -> None:
    """Add (or replace) a backend under `spec.name`."""
    REGISTRY[spec.name] = spec


def _keras_runner(model: Any, **_: Any) -> Runner:
    return KerasRunner(model)


def _openvino_runner(model: Any, *, sha256: str | None = None, precision: str = AUTO,
                     cache_dir: Any = None, check: bool = True, int8_xml: Any = None,
                     variants: Any = None) -> Runner:
    from pipeline.inference.backends.openvino_runner import openvino_runner

    return openvino_runner(model, sha256=sha256, precision=precision, cache_dir=cache_dir, check=check,
                           int8_xml=int8_xml, variants=variants)


register_backend(Backend(KERAS, _keras_runner, lambda: True))
register_backend(Backend(OPENVINO, _openvino_runner, openvino_available, takes_int8=True))


def choices() -> tuple[str, ...]:
    """What `--backend` takes: `auto` and every registered backend."""
    return (AUTO, *REGISTRY)


def backend(name: str) -> Backend:
    """The registered backend `name` (resolve `auto` first); ValueError naming the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(REGISTRY)} "
                         "(resolve 'auto' first)") from None


def resolve_backend(name: str = AUTO) -> str:
    """`auto` or a backend name -> the concrete backend name.

    `auto`: `$LGG_BACKEND` when set, else openvino when it is installed and TensorFlow sees no
    GPU (on a GPU, Keras under `mixed_float16` is the fast path), else keras. ValueError naming
    the choices otherwise.
    """
    if name not in choices():
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(choices())}")
    if name != AUTO:
        return name
    chosen = os.environ.get(BACKEND_ENV, "").strip()
    if chosen:
        if chosen not in REGISTRY:
            raise ValueError(f"${BACKEND_ENV}={chosen!r} is not a backend; valid: {', '.join(REGISTRY)}")
        return chosen
    from pipeline.models.precision import gpu_available

    return OPENVINO if REGISTRY[OPENVINO].available() and not gpu_available() else KERAS


def make_runner(
    model: Any,
    backend_name: str = KERAS,
    *,
    sha256: str | None = None,
    precision: str = AUTO,
    cache_dir: Any = None,
    check: bool = True,
    int8_xml: Any = None,
    variants: Any = None,
) -> Runner:
    """A runner for `model` on the backend `backend_name` (resolve `auto` first).

    openvino only: `sha256` of the model's `.keras` file keys the IR cache (else a fingerprint
    of the model's config and weights); `precision` is `auto`, `f32`, `bf16` or `int8`
    (`openvino_runner.choose_variant`); `cache_dir` overrides the cache root; `check` runs
    the agreement check against Keras when the IR is first exported; `int8_xml`: the pair's
    INT8 IR of the model; `variants`: the pair's variant record of the model on this CPU class
    ({variant: result}, `pipeline.models.variant_record.applicable`), from which `auto` takes
    the fastest that passed. Raises BackendError when the backend cannot serve the model (not
    installed, export failed, disagreement, a forced variant that failed the pair's check).
    """
    spec = backend(backend_name)
    if not spec.available():
        raise BackendError(
            f"the {spec.name} backend needs the `{spec.name}` package (pinned in requirements.txt)")
    return spec.factory(model, sha256=sha256, precision=precision, cache_dir=cache_dir, check=check,
                        int8_xml=int8_xml, variants=variants)
