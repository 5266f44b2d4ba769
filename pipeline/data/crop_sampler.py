"""Segmenter training crops drawn from what the pipeline shows the segmenter, in a configured mix.

Each training element is one of three kinds, drawn with the probabilities of a `CropMix`:

* ``tumor``:  a tumour slice, the crop placed around a random tumour pixel (jittered by up to
  a quarter of the crop, so the tumour is not always in the centre);
* ``random``: any training slice, the crop placed around a random brain pixel (whatever is
  there: tumour, normal tissue, edge of the head);
* ``empty``:  a slice without tumour, preferring hard negatives: slices are drawn with the
  weights of `SamplerPools.empty_weights` (higher where the classifier scores them high) and,
  where a reference segmenter fired on the slice (`SamplerPools.hot`), the crop is placed on
  one of those false-positive pixels. The target is all zero.

Augmentation (`augment_pair`) is applied to the whole slice before cropping; the region a
crop is placed on (tumour, or the hot region for empty crops) goes through the same warp,
so the placement follows the anatomy. Without `crop_size` the whole (augmented) slice is
used and only the kind decides which slice.

Element k of the stream draws everything from a Generator seeded with (seed, k): the
stream is identical in every run and independent of parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.preprocessing import FLAIR_CHANNEL

from .array_cache import SliceArrays
from .augment import AugmentParams, augment_pair

__all__ = ["CROP_KINDS", "CropMix", "SamplerPools", "draw_element", "make_crop_dataset"]

CROP_KINDS = ("tumor", "random", "empty")
BRAIN_LEVEL = 10  # FLAIR grey level above which a pixel is head, not background


@dataclass(frozen=True)
class CropMix:
    """Probabilities of the three crop kinds (non-negative; normalised to sum to 1)."""

    tumor: float = 0.5
    random: float = 0.25
    empty: float = 0.25

    def __post_init__(self) -> None:
        values = self.as_array()
        if not np.all(np.isfinite(values)) or (values < 0).any() or values.sum() <= 0:
            raise ValueError(f"crop_mix needs non-negative weights with a positive sum, got {self}")

    def as_array(self) -> np.ndarray:
        return np.array([self.tumor, self.random, self.empty], dtype=np.float64)


@dataclass
class SamplerPools:
    """Row positions (into `SliceArrays`) the sampler draws from.

    tumor: slices with tumour; every: all training slices; empty: slices without tumour;
    empty_weights: (len(empty),) sampling weights of the empty slices (None: uniform);
    hot: optional bool (len(empty), H, W): where a reference segmenter fired on each empty slice.
    """

    tumor: np.ndarray
    every: np.ndarray
    empty: np.ndarray
    empty_weights: np.ndarray | None = None
    hot: np.ndarray | None = None

    def probabilities(self, mix: CropMix) -> np.ndarray:
        """The mix with kinds whose pool is empty removed, renormalised (ValueError if none is left)."""
        p = mix.as_array() * [len(self.tumor) > 0, len(self.every) > 0, len(self.empty) > 0]
        if p.sum() <= 0:
            raise ValueError(f"no slices for any crop kind of {mix} (pools: {len(self.tumor)} tumour, "
                             f"{len(self.every)} total, {len(self.empty)} empty)")
        return p / p.sum()


def draw_element(
    rng: np.random.Generator, pools: SamplerPools, probabilities: np.ndarray
) -> tuple[str, int, int]:
    """Draw (kind, position, index in its pool) for one element."""
    kind = CROP_KINDS[int(rng.choice(3, p=probabilities))]
    if kind == "tumor":
        i = int(rng.integers(len(pools.tumor)))
        return kind, int(pools.tumor[i]), i
    if kind == "random":
        i = int(rng.integers(len(pools.every)))
        return kind, int(pools.every[i]), i
    weights = pools.empty_weights
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    i = int(rng.choice(len(pools.empty), p=p))
    return kind, int(pools.empty[i]), i


def _pick_centre(region: np.ndarray, image: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random pixel of `region`, else of the head (FLAIR above background), else anywhere."""
    for candidate in (region, image[..., FLAIR_CHANNEL] > BRAIN_LEVEL):
        ys, xs = np.nonzero(candidate)
        if ys.size:
            k = int(rng.integers(ys.size))
            return int(ys[k]), int(xs[k])
    return int(rng.integers(region.shape[0])), int(rng.integers(region.shape[1]))


def crop_around(
    image: np.ndarray, mask: np.ndarray, centre: tuple[int, int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A `size` crop of image (H, W, C) and mask (H, W) around `centre`, jittered by up to size/4, clamped."""
    height, width = mask.shape
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the slice size {height}x{width}")
    jitter = rng.integers(-(size // 4), size // 4 + 1, size=2)
    y0 = int(np.clip(centre[0] + jitter[0] - size // 2, 0, height - size))
    x0 = int(np.clip(centre[1] + jitter[1] - size // 2, 0, width - size))
    return image[y0 : y0 + size, x0 : x0 + size], mask[y0 : y0 + size, x0 : x0 + size]


def make_crop_dataset(
    arrays: SliceArrays,
    pools: SamplerPools,
    mix: CropMix,
    *,
    batch_size: int,
    crop_size: int | None,
    seed: int = 0,
    augment: bool = True,
    augment_params: AugmentParams | None = None,
    weight_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tf.data.Dataset:
    """Infinite tf.data stream of segmenter training batches drawn by the mix (see module doc).

    Yields `(images, masks)` or, with `weight_map`, `(images, masks, weights)`: images float32
    (B, h, w, 3) raw 0..255, masks float32 (B, h, w, 1) 0/1, weights float32 (B, h, w), with
    h = w = `crop_size` (or the slice size when None). Use `steps_per_epoch` with `fit`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    probabilities = pools.probabilities(mix)
    params = augment_params or AugmentParams()
    height, width = (crop_size, crop_size) if crop_size else arrays.image_size
    images_np, masks_np = arrays.images, arrays.masks
    seed = int(seed) & ((1 << 62) - 1)

    def load(k: np.int64):
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(k)]))
        kind, position, i = draw_element(rng, pools, probabilities)
        image, mask = images_np[position], masks_np[position]
        if kind == "empty":
            region = pools.hot[i] if pools.hot is not None else np.zeros(mask.shape, bool)
            marker = np.asarray(region, np.uint8)
        else:
            marker = np.asarray(mask, np.uint8)
        if augment:
            image, marker = augment_pair(image, marker, rng, params)
        target = np.zeros(marker.shape, np.uint8) if kind == "empty" else marker
        if crop_size:
            region = marker > 0 if kind != "random" else np.zeros(marker.shape, bool)
            image, target = crop_around(image, target, _pick_centre(region, image, rng), crop_size, rng)
        outputs = [np.ascontiguousarray(image, np.uint8), np.ascontiguousarray(target, np.uint8)]
        if weight_map is not None:
            outputs.append(np.asarray(weight_map(outputs[1]), np.float32))
        return tuple(outputs)

    out_types = [tf.uint8, tf.uint8] + ([tf.float32] if weight_map is not None else [])

    def to_element(k):
        loaded = tf.numpy_function(load, [k], out_types, stateful=False)
        image = tf.ensure_shape(tf.cast(loaded[0], tf.float32), (height, width, 3))
        target = tf.cast(tf.ensure_shape(loaded[1], (height, width)), tf.float32)[..., tf.newaxis]
        if weight_map is None:
            return image, target
        return image, target, tf.ensure_shape(loaded[2], (height, width))

    ds = tf.data.Dataset.counter(0, dtype=tf.int64)
    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
