"""Running both models over the evaluated slices: the end-to-end pipeline and the segmenter alone.

The end-to-end numbers go through `TumorPipeline.predict` - the product's own code path
(the classifier gates, the segmenter runs only on flagged slices, a non-flagged slice is an
empty prediction) - so the report measures what a user of `diagnose` gets. The classifier
probabilities come from the same pass (`SliceResult.probability`), which saves running
ResNet50 twice over every slice.

The segmenter-alone numbers run the segmenter on every slice through
`TumorPipeline.segment_only` (the same tiling, binarisation and post-processing as the
pipeline), so the only difference between the two is the classifier's gate.

With `volume_ids` (the study of each slice, slices contiguous and in slice order) the
end-to-end pass calls `TumorPipeline.predict_volume` once per patient, and the segmenter-alone
masks get the same 3D step (`remove_small_volumes`), as evaluation always has whole patients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from pipeline.postprocessing import remove_small_volumes, volume_spans


class PipelineLike(Protocol):
    """The part of `pipeline.inference.TumorPipeline` the evaluation uses."""

    def predict(self, images: Sequence[np.ndarray]) -> list[Any]: ...


@dataclass
class SlicePredictions:
    """Predictions for N slices, aligned with the evaluated rows.

    probabilities: (N,) float64 classifier tumour probability.
    flagged: (N,) bool, the pipeline's gate decision (`SliceResult.is_tumor`).
    pipeline_masks: (N, H, W) uint8 0/1 end-to-end masks (all zero where not flagged).
    segmenter_masks: (N, H, W) uint8 0/1 masks of the segmenter run on every slice.
    """

    probabilities: np.ndarray
    flagged: np.ndarray
    pipeline_masks: np.ndarray
    segmenter_masks: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.probabilities)
        sizes = {len(self.flagged), len(self.pipeline_masks), len(self.segmenter_masks)}
        if sizes != {n}:
            raise ValueError(
                f"predictions disagree in length: {n} probabilities, {len(self.flagged)} "
                f"flags, {len(self.pipeline_masks)} and {len(self.segmenter_masks)} masks"
            )


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, n, batch_size)


def run_pipeline(
    pipeline: PipelineLike, images: np.ndarray, batch_size: int = 16, progress: bool = True,
    volume_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the end-to-end pipeline over `images` (N, H, W, 3) uint8, `batch_size` slices per call,
    or one patient volume per call (`predict_volume`) when `volume_ids` is given.

    Returns `(probabilities (N,) float64, flagged (N,) bool, masks (N, H, W) uint8 0/1)`.
    A slice the pipeline did not flag counts as an empty prediction whatever mask it holds.
    """
    n = len(images)
    height, width = images.shape[1:3]
    probabilities = np.zeros(n, np.float64)
    flagged = np.zeros(n, bool)
    masks = np.zeros((n, height, width), np.uint8)
    if volume_ids is not None:
        chunks = [(r.start, r.stop, pipeline.predict_volume) for r in volume_spans(volume_ids)]
    else:
        chunks = [(a, min(a + batch_size, n), pipeline.predict) for a in _batches(n, batch_size)]
    with tqdm(total=n, desc="end-to-end pipeline", unit="slice", disable=not progress) as bar:
        for start, stop, predict in chunks:
            batch = [np.asarray(images[i]) for i in range(start, stop)]
            results = predict(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"pipeline returned {len(results)} results for {len(batch)} slices")
            for offset, result in enumerate(results):
                i = start + offset
                probabilities[i] = float(result.probability)
                flagged[i] = bool(result.is_tumor)
                if flagged[i] and result.mask is not None:
                    mask = np.asarray(result.mask)
                    if mask.shape != (height, width):
                        raise RuntimeError(
                            f"pipeline mask of shape {mask.shape} for a {height}x{width} slice"
                        )
                    masks[i] = mask > 0
            bar.update(len(batch))
    return probabilities, flagged, masks


SegmentFn = Callable[[np.ndarray], np.ndarray]
"""Maps a uint8 batch (B, H, W, 3) to binary masks (B, H, W)."""


def run_segmenter(
    segment: SegmentFn, images: np.ndarray, batch_size: int = 16, progress: bool = True,
    volume_ids: np.ndarray | None = None, min_volume_px: int = 0,
) -> np.ndarray:
    """Apply `segment` to every slice of `images` (N, H, W, 3) in batches; returns (N, H, W) uint8 0/1.

    With `volume_ids`, 3D components below `min_volume_px` voxels are then dropped per volume.
    """
    n = len(images)
    masks = np.zeros((n, *images.shape[1:3]), np.uint8)
    with tqdm(total=n, desc="segmenter alone", unit="slice", disable=not progress) as bar:
        for start in _batches(n, batch_size):
            stop = min(start + batch_size, n)
            out = np.asarray(segment(np.asarray(images[start:stop])))
            if out.ndim == 4:
                out = out[..., 0]
            if out.shape != masks[start:stop].shape:
                raise RuntimeError(
                    f"segmenter returned shape {out.shape} for a batch of {stop - start} slices"
                )
            masks[start:stop] = out > 0
            bar.update(stop - start)
    if volume_ids is not None and min_volume_px > 1:
        for span in volume_spans(volume_ids):
            masks[span.start : span.stop] = remove_small_volumes(masks[span.start : span.stop], min_volume_px)
    return masks


def predict_slices(
    pipeline: PipelineLike,
    images: np.ndarray,
    segment: SegmentFn,
    batch_size: int = 16,
    progress: bool = True,
    volume_ids: np.ndarray | None = None,
    min_volume_px: int = 0,
) -> SlicePredictions:
    """End-to-end pipeline on every slice (per volume with `volume_ids`), then the segmenter alone."""
    probabilities, flagged, pipeline_masks = run_pipeline(pipeline, images, batch_size, progress, volume_ids)
    segmenter_masks = run_segmenter(segment, images, batch_size, progress, volume_ids, min_volume_px)
    return SlicePredictions(probabilities, flagged, pipeline_masks, segmenter_masks)
