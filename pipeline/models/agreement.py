"""Does another copy of a model compute what the Keras model computes? The tolerances, and the check.

Used for every copy the pipeline runs instead of the trained model: an OpenVINO IR
(`pipeline.inference.backends`, checked once at export) and the float16-stored release
(`pipeline.models.release`, checked before it is written). On the same float32 inputs:
* a probability output (classifier, (B, 1)): every probability within `PROBABILITY_TOL` of Keras;
* a map output (segmenter, (B, H, W, 1)): at least `MASK_AGREEMENT` of the pixels on the same
  side of the mask threshold (`MASK_PROBABILITY`, or the pair's where the caller knows it) as
  Keras (the masks agree), whatever the probabilities' drift.

Gate decisions then agree except for slices within `PROBABILITY_TOL` of the threshold.

The probes: the backend check runs on `model_probe` (`synthetic_slices`, seed 7, half with
tumour: the images the IR cache manifests' records and the `auto` precision choices were made
on; `probe_batch`'s images would change that choice on some CPUs, e.g. bf16 instead of f32 for
the release classifier on an AMX Xeon); the release check on `synthetic_slices.probe_batch`
(contrast varied per slice), whose numbers the release's `pipeline.json` records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "MASK_AGREEMENT",
    "MASK_DICE",
    "MASK_PROBABILITY",
    "PROBABILITY_TOL",
    "agreement",
    "mask_dice",
    "check_agreement",
    "model_probe",
]

PROBABILITY_TOL = 1e-2
MASK_AGREEMENT = 0.995
MASK_PROBABILITY = 0.5  # a segmenter pixel is tumour above this probability (for comparing masks)
# The variant check (`pipeline.inference.backends.variant_check`) also asks the masks' Dice against
# Keras' to reach this: tumour is a small share of the pixels. Release 0.3.0's INT8 segmenter agreed
# on 99.93 % of the pixels of the variant check's slices (mask Dice 0.963) and lost 0.028 of
# validation end-to-end Dice; its bf16 IR (99.998 %, mask Dice 0.9989) left the validation report
# unchanged. It stands in for the validation-Dice tolerance, which needs a whole evaluation.
MASK_DICE = 0.99
PROBE_SLICES = 8
PROBE_SEED = 7


def model_probe(model: Any, n: int = PROBE_SLICES, size: int = 256) -> np.ndarray:
    """float32 (n, H, W, 3) brain-like synthetic slices at the model's input size (`size` if free)."""
    from pipeline.data.synthetic_slices import synthetic_slices

    shape = tuple(getattr(model, "input_shape", (None, None, None, 3)))
    height = shape[1] or size
    width = shape[2] or size
    slices, _ = synthetic_slices(n, max(height, width), seed=PROBE_SEED, tumour_share=0.5)
    return np.stack(slices)[:, :height, :width].astype(np.float32)


def agreement(reference: np.ndarray, candidate: np.ndarray, cut: float = MASK_PROBABILITY) -> dict[str, Any]:
    """Compare two outputs of one model -> {"kind", "max_abs_diff", "mask_agreement", "ok"}; maps'
    masks are taken at `cut` (the pair's mask threshold where it is known)."""
    reference = np.asarray(reference, np.float32)
    candidate = np.asarray(candidate, np.float32)
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {reference.shape} and {candidate.shape}")
    diff = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    if reference.ndim <= 2:  # one probability per slice
        return {"kind": "probability", "max_abs_diff": diff, "ok": diff <= PROBABILITY_TOL}
    share = mask_agreement(reference, candidate, cut)
    return {"kind": "map", "max_abs_diff": diff, "mask_agreement": share, "ok": share >= MASK_AGREEMENT}


def mask_agreement(reference: np.ndarray, candidate: np.ndarray, cut: float = MASK_PROBABILITY) -> float:
    """Share of pixels on the same side of `cut` in two probability maps (1.0 when empty)."""
    same = (np.asarray(reference) > cut) == (np.asarray(candidate) > cut)
    return float(same.mean()) if same.size else 1.0


def mask_dice(reference: np.ndarray, candidate: np.ndarray, cut: float = MASK_PROBABILITY) -> float:
    """Dice of the two maps' masks at `cut`, pooled over every pixel (1.0 when both are empty)."""
    a, b = np.asarray(reference) > cut, np.asarray(candidate) > cut
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def check_agreement(
    model: Any, predict: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray | None = None
) -> dict[str, Any]:
    """Run `predict` (a backend) and Keras `model` on `inputs` (default `model_probe`) -> `agreement`."""
    x = model_probe(model) if inputs is None else np.asarray(inputs, np.float32)
    reference = np.asarray(model.predict_on_batch(x), np.float32)
    result = agreement(reference, predict(x))
    result["n_slices"] = int(len(x))
    return result
