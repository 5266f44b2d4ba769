"""Hard negatives for the segmenter: training slices without tumour that the pipeline would segment.

Two signals, both computed once per run on the training patients only and cached in the
stage folder (``hard_negatives.npz``) so a resumed run reuses them:

* the classifier's probability on each empty slice: a slice it flags reaches the segmenter,
  so it is drawn more often as an ``empty`` crop (weight ``1 + weight * p``);
* a reference segmenter's false positives (e.g. the committed release, which outlines normal
  cortex): slices where it fires weigh ``weight`` more, and their empty crops are placed on
  the pixels where it fired.

The cache holds a fingerprint of the two scoring models' weights (`scorer_fingerprint`): a
resumed run whose classifier or reference changed scores again instead of reusing the old
weights (`models/` is the reference by default, and it changes with every release).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import keras
import numpy as np

from pipeline.data.crop_sampler import SamplerPools
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.io_utils import atomic_save

log = logging.getLogger(__name__)

CACHE_FILE = "hard_negatives.npz"


def scorer_fingerprint(classifier: keras.Model | None, reference_segmenter: keras.Model | None) -> str:
    """sha256 hex over the weights of the models that score the empty slices (either may be None)."""
    digest = hashlib.sha256()
    for role, model in (("classifier", classifier), ("reference", reference_segmenter)):
        digest.update(role.encode() + (b"" if model is None else b":model"))
        for weight in (model.weights if model is not None else ()):
            array = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(str(array.shape).encode() + array.dtype.str.encode() + array.tobytes())
    return digest.hexdigest()


def _cached_scores(cache: Path, empty: np.ndarray, fingerprint: str, width: int):
    """(probs, hot) from `cache` when it holds the positions `empty` scored by `fingerprint`, else None."""
    with np.load(cache) as saved:
        if not np.array_equal(saved["positions"], empty):
            return None
        if "scorers" not in saved.files or str(saved["scorers"]) != fingerprint:
            log.info("hard negatives: %s was scored by other models (classifier or reference); scoring again",
                     cache)
            return None
        hot = np.unpackbits(saved["hot"], axis=-1, count=width).astype(bool) if saved["has_hot"] else None
        return saved["probs"], hot


def score_empty_slices(
    images: np.ndarray,
    classifier: keras.Model | None,
    reference_segmenter: keras.Model | None,
    seg_threshold: float = 0.5,
    batch_size: int = 16,
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Classifier probabilities (N,) (zeros without a classifier) and, with a reference
    segmenter, its fired pixels bool (N, H, W) on raw uint8 slices (N, H, W, 3)."""
    n = len(images)
    probs = np.zeros(n, np.float64)
    hot = np.zeros((n, *images.shape[1:3]), bool) if reference_segmenter is not None else None
    pipe = TumorPipeline(classifier, reference_segmenter, tile_size=int(images.shape[1]),
                         batch_size=batch_size)
    for start in range(0, n, chunk):
        batch = [np.asarray(im) for im in images[start : start + chunk]]
        if classifier is not None:
            probs[start : start + len(batch)] = pipe.classify(batch)
        if hot is not None:
            for k, prob in enumerate(pipe.segment_probabilities(batch)):
                hot[start + k] = prob > seg_threshold
    return probs, hot


def sampler_pools(
    arrays,
    train_pos: np.ndarray,
    has_tumor: np.ndarray,
    *,
    classifier: keras.Model | None,
    reference_segmenter: keras.Model | None,
    weight: float,
    cache_dir: Path | None = None,
) -> SamplerPools:
    """`SamplerPools` of the training slices with hard-negative weights and hot regions.

    `has_tumor` (len(arrays),) bool per row; `train_pos` rows of the training slices. The
    scores are read from ``cache_dir/hard_negatives.npz`` when it holds the same positions.
    """
    train_pos = np.asarray(train_pos, np.int64)
    empty = train_pos[~has_tumor[train_pos]]
    cache = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    fingerprint = scorer_fingerprint(classifier, reference_segmenter)
    scores = _cached_scores(cache, empty, fingerprint, arrays.image_size[1]) if (
        cache is not None and cache.is_file()) else None
    if scores is not None:
        probs, hot = scores
    else:
        probs, hot = score_empty_slices(np.asarray(arrays.images[empty]), classifier, reference_segmenter)
        if cache is not None:
            packed = np.packbits(hot, axis=-1) if hot is not None else np.zeros(0, np.uint8)

            def write(path: Path) -> None:
                with open(path, "wb") as fh:  # a file object: savez would append ".npz" to a name
                    np.savez_compressed(fh, positions=empty, probs=probs, hot=packed, has_hot=hot is not None,
                                        scorers=np.asarray(fingerprint))

            atomic_save(cache, write)
    fires = hot.reshape(len(empty), -1).any(axis=1) if hot is not None else np.zeros(len(empty), bool)
    weights = 1.0 + weight * probs + weight * fires
    log.info(
        "hard negatives: %d empty training slices, %d with classifier probability >= 0.5, %d where the "
        "reference segmenter fires (%d px)", len(empty), int((probs >= 0.5).sum()), int(fires.sum()),
        int(hot.sum()) if hot is not None else 0,
    )
    return SamplerPools(
        tumor=train_pos[has_tumor[train_pos]], every=train_pos, empty=empty,
        empty_weights=weights, hot=hot,
    )
