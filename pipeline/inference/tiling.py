"""Overlap-tile inference (Ronneberger et al., U-Net, 2015) for images of any size.

A fully convolutional segmenter is trained on fixed-size slices (256x256 here). To segment
an image of another size without resizing it (resizing would blur a tumour's outline):

1. extend the image by mirroring (`pad_mode="reflect"`): an image smaller than the tile is
   centred in a tile whose missing context is the mirrored image; a larger image gets a
   mirrored margin of half the overlap on each side, so that its border pixels are not at a
   tile's edge;
2. cut the extended image into `tile_size` tiles overlapping by `overlap` (a fraction of the
   tile); the tile positions are spread evenly so the last tile ends exactly at the border;
3. predict the tiles in batches and blend them back with per-pixel weights: `"gaussian"`
   favours tile centres (where the network saw the most context, as nnU-Net does),
   `"constant"` averages; the weights are floored so they never reach zero;
4. crop back to the input size.

Sums are accumulated in float64, so a trivial predictor (identity, `x + 1`) comes back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["BLEND_MODES", "PAD_MODES", "predict_tiled", "tile_starts", "blend_weights"]

PredictFn = Callable[[np.ndarray], np.ndarray]
"""Maps a float32 batch (B, t, t, C) to predictions (B, t, t, K) (or (B, t, t) for K = 1)."""

BLEND_MODES = ("gaussian", "constant")
PAD_MODES = ("reflect", "symmetric", "edge", "constant")  # numpy.pad modes; reflect = U-Net mirroring
GAUSSIAN_SIGMA_FRACTION = 1 / 8  # sigma of the blend window as a fraction of the tile (nnU-Net's value)
MIN_WEIGHT = 1e-3  # floor of the blend weights relative to their peak: never zero, never dividing by 0


def _look_up(value: str, options: Sequence[str], name: str) -> str:
    """Return `value` if it is one of `options`, else raise ValueError naming the valid ones."""
    key = str(value).strip().lower()
    if key not in options:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(options)}")
    return key


def tile_starts(length: int, tile_size: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering `length` pixels (length >= tile_size), last one flush with the end.

    The stride is at most `tile_size * (1 - overlap)`; the tiles are spread evenly, so the
    actual overlap may be a little larger than asked, never smaller.
    """
    if length < tile_size:
        raise ValueError(f"length {length} is smaller than the tile ({tile_size}); pad first")
    if length == tile_size:
        return [0]
    stride = max(1, int(tile_size * (1 - overlap)))
    n_tiles = math.ceil((length - tile_size) / stride) + 1
    return [int(round(i * (length - tile_size) / (n_tiles - 1))) for i in range(n_tiles)]


def blend_weights(tile_size: int, blend: str = "gaussian") -> np.ndarray:
    """Per-pixel weights (tile_size, tile_size) float64 of one tile, peak 1, never below MIN_WEIGHT."""
    blend = _look_up(blend, BLEND_MODES, "blend mode")
    if blend == "constant":
        return np.ones((tile_size, tile_size), np.float64)
    sigma = max(tile_size * GAUSSIAN_SIGMA_FRACTION, 1e-6)
    axis = np.arange(tile_size, dtype=np.float64) - (tile_size - 1) / 2
    g = np.exp(-(axis**2) / (2 * sigma**2))
    weights = np.outer(g, g)
    weights /= weights.max()
    return np.maximum(weights, MIN_WEIGHT)


def _padding(length: int, tile_size: int, margin: int) -> tuple[int, int]:
    """(before, after) padding of one axis: centre a short axis in a tile, else add `margin` each side."""
    if length <= tile_size:
        total = tile_size - length
        return total // 2, total - total // 2
    return margin, margin


def predict_tiled(
    image: np.ndarray,
    predict_fn: PredictFn,
    tile_size: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    blend: str = "gaussian",
    pad_mode: str = "reflect",
) -> np.ndarray:
    """Predict an image of any size with a fixed-size predictor, by overlapping tiles.

    image: (H, W, C) array (cast to float32; a 2-D image is taken as one channel).
    predict_fn: batch (B, tile_size, tile_size, C) float32 -> (B, tile_size, tile_size, K)
        (a Keras model's `predict_on_batch` fits).
    tile_size: side of the square tiles the predictor expects.
    overlap: fraction of a tile shared with its neighbour, in [0, 1).
    batch_size: tiles per `predict_fn` call.
    blend: "gaussian" (tile centres weigh more) or "constant" (plain average).
    pad_mode: how the missing context is extrapolated: "reflect" (mirroring, as in U-Net),
        "symmetric", "edge" or "constant" (zeros).

    Returns (H, W, K) float32: the blended predictions, cropped to the input size.
    Raises ValueError for an overlap outside [0, 1), a bad tile or batch size, an unknown
    mode, or a predictor returning the wrong shape.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if int(tile_size) != tile_size or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tile_size = int(tile_size)
    pad_mode = _look_up(pad_mode, PAD_MODES, "pad mode")
    weights = blend_weights(tile_size, blend)

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be (H, W, C) with H, W > 0, got shape {image.shape}")
    height, width = image.shape[:2]

    margin = int(tile_size * overlap / 2)
    (top, bottom), (left, right) = _padding(height, tile_size, margin), _padding(width, tile_size, margin)
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode=pad_mode)
    ys = tile_starts(padded.shape[0], tile_size, overlap)
    xs = tile_starts(padded.shape[1], tile_size, overlap)
    positions = [(y, x) for y in ys for x in xs]

    accumulated: np.ndarray | None = None
    norm = np.zeros(padded.shape[:2], np.float64)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        tiles = np.stack([padded[y : y + tile_size, x : x + tile_size] for y, x in chunk])
        predictions = np.asarray(predict_fn(tiles))
        if predictions.ndim == 3:
            predictions = predictions[..., None]
        if predictions.ndim != 4 or predictions.shape[:3] != (len(chunk), tile_size, tile_size):
            raise ValueError(
                f"predict_fn returned shape {predictions.shape} for a batch of shape {tiles.shape}; "
                f"expected ({len(chunk)}, {tile_size}, {tile_size}, K)"
            )
        if accumulated is None:
            accumulated = np.zeros((*padded.shape[:2], predictions.shape[-1]), np.float64)
        for (y, x), prediction in zip(chunk, predictions, strict=True):
            accumulated[y : y + tile_size, x : x + tile_size] += prediction * weights[..., None]
            norm[y : y + tile_size, x : x + tile_size] += weights
    assert accumulated is not None  # at least one tile always exists
    blended = (
        accumulated[top : top + height, left : left + width]
        / norm[top : top + height, left : left + width, None]
    )
    return blended.astype(np.float32)
