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

`OperatingPoint` is the calibrated operating point, one frozen value carried whole by the pair
artifact (`pipeline.json`), `TumorPipeline`, diagnosis's settings and evaluation's provenance,
and validated here only (`check_number`). A new parameter is one field of it (with its range in
the field's metadata) plus the step that uses it. `PostprocessParams` is its former name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "CONNECTIVITY_2D",
    "CONNECTIVITY_3D",
    "OperatingPoint",
    "PostprocessParams",
    "check_number",
    "clean_volume",
    "gate",
    "neighbour_probabilities",
    "postprocess_mask",
    "remove_small_volumes",
    "volume_gate",
    "volume_spans",
]

CONNECTIVITY_2D = np.ones((3, 3), bool)  # 8-connectivity within a slice
CONNECTIVITY_3D = np.ones((3, 3, 3), bool)  # 26-connectivity: touching across adjacent slices counts


def check_number(key: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None) -> Any:
    """`value` as int (`integer`) or float when it is a finite number in [low, high]; else a
    ValueError naming `key`, the rule and the value (the one validator of the operating point)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key!r} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key!r} must be finite, got {value!r}")
    if integer and value != int(value):
        raise ValueError(f"{key!r} must be {kind}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{key!r} must be {bounds}, got {value!r}")
    return int(value) if integer else float(value)


def _rule(default: Any, low: float, high: float | None = None, *, required: bool) -> Any:
    """A field of `OperatingPoint`: its default, its range and whether `pipeline.json` must hold it."""
    integer = isinstance(default, int)
    rule = {"integer": integer, "low": low, "high": high, "required": required}
    return field(default=default, metadata=rule)


@dataclass(frozen=True)
class OperatingPoint:
    """The calibrated operating point of the pipeline (stored in `pipeline.json`).

    threshold: classifier probability at or above which a slice is segmented.
    seg_threshold: segmenter probability above which a pixel is tumour.
    min_component_px: 2D components smaller than this are dropped (0 keeps all).
    min_volume_px: 3D components (voxels over a patient's slices) smaller than this are
        dropped; applies only when slices come as a patient volume.
    neighbour_weight: the volume-aware gate's weight in [0, 1] (0: per-slice gate only).

    Each field's metadata gives its range and whether a pair's `pipeline.json` must record it
    (`required`; the others default when absent). Values are checked and typed on construction
    (ValueError naming the field).
    """

    threshold: float = _rule(0.5, 0.0, 1.0, required=True)
    seg_threshold: float = _rule(0.5, 0.0, 1.0, required=True)
    min_component_px: int = _rule(0, 0, required=True)
    min_volume_px: int = _rule(0, 0, required=False)
    neighbour_weight: float = _rule(0.0, 0.0, 1.0, required=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rule = f.metadata
            checked = check_number(f.name, getattr(self, f.name), integer=rule["integer"],
                                   low=rule["low"], high=rule["high"])
            object.__setattr__(self, f.name, checked)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The fields a pair's `pipeline.json` must record."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["required"])

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> OperatingPoint:
        """The fields present in `record` (an optional one may be None); the others at their
        defaults. Other keys are ignored. ValueError for a value out of range or of the wrong type."""
        required = cls.required()
        return cls(**{name: record[name] for name in cls.names()
                      if name in record and (record[name] is not None or name in required)})

    def replace(self, **changes: Any) -> OperatingPoint:
        """A copy with `changes` applied (None values ignored: "keep the calibrated one")."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise TypeError(f"not fields of the operating point: {sorted(unknown)}; valid: {self.names()}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PostprocessParams = OperatingPoint  # the former name (training calibration, older callers)


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


def volume_gate(probabilities: np.ndarray, params: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
    """The volume-aware gate on ONE patient's slices in slice order: (scores (S,), flagged (S,) bool)."""
    scores = neighbour_probabilities(probabilities, params.neighbour_weight)
    return scores, gate(scores, params.threshold)


def clean_volume(masks: np.ndarray, flagged: np.ndarray, params: OperatingPoint) -> np.ndarray:
    """One patient's 2D masks (S, H, W) -> uint8 (S, H, W): kept on `flagged` slices only, then
    `remove_small_volumes` with `params.min_volume_px`."""
    out = np.where(np.asarray(flagged)[:, None, None], np.asarray(masks) > 0, False)
    if params.min_volume_px > 1:
        out = remove_small_volumes(out, params.min_volume_px)
    return out.astype(np.uint8)


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
