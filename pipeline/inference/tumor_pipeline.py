"""The product: a ResNet50 classifier gating a ResUNet segmenter, from raw slices to measured tumours.

    slices (uint8 (H, W, 3), any sizes)
      -> classifier on every slice, in batches               -> tumour probability
      -> probability >= threshold ? ResUNet, in batches       -> probability map -> mask
                                  : empty mask (the segmenter never sees the slice)
      -> post-processing (`pipeline.postprocessing`: components < min_component_px dropped) and measurements

`predict_volume` takes the slices of one patient in slice order and adds the volume steps:
the neighbour-aware gate (a slice next to a confident one is flagged at a lower score) and
3D components below `min_volume_px` voxels dropped.

Preprocessing is the one of training because it lives inside the models (their first
layers, `pipeline.preprocessing`): the pipeline feeds raw pixel values and nothing else.

Slices of different sizes: the classifier resizes internally (its `Resizing` layer, as in
training), so the pipeline does *not* resize for it; it batches slices of equal size together
(the dataset's slices are all 256x256, so that is one group). Resizing outside the model
(e.g. with cv2 INTER_AREA) would feed the classifier a differently interpolated view than
the one it was trained on. The segmenter takes `tile_size` slices directly, in batches; any
other size goes through the overlap-tile strategy (`pipeline.inference.tiling`), which pads
smaller slices by mirroring and tiles larger ones, so sides that are not multiples of the
ResUNet's 2^depth are handled too.

Backends (`pipeline.inference.backends`): the two models run through runners, `keras` (the
reference, the default of the constructor) or `openvino` (the models' cached OpenVINO IR on the
CPU, checked against Keras when first exported); `auto` picks OpenVINO on a CPU when it is
installed. If `auto` cannot use OpenVINO (export failed, disagreement), it falls back to Keras
with a warning; an explicit `openvino` raises instead. The Keras models stay on the pipeline
(`classifier`, `segmenter`) for Grad-CAM.

Precision: under Keras the models run with the dtype policy they were built or saved with
(Keras stores it per layer); both keep their normalisation and sigmoid outputs in float32.
The pipeline does not change any policy; to run in mixed precision, build or load the models
under it (`pipeline.models.precision`). Under OpenVINO the precision is a compile hint
(`precision`: auto, f32, bf16; see `backends.openvino_runner`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.inference.backends import AUTO, KERAS, BackendError, backend, make_runner, resolve_backend
from pipeline.inference.tiling import predict_tiled
from pipeline.postprocessing import (
    CONNECTIVITY_2D,
    OperatingPoint,
    clean_volume,
    gate,
    postprocess_mask,
    volume_gate,
)
from pipeline.preprocessing import FLAIR_CHANNEL

__all__ = ["SliceResult", "TumorPipeline", "brain_mask", "measure"]

log = logging.getLogger(__name__)

BRAIN_THRESHOLD = 10  # FLAIR grey level above which a pixel counts as brain (background is ~0)
CONNECTIVITY = CONNECTIVITY_2D  # 8-connectivity: diagonal neighbours belong to one component
MAX_BATCH_PIXELS = 16 * 512 * 512  # caps a classifier batch of large slices (~50 MB of float32 input)
DEFAULT_TILE_SIZE = 256  # the dataset's slice side, the segmenter's native input
DEFAULT_BATCH_SIZE = 16


def _takes_int8(name: str) -> bool:
    """Whether the backend `name` (`auto` resolved) runs a pair's INT8 IRs."""
    return backend(resolve_backend(name)).takes_int8


@dataclass
class SliceResult:
    """The pipeline's answer for one slice.

    probability: classifier tumour probability in [0, 1].
    is_tumor: the decision, `probability >= threshold` (the classifier's gate; a flagged slice
        may still end up with an empty mask if the segmenter finds nothing).
    mask: uint8 (H, W) 0/1, all zero when not flagged.
    area_px: tumour pixels in `mask`.
    area_fraction_slice: area_px / (H * W).
    area_fraction_brain: area_px / brain pixels (`brain_mask`: FLAIR above background, cleaned
        up, plus the tumour itself); 0.0 when the slice has no brain.
    brain_px: pixels counted as brain.
    bbox: (y0, x0, y1, x1) with exclusive ends, so `mask[y0:y1, x0:x1]` holds the tumour; None if empty.
    centroid: (y, x) centre of mass of the mask in pixels; None if empty.
    n_components: 8-connected tumour regions after post-processing.
    """

    probability: float
    is_tumor: bool
    mask: np.ndarray = field(repr=False)
    area_px: int
    area_fraction_slice: float
    area_fraction_brain: float
    brain_px: int
    bbox: tuple[int, int, int, int] | None
    centroid: tuple[float, float] | None
    n_components: int

    def to_dict(self) -> dict[str, Any]:
        """All fields but the mask, as JSON-friendly Python types."""
        return {
            "probability": self.probability,
            "is_tumor": self.is_tumor,
            "area_px": self.area_px,
            "area_fraction_slice": self.area_fraction_slice,
            "area_fraction_brain": self.area_fraction_brain,
            "brain_px": self.brain_px,
            "bbox": list(self.bbox) if self.bbox is not None else None,
            "centroid": list(self.centroid) if self.centroid is not None else None,
            "n_components": self.n_components,
        }


def brain_mask(image: np.ndarray, threshold: int = BRAIN_THRESHOLD) -> np.ndarray:
    """Non-background pixels of a slice -> bool (H, W).

    FLAIR > `threshold`, then a 3x3 opening (drops isolated noise pixels) and hole filling
    (dark structures inside the head, e.g. ventricles, are brain too).

    Pixel for pixel `scipy.ndimage.binary_fill_holes(binary_opening(flair > threshold, 3x3))`
    (a test holds the two equal), in OpenCV: 0.6 ms a 256x256 slice against scipy's 11.6 ms,
    which matters since every slice of a diagnosis is measured.
    Outside the image counts as background, as in scipy's defaults.
    """
    import cv2

    flair = np.asarray(image)[..., FLAIR_CHANNEL]
    above = (flair > threshold).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    eroded = cv2.erode(above, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    opened = cv2.dilate(eroded, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    # Holes: background not 4-connected to the outside; flood the outside from a 1-pixel frame.
    framed = cv2.copyMakeBorder(opened, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    flood = np.zeros((framed.shape[0] + 2, framed.shape[1] + 2), np.uint8)
    cv2.floodFill(framed, flood, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def measure(image: np.ndarray, mask: np.ndarray, probability: float, is_tumor: bool) -> SliceResult:
    """Measure a binary `mask` (H, W) predicted on `image` (H, W, 3) -> SliceResult."""
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    area = int(mask.sum())
    brain_px = int((brain_mask(image) | mask.astype(bool)).sum())
    n_components = 0
    bbox = centroid = None
    if area:
        _, n_components = ndimage.label(mask, structure=CONNECTIVITY)
        ys, xs = np.nonzero(mask)
        bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        cy, cx = ndimage.center_of_mass(mask)
        centroid = (float(cy), float(cx))
    return SliceResult(
        probability=float(probability),
        is_tumor=bool(is_tumor),
        mask=mask,
        area_px=area,
        area_fraction_slice=area / mask.size,
        area_fraction_brain=area / brain_px if brain_px else 0.0,
        brain_px=brain_px,
        bbox=bbox,
        centroid=centroid,
        n_components=int(n_components),
    )


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    checked = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {i} must be (H, W, 3), got shape {image.shape}")
        checked.append(image)
    return checked


def batch_bucket(n: int, size: int) -> int:
    """Padded batch length for `n` slices: the smallest power of two >= n, at most `size`."""
    return min(size, 1 << max(0, n - 1).bit_length())


def _predict_fixed_batch(model: Any, batch: np.ndarray, size: int) -> np.ndarray:
    """`model.predict_on_batch` (a backend runner's) on `batch` in chunks of `size` -> float32 outputs.

    Each chunk is zero-padded to a power-of-two length (`batch_bucket`): Keras traces its
    predict function once per input shape (seconds each on a CPU), so a handful of fixed
    lengths bound the tracing, while a chunk of 5 flagged slices costs 8, not `size`, slices
    of compute. A runner whose `pads_batches` is False (OpenVINO: a new static shape compiles
    in a fraction of a second, and is cached) gets the chunk as it is, so 9 flagged slices
    cost 9, not 16.
    """
    pads = getattr(model, "pads_batches", True)
    outs = []
    for start in range(0, max(1, len(batch)), size):
        chunk = batch[start : start + size]
        length = batch_bucket(len(chunk), size) if pads else max(1, len(chunk))
        x = np.zeros((length, *batch.shape[1:]), np.float32)
        x[: len(chunk)] = chunk
        outs.append(np.asarray(model.predict_on_batch(x), np.float32)[: len(chunk)])
    return np.concatenate(outs)


def _groups_by_shape(
    images: Sequence[np.ndarray], indices: Sequence[int]
) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in indices:
        groups[images[i].shape[:2]].append(i)
    return groups


class TumorPipeline:
    """Two-stage inference: classifier gate, then ResUNet on the flagged slices only.

    classifier: Keras model, raw (B, H, W, 3) 0..255 -> (B, 1) tumour probability.
    segmenter: Keras model, raw (B, t, t, 3) 0..255 -> (B, t, t, 1) mask probability.
    point: the operating point (`pipeline.postprocessing.OperatingPoint`: threshold, seg_threshold,
        min_component_px, and for `predict_volume` min_volume_px and neighbour_weight); its fields
        may also be given as keywords (`threshold=0.4`), applied over `point`, and read or set as
        attributes (`pipe.threshold`; setting one replaces `point` with a validated copy).
    tile_size: the segmenter's native input side (the training slice size, 256); other sizes
        are tiled (`predict_tiled`).
    batch_size: slices (or tiles) per model call.
    tile_overlap: overlap of neighbouring tiles for slices that are tiled.
    backend: `keras` (default), `openvino` or `auto` (module docstring); `backend_name` is the one in use.
    precision: OpenVINO's variant, `auto`, `f32`, `bf16` or `int8` (ignored by Keras).
    model_sha256: {"classifier": ..., "segmenter": ...} sha256 of the model files, the OpenVINO
        cache key (`from_dir` passes the pair's); without it the models' weights are hashed.
    int8_xml: {"classifier": path, ...} INT8 IRs the pair ships (`pair_artifact.int8_irs`;
        `from_dir` finds them), run by OpenVINO when chosen (`openvino_runner.choose_variant`).
    variant_record: {"classifier": {variant: result}, ...} the pair's variant record on this CPU
        class (`pipeline.models.variant_record.applicable`; `from_pair` reads it): what OpenVINO's
        `auto` may pick, and which forced variants are refused.
    """

    def __init__(
        self,
        classifier: Any,
        segmenter: Any,
        point: OperatingPoint | None = None,
        *,
        tile_size: int = DEFAULT_TILE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        tile_overlap: float = 0.25,
        backend: str = KERAS,
        precision: str = AUTO,
        model_sha256: dict[str, str] | None = None,
        int8_xml: dict[str, Any] | None = None,
        variant_record: dict[str, Any] | None = None,
        **point_fields: Any,
    ) -> None:
        if batch_size < 1 or tile_size < 1:
            raise ValueError(f"batch_size and tile_size must be >= 1, got {batch_size} and {tile_size}")
        self.classifier = classifier
        self.segmenter = segmenter
        self.point = (point or OperatingPoint()).replace(**point_fields)  # validated (ValueError)
        self.tile_size = int(tile_size)
        self.batch_size = int(batch_size)
        self.tile_overlap = float(tile_overlap)
        self.meta: Any = None
        self.model_sha256 = dict(model_sha256 or {})  # recorded in a diagnosis's settings and journal
        self._use_backend(backend, precision, self.model_sha256, int8_xml or {}, variant_record or {})

    def __getattr__(self, name: str) -> Any:
        # called only when normal lookup fails: the operating point's fields read through
        point = self.__dict__.get("point")
        if point is not None and name in OperatingPoint.names():
            return getattr(point, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OperatingPoint.names():
            self.point = self.point.replace(**{name: value})
        else:
            super().__setattr__(name, value)

    def _use_backend(self, backend: str, precision: str, sha256: dict[str, str],
                     int8: dict[str, Any], variants: dict[str, Any]) -> None:
        name = resolve_backend(backend)
        try:
            runners = [make_runner(model, name, sha256=sha256.get(role), precision=precision,
                                   int8_xml=int8.get(role), variants=variants.get(role))
                       for role, model in (("classifier", self.classifier), ("segmenter", self.segmenter))]
        except BackendError as exc:
            if backend != AUTO:
                raise
            log.warning("backend auto: %s; using keras", exc)
            runners = [make_runner(model, KERAS) for model in (self.classifier, self.segmenter)]
        self.classifier_runner, self.segmenter_runner = runners
        self.backend_name = self.classifier_runner.name

    @property
    def backend_info(self) -> dict[str, Any]:
        """{"backend", "classifier_precision", "segmenter_precision"}: what runs the models (for reports)."""
        return {
            "backend": self.backend_name,
            "classifier_precision": self.classifier_runner.precision,
            "segmenter_precision": self.segmenter_runner.precision,
        }

    @property
    def variants(self) -> dict[str, str]:
        """{"classifier", "segmenter"}: which variant of each model runs, `<backend>-<precision>`
        (e.g. `openvino-int8`, `openvino-f32`, `keras-float32`), for reports and journals."""
        return {role: f"{runner.name}-{runner.precision}" for role, runner in
                (("classifier", self.classifier_runner), ("segmenter", self.segmenter_runner))}

    @property
    def params(self) -> OperatingPoint:
        """The operating point (`point`; the former name)."""
        return self.point

    def settings(self) -> dict[str, Any]:
        """What the pipeline applies, for reports: the operating point's fields and `tile_size`."""
        return {**self.point.to_json(), "tile_size": self.tile_size}

    @classmethod
    def from_pair(
        cls,
        pair: Any,
        pair_dir: str | os.PathLike | None = None,
        *,
        point: OperatingPoint | None = None,
        backend: str = KERAS,
        allow_unverified: bool = False,
        **options: Any,
    ) -> TumorPipeline:
        """The pipeline of a loaded `model_io.ModelPair`, its operating point and tile size from the
        pair's validated `PairArtifact` (`point` replaces the operating point when given).

        `pair_dir` (where the pair's files are) lets a backend that takes INT8 IRs use the ones the
        pair ships (`pair_artifact.int8_irs`), and the pair's variant record of this CPU class
        (`pipeline.models.variant_record`) tell OpenVINO which variants it may run. `options`:
        the constructor's other keywords (`batch_size`, `precision`, `model_sha256`, ...) and
        operating-point fields to override;
        None values are ignored. The pair's model sums key the OpenVINO cache. INT8 files not
        matching their sums are refused (DataError) unless `allow_unverified`.
        """
        from pipeline.models.pair_artifact import INT8_KEY, MODEL_ROLES, PairArtifact, int8_irs, model_sums
        from pipeline.models.precision import cpu_class
        from pipeline.models.variant_record import VARIANTS_KEY, applicable

        artifact = getattr(pair, "artifact", None)
        if artifact is None:  # a pair assembled in memory: no files to verify
            artifact = PairArtifact.from_dict(pair.meta, allow_unverified=True)
        settings: dict[str, Any] = {**artifact.pipeline_settings(), "backend": backend}
        if point is not None:
            settings["point"] = point
        settings.update({k: v for k, v in options.items() if v is not None})
        settings.setdefault("model_sha256", model_sums(artifact.sha256))
        if pair_dir is not None and pair.meta.get(INT8_KEY) and _takes_int8(backend):
            settings.setdefault("int8_xml", int8_irs(pair_dir, pair.meta, settings["model_sha256"],
                                                     allow_unverified=allow_unverified))
        if pair_dir is not None and pair.meta.get(VARIANTS_KEY):  # checked on the pair's own files
            cpu = cpu_class()
            settings.setdefault("variant_record", {
                role: applicable(pair.meta[VARIANTS_KEY], role, cpu, artifact.sha256)
                for role in MODEL_ROLES})
        pipeline = cls(pair.classifier, pair.segmenter, **settings)
        pipeline.meta = pair.meta
        return pipeline

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike, allow_unverified: bool = False, **overrides: Any
    ) -> TumorPipeline:
        """Load a saved model pair (`pipeline.models.model_io.load_pair`) with its operating point.

        The operating point and `tile_size` come from the pair's validated `pipeline.json`
        (`PairArtifact.pipeline_settings`); the models keep the dtype policy they were saved with.
        `allow_unverified`: load a pair whose `pipeline.json` records no sha256 of its model files
        (refused otherwise; see `load_pair`). `overrides` (e.g. `threshold=0.4`, `batch_size=32`,
        `backend="openvino"`) win over the saved values; None is ignored (`from_pair`).
        """
        from pipeline.models import model_io

        pair = model_io.load_pair(path, allow_unverified=allow_unverified)
        return cls.from_pair(pair, path, allow_unverified=allow_unverified, **overrides)

    # ------------------------------------------------------------------ stages

    def classify(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Tumour probability of every slice -> float64 (N,), batch-wise, slices of equal size together."""
        images = _check_images(images)
        probabilities = np.zeros(len(images), np.float64)
        for (height, width), indices in _groups_by_shape(images, range(len(images))).items():
            step = max(1, min(self.batch_size, MAX_BATCH_PIXELS // (height * width)))
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                batch = np.stack([images[i] for i in chunk])
                out = _predict_fixed_batch(self.classifier_runner, batch, step).astype(np.float64)
                probabilities[chunk] = out.reshape(len(chunk), -1)[:, 0]
        return probabilities

    def _segmenter_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        def predict(batch: np.ndarray) -> np.ndarray:
            return _predict_fixed_batch(self.segmenter_runner, batch, self.batch_size)

        return predict

    def segment_probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Segmenter probability map (H, W) float32 of every slice (no gating).

        Slices of `tile_size` go straight through in batches; others through `predict_tiled`.
        """
        images = _check_images(images)
        maps: list[np.ndarray | None] = [None] * len(images)
        predict = self._segmenter_fn()
        tile = self.tile_size
        for shape, indices in _groups_by_shape(images, range(len(images))).items():
            if shape == (tile, tile):
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    out = predict(np.stack([images[i] for i in chunk]))
                    for i, prob in zip(chunk, out, strict=True):
                        maps[i] = prob[..., 0] if prob.ndim == 3 else prob
            else:
                for i in indices:
                    maps[i] = predict_tiled(
                        images[i],
                        predict,
                        tile_size=tile,
                        overlap=self.tile_overlap,
                        batch_size=self.batch_size,
                    )[..., 0]
        return [m for m in maps if m is not None]  # every index belongs to exactly one group

    def segment_only(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks uint8 (H, W) 0/1 from the segmenter on *every* slice, with the pipeline's post-processing.

        The segmenter-alone baseline of the evaluation: the same as `predict` minus the gate.
        """
        return [
            postprocess_mask(p, self.point.seg_threshold, self.point.min_component_px)
            for p in self.segment_probabilities(images)
        ]

    # ------------------------------------------------------------------ end to end

    def predict(self, images: Sequence[np.ndarray]) -> list[SliceResult]:
        """Run the two stages on a batch of slices (uint8 (H, W, 3), any sizes) -> one SliceResult each.

        Only slices with probability >= threshold reach the segmenter; the others get an empty mask.
        """
        images = _check_images(images)
        if not images:
            return []
        probabilities = self.classify(images)
        flagged = np.flatnonzero(gate(probabilities, self.point.threshold))
        masks = self._segment_flagged(images, flagged)
        return [
            measure(image, masks[i], probabilities[i], bool(gate(probabilities[i], self.point.threshold)))
            for i, image in enumerate(images)
        ]

    def _segment_flagged(self, images: list[np.ndarray], flagged: Sequence[int]) -> list[np.ndarray]:
        masks = [np.zeros(image.shape[:2], np.uint8) for image in images]
        flagged = [int(i) for i in flagged]
        if flagged:
            for i, mask in zip(flagged, self.segment_only([images[i] for i in flagged]), strict=True):
                masks[i] = mask
        return masks

    def predict_volume(self, images: Sequence[np.ndarray]) -> list[SliceResult]:
        """`predict` for the slices of ONE patient given in slice order, with the volume steps.

        The gate scores each slice with `neighbour_probabilities` (weight `neighbour_weight`),
        only slices it flags are segmented, and 3D components below `min_volume_px` voxels
        are dropped. `SliceResult.probability` stays the classifier's own output;
        `is_tumor` is the volume gate's decision. All slices must share one size.
        """
        images = _check_images(images)
        if not images:
            return []
        if len({image.shape[:2] for image in images}) != 1:
            raise ValueError("predict_volume needs slices of one size (one patient's study)")
        probabilities = self.classify(images)
        _, flagged = volume_gate(probabilities, self.point)
        masks = np.stack(self._segment_flagged(images, np.flatnonzero(flagged)))
        masks = clean_volume(masks, flagged, self.point)
        return [
            measure(image, masks[i], probabilities[i], bool(flagged[i])) for i, image in enumerate(images)
        ]

    def predict_one(self, image: np.ndarray) -> SliceResult:
        """`predict` for a single slice uint8 (H, W, 3)."""
        return self.predict([image])[0]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"TumorPipeline({fields}, batch_size={self.batch_size}, backend={self.backend_name!r})"
