"""tf.data input pipelines over the decoded array cache: select, shuffle, augment, batch, prefetch.

Images leave the pipeline as raw float32 0..255 in file channel order; normalisation happens
inside each model (`pipeline.preprocessing`), so training, evaluation and inference feed
exactly the same values.

Reproducibility: the shuffle order of epoch e is a stateless function of (seed, e) and the
augmentation of a slice is drawn from a numpy Generator seeded with (seed, e, position), so
it does not depend on parallelism, batching or which other slices are in the epoch. With
`repeat=True` e counts epochs 0, 1, 2, ...; with `repeat=False` every new iteration over the
dataset (one Keras epoch) draws its e from a stream seeded by `seed`, so the k-th pass is the
same in every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from .array_cache import SliceArrays
from .augment import AugmentParams, augment_pair, random_crop

__all__ = ["TASKS", "make_dataset", "class_weights", "element_rng"]

TASKS = ("classify", "segment")
_EPOCH_MASK = (1 << 62) - 1  # keeps the epoch key a non-negative int64 for SeedSequence


def element_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The numpy Generator used to augment slice `position` in epoch `epoch` of a dataset seeded `seed`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & _EPOCH_MASK, int(epoch), int(position)]))


def _epoch_keys(seed: int, repeat: bool) -> tf.data.Dataset:
    """Scalar int64 epoch keys: 0, 1, 2, ... forever, or one key per iteration for a finite dataset."""
    if repeat:
        return tf.data.Dataset.counter(0, dtype=tf.int64)
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    return keys.map(lambda k: tf.bitwise.bitwise_and(k, tf.constant(_EPOCH_MASK, tf.int64)))


def _checked_positions(arrays: SliceArrays, positions: Sequence[int] | np.ndarray, task: str,
                       batch_size: int) -> np.ndarray:
    """`positions` as int64 (N,) after checking them, `task` and `batch_size` (ValueError)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if positions.size == 0:
        raise ValueError("positions is empty: no slices to feed")
    if positions.min() < 0 or positions.max() >= len(arrays):
        raise ValueError(
            f"positions must lie in [0, {len(arrays)}), got {positions.min()}..{positions.max()}"
        )
    return positions


def make_dataset(
    arrays: SliceArrays,
    positions: Sequence[int] | np.ndarray,
    *,
    task: str,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    repeat: bool = False,
    weight_map: Callable[[np.ndarray], np.ndarray] | None = None,
    augment_params: AugmentParams | None = None,
    crop_size: int | None = None,
) -> tf.data.Dataset:
    """Build a tf.data pipeline over the slices `arrays[positions]`.

    Yields `(images, target)` or, with `weight_map`, `(images, target, weights)`:
      images  float32 (B, H, W, 3), raw 0..255 (not normalised);
      target  float32 (B, 1) tumour label (mask has any tumour pixel) for task="classify",
              float32 (B, H, W, 1) 0/1 mask for task="segment";
      weights float32 (B, H, W) = weight_map(mask uint8 (H, W)) computed after augmentation.
    `positions` index rows of `arrays` (e.g. `positions_for_split(index_df, splits, "train")`).
    `shuffle` reshuffles each epoch; `augment` applies `augment_pair` with `augment_params`
    (default AugmentParams()); `crop_size` takes a random (mostly tumour-centred, see
    `random_crop`) square crop after augmentation, so H = W = crop_size; `repeat` makes
    the dataset infinite (use `steps_per_epoch`).
    The last batch may be smaller. Deterministic for a given `seed` (see module docstring).
    """
    positions = _checked_positions(arrays, positions, task, batch_size)
    params = augment_params or AugmentParams()
    height, width = (crop_size, crop_size) if crop_size else arrays.image_size
    images_np, masks_np = arrays.images, arrays.masks
    seed = int(seed)

    def load(position: np.int64, epoch: np.int64):
        """numpy side: read (and augment) one slice, then derive target and weights."""
        image, mask = images_np[position], masks_np[position]
        if augment:
            image, mask = augment_pair(image, mask, element_rng(seed, epoch, position), params)
        if crop_size:
            # its own stream, so cropping does not change which augmentation a slice gets
            crop_rng = element_rng(seed + 1, epoch, position)
            image, mask = random_crop(image, mask, crop_size, crop_rng)
        outputs = [np.asarray(image, np.uint8), np.asarray(mask, np.uint8)]
        if weight_map is not None:
            outputs.append(np.asarray(weight_map(outputs[1]), np.float32))
        return tuple(outputs)

    out_types = [tf.uint8, tf.uint8] + ([tf.float32] if weight_map is not None else [])

    def to_element(position, epoch):
        loaded = tf.numpy_function(load, [position, epoch], out_types, stateful=False)
        image = tf.ensure_shape(tf.cast(loaded[0], tf.float32), (height, width, 3))
        mask = tf.ensure_shape(loaded[1], (height, width))
        if task == "classify":
            target = tf.reshape(tf.cast(tf.reduce_any(mask > 0), tf.float32), (1,))
        else:
            target = tf.cast(mask, tf.float32)[..., tf.newaxis]
        if weight_map is None:
            return image, target
        return image, target, tf.ensure_shape(loaded[2], (height, width))

    all_positions = tf.constant(positions)

    def one_epoch(epoch):
        order = all_positions
        if shuffle:
            stateless_seed = tf.stack([tf.constant(seed & _EPOCH_MASK, tf.int64), epoch])
            order = tf.random.experimental.stateless_shuffle(order, seed=stateless_seed)
        return tf.data.Dataset.from_tensor_slices(order).map(lambda p: (p, epoch))

    ds = _epoch_keys(seed, repeat).flat_map(one_epoch)
    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: Sequence[int] | np.ndarray) -> dict[int, float]:
    """Binary labels -> {0: w0, 1: w1} "balanced" weights (sklearn), for Keras `class_weight`.

    A class absent from `labels` gets weight 1.0 (nothing to re-weight).
    """
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(labels).astype(int).reshape(-1)
    present = np.unique(y)
    if not set(present) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got values {present.tolist()}")
    weights = {0: 1.0, 1: 1.0}
    if len(present):
        computed = compute_class_weight("balanced", classes=present, y=y)
        weights.update({int(c): float(w) for c, w in zip(present, computed, strict=True)})
    return weights
