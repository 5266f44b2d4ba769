"""Overlap-tile inference: trivial predictors must come back exactly, whatever the size and overlap."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.tiling import blend_weights, predict_tiled, tile_starts

TILE = 16
SIZES = [
    (5, 7),  # smaller than the tile in both sides
    (1, 1),  # a single pixel: mirrored into a whole tile
    (TILE, TILE),  # exactly one tile
    (TILE, 40),  # equal in one side, larger in the other
    (40, 40),  # larger
    (33, 17),  # odd sides, just over the tile
    (61, 9),  # odd, one side smaller than the tile
]
OVERLAPS = [0.0, 0.25, 0.5, 0.9]


def _image(shape: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, channels)).astype(np.float32)


def identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


def plus_one(batch: np.ndarray) -> np.ndarray:
    return batch + 1.0


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_trivial_predictors_come_back_exactly(shape, overlap, blend):
    image = _image(shape)
    out = predict_tiled(image, identity, tile_size=TILE, overlap=overlap, batch_size=3, blend=blend)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)
    out = predict_tiled(image, plus_one, tile_size=TILE, overlap=overlap, batch_size=3, blend=blend)
    np.testing.assert_array_equal(out, image + 1)


@pytest.mark.parametrize("pad_mode", ["reflect", "symmetric", "edge", "constant"])
def test_every_pad_mode_crops_back_to_the_input(pad_mode):
    image = _image((23, 11), channels=1, seed=1)
    out = predict_tiled(image, plus_one, tile_size=TILE, overlap=0.25, pad_mode=pad_mode)
    np.testing.assert_array_equal(out, image + 1)


def test_output_channels_may_differ_from_input_channels():
    image = _image((37, 21), channels=3)

    def two_maps(batch):  # K = 2 outputs from C = 3 inputs
        return np.stack([batch[..., 0] * 2, batch[..., 2] - 5], axis=-1)

    out = predict_tiled(image, two_maps, tile_size=TILE, overlap=0.5)
    assert out.shape == (37, 21, 2)
    np.testing.assert_array_equal(out[..., 0], image[..., 0] * 2)
    np.testing.assert_array_equal(out[..., 1], image[..., 2] - 5)


def test_a_predictor_returning_one_channel_without_axis_is_accepted():
    image = _image((20, 20), channels=1)
    out = predict_tiled(image, lambda b: b[..., 0] + 1, tile_size=TILE)
    np.testing.assert_array_equal(out, image + 1)


def test_small_images_get_mirrored_context():
    """A small image sits in the middle of its tile; the rest of the tile is its mirror image (U-Net)."""
    image = np.arange(9, dtype=np.float32).reshape(3, 3, 1)
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return batch

    predict_tiled(image, record, tile_size=7, overlap=0.0)
    assert len(seen) == 1 and seen[0].shape == (1, 7, 7, 1)
    np.testing.assert_array_equal(seen[0][0], np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect"))


def test_tiles_are_batched_and_have_the_tile_size():
    shapes = []

    def record(batch):
        shapes.append(batch.shape)
        return batch

    predict_tiled(_image((50, 50)), record, tile_size=TILE, overlap=0.25, batch_size=4)
    assert all(s[1:3] == (TILE, TILE) and 1 <= s[0] <= 4 for s in shapes)
    assert sum(s[0] for s in shapes) > 4  # several batches were needed


def test_overlapping_tiles_are_blended_not_overwritten():
    """Each tile predicts a constant (its call number); the blend of constants lies between them."""
    counter = iter(range(1000))

    def constant_per_tile(batch):
        return np.stack([np.full(batch.shape[1:3] + (1,), float(next(counter)), np.float32) for _ in batch])

    out = predict_tiled(_image((40, 40)), constant_per_tile, tile_size=TILE, overlap=0.5, batch_size=1)
    values = np.unique(out)
    assert len(values) > 4  # overlaps hold weighted mixtures, not just the tile values
    assert out.min() >= 0 and out.max() <= next(counter) - 1


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_zero_one_is_refused(overlap):
    with pytest.raises(ValueError, match="overlap"):
        predict_tiled(_image((20, 20)), identity, tile_size=TILE, overlap=overlap)


def test_unknown_modes_name_the_valid_ones():
    with pytest.raises(ValueError, match="gaussian, constant"):
        predict_tiled(_image((20, 20)), identity, tile_size=TILE, blend="linear")
    with pytest.raises(ValueError, match="reflect"):
        predict_tiled(_image((20, 20)), identity, tile_size=TILE, pad_mode="wrap-around")


def test_a_predictor_of_the_wrong_shape_is_reported():
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        predict_tiled(_image((20, 20)), lambda b: b[:, ::2, ::2], tile_size=TILE)


def test_blend_weights_never_reach_zero():
    weights = blend_weights(64, "gaussian")
    assert weights.min() > 0 and weights.max() == 1.0
    assert weights[32, 32] > weights[0, 0]  # centre counts more than the corner
    np.testing.assert_array_equal(blend_weights(8, "constant"), np.ones((8, 8)))


@pytest.mark.parametrize("length,overlap", [(16, 0.25), (17, 0.25), (100, 0.0), (100, 0.5), (257, 0.9)])
def test_tile_starts_cover_the_extent_with_at_least_the_overlap(length, overlap):
    starts = tile_starts(length, TILE, overlap)
    assert starts[0] == 0 and starts[-1] == length - TILE
    strides = np.diff(starts)
    assert (strides >= 1).all() and (strides <= TILE * (1 - overlap)).all()
