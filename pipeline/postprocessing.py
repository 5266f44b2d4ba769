"""Post-processing of the pipeline's outputs: the gate, 2D masks and 3D patient volumes.

The one home of every step between the models' raw outputs and the final masks; training
calibration, evaluation and diagnosis all call these functions, so the operating point
chosen on validation is exactly the one applied later.

* `gate(probabilities, threshold)`: the classifier's rule, a slice is flagged when its
  probability is **>=** the threshold.
* `neighbour_probabilities(p, weight)`: the volume-aware gate. Along the slice axis of one
  patient, a slice's score is ``max(p_i, weight * max(p_{i-1}, p_{i+1}))``: next to a
  confident slice the threshold is effectively lowered (tumours span adjacent slices, and
  the faint first/last slices of a tumour are the classifier's usual misses). ``weight=0``
  is the plain per-slice gate.
* `postprocess_mask(prob_map, seg_threshold, min_component_px)`: 2D, probability map -> 0/1
  mask, 8-connected components below `min_component_px` pixels dropped.
* `remove_small_volumes(volume, min_volume_px)`: 3D, a patient's stacked masks (S, H, W) ->
  the same with 26-connected components below `min_volume_px` voxels dropped, so a blob that
  continues over three slices survives where an isolated speck of the same size does not.

`PostprocessParams` holds the calibrated values (stored in `pipeline.json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "CONNECTIVITY_2D",
    "CONNECTIVITY_3D",
    "PostprocessParams",
    "clean_volume",
    "gate",
    "neighbour_probabilities",
    "postprocess_mask",
    "postprocess_volume",
    "remove_small_volumes",
    "volume_gate",
    "volume_spans",
]

CONNECTIVITY_2D = np.ones((3, 3), bool)  # 8-connectivity within a slice
CONNECTIVITY_3D = np.ones((3, 3, 3), bool)  # 26-connectivity: touching across adjacent slices counts


@dataclass(frozen=True)
class PostprocessParams:
    """The calibrated operating point of the pipeline.

    threshold: classifier probability at or above which a slice is segmented.
    seg_threshold: segmenter probability above which a pixel is tumour.
    min_component_px: 2D components smaller than this are dropped (0 keeps all).
    min_volume_px: 3D components (voxels over a patient's slices) smaller than this are
        dropped; applies only when slices come as a patient volume.
    neighbour_weight: the volume-aware gate's weight in [0, 1] (0: per-slice gate only).
    """

    threshold: float = 0.5
    seg_threshold: float = 0.5
    min_component_px: int = 0
    min_volume_px: int = 0
    neighbour_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("threshold", "seg_threshold", "neighbour_weight"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("min_component_px", "min_volume_px"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gate(probabilities: np.ndarray | float, threshold: float) -> np.ndarray:
    """The classifier gate: True where `probabilities >= threshold` (bool array, or bool for a scalar)."""
    return np.asarray(probabilities) >= threshold


def neighbour_probabilities(probabilities: np.ndarray, weight: float) -> np.ndarray:
    """Volume-aware gate score of the slices of ONE patient, in slice order (see module doc).

    `probabilities` (S,) in slice order -> (S,) float64 with
    ``max(p_i, weight * max(p_{i-1}, p_{i+1}))``; the ends have one neighbour.
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if weight <= 0 or p.size < 2:
        return p.copy()
    neighbours = np.zeros_like(p)
    neighbours[1:] = p[:-1]
    neighbours[:-1] = np.maximum(neighbours[:-1], p[1:])
    return np.maximum(p, weight * neighbours)


def postprocess_mask(
    probabilities: np.ndarray, seg_threshold: float = 0.5, min_component_px: int = 0
) -> np.ndarray:
    """Probability map (H, W) -> uint8 0/1 mask: `> seg_threshold`, then 8-connected
    components smaller than `min_component_px` pixels removed."""
    mask = np.asarray(probabilities) > seg_threshold
    return _drop_small(mask, min_component_px, CONNECTIVITY_2D).astype(np.uint8)


def remove_small_volumes(volume: np.ndarray, min_volume_px: int) -> np.ndarray:
    """A patient's masks stacked in slice order (S, H, W) -> uint8 0/1 of the same shape with
    26-connected 3D components smaller than `min_volume_px` voxels removed."""
    volume = np.asarray(volume) > 0
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, H, W), got shape {volume.shape}")
    return _drop_small(volume, min_volume_px, CONNECTIVITY_3D).astype(np.uint8)


def volume_gate(probabilities: np.ndarray, params: PostprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """The volume-aware gate on ONE patient's slices in slice order: (scores (S,), flagged (S,) bool)."""
    scores = neighbour_probabilities(probabilities, params.neighbour_weight)
    return scores, gate(scores, params.threshold)


def clean_volume(masks: np.ndarray, flagged: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """One patient's 2D masks (S, H, W) -> uint8 (S, H, W): kept on `flagged` slices only, then
    `remove_small_volumes` with `params.min_volume_px`."""
    out = np.where(np.asarray(flagged)[:, None, None], np.asarray(masks) > 0, False)
    if params.min_volume_px > 1:
        out = remove_small_volumes(out, params.min_volume_px)
    return out.astype(np.uint8)


def postprocess_volume(
    probabilities: np.ndarray, masks: np.ndarray, params: PostprocessParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gate and clean one patient's slices, in slice order: `volume_gate`, then `clean_volume`.

    `probabilities` (S,) classifier outputs; `masks` (S, H, W) the segmenter's 2D masks
    (`postprocess_mask`) for every slice (slices the gate rejects may hold anything, they
    are zeroed). Returns (gate scores (S,), flagged (S,) bool, final masks (S, H, W) uint8).
    """
    scores, flagged = volume_gate(probabilities, params)
    return scores, flagged, clean_volume(masks, flagged, params)


def volume_spans(volume_ids: np.ndarray) -> list[range]:
    """Contiguous runs of equal study ids -> index ranges (ValueError when a study is split in two)."""
    ids = np.asarray(volume_ids)
    if len(ids) == 0:
        return []
    starts = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist(), len(ids)]
    spans = [range(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if len({ids[r.start] for r in spans}) != len(spans):
        raise ValueError("the slices of each volume must be contiguous (sort by study, then slice)")
    return spans


def _drop_small(mask: np.ndarray, min_size: int, structure: np.ndarray) -> np.ndarray:
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]
