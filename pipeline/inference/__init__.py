"""Inference: the two-stage `TumorPipeline`, overlap-tile prediction, batch diagnosis, Grad-CAM, overlays.

Names are imported lazily, so `import pipeline.inference` does not load TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TumorPipeline": "tumor_pipeline",
    "SliceResult": "tumor_pipeline",
    "predict_tiled": "tiling",
    "load_slice": "image_loading",
    "expand_inputs": "image_loading",
    "patient_id_from_name": "image_loading",
    "grad_cam": "gradcam",
    "overlay": "overlays",
    "run_diagnosis": "diagnose",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
