"""Decode-once array cache, augmentation (alignment, reproducibility) and the tf.data pipelines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.data import array_cache as cache_module
from pipeline.data.array_cache import SliceArrays, load_arrays
from pipeline.data.augment import AugmentParams, augment_pair
from pipeline.data.index import index_dataset
from pipeline.data.tiff_io import read_image, read_mask
from pipeline.errors import DataError
from tests.data_helpers import write_tiff
from tests.synthetic import make_slice, write_dataset

GEOMETRY_ON = AugmentParams.geometry_only(p_hflip=1.0, p_vflip=1.0, p_affine=1.0, p_elastic=1.0)


@pytest.fixture(scope="module")
def data(synthetic_root, tmp_path_factory):
    """(index frame, SliceArrays) of the synthetic set, cached in a private folder."""
    cache = tmp_path_factory.mktemp("cache")
    df = index_dataset(synthetic_root, cache_dir=cache)
    return df, load_arrays(df, cache_dir=cache)


def flair_equals_mask(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A slice whose FLAIR channel is exactly mask * 255, so the image shows where the mask is."""
    image, mask = make_slice(np.random.default_rng(seed), size, tumor=True)
    mask = (mask > 127).astype(np.uint8)
    image = image.copy()
    image[..., 1] = mask * 255
    return image, mask


# --- augmentation ------------------------------------------------------------------------------


@pytest.mark.parametrize("border", ["constant", "reflect"])
@pytest.mark.parametrize(
    "params",
    [
        GEOMETRY_ON,
        AugmentParams.geometry_only(p_affine=1.0, p_elastic=0.0, max_rotation=30.0),
        AugmentParams.geometry_only(p_affine=0.0, p_elastic=1.0, elastic_alpha=800.0),
    ],
    ids=["all_geometry", "affine", "elastic"],
)
def test_augmentation_keeps_image_and_mask_aligned(params, border):
    params = dataclasses.replace(params, border=border)
    changed = 0
    for seed in range(10):
        image, mask = flair_equals_mask(seed=seed)
        out_image, out_mask = augment_pair(image, mask, np.random.default_rng(seed), params)
        flair = out_image[..., 1].astype(int)
        changed += not np.array_equal(out_mask, mask)
        # Where bilinear interpolation saw only tumour (255) or only background (0), nearest
        # neighbour must agree exactly; disagreement is allowed only on interpolated edges.
        assert (out_mask[flair == 255] == 1).all()
        assert (out_mask[flair == 0] == 0).all()
        disagree = (out_mask == 1) != (flair > 127)
        assert disagree.mean() < 0.01
        assert out_mask.sum() > 0.5 * mask.sum()  # the tumour was moved, not lost
    assert changed >= 8  # the transforms actually did something


def test_flips_move_image_and_mask_together():
    image, mask = flair_equals_mask()
    params = AugmentParams.none()
    params = dataclasses.replace(params, p_hflip=1.0)
    out_image, out_mask = augment_pair(image, mask, np.random.default_rng(0), params)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_intensity_changes_the_image_only():
    image, mask = make_slice(np.random.default_rng(1), 64, tumor=True)
    mask = (mask > 127).astype(np.uint8)
    params = dataclasses.replace(
        AugmentParams.none(), p_brightness=1.0, p_contrast=1.0, p_gamma=1.0, gamma_range=(1.3, 1.5)
    )
    out_image, out_mask = augment_pair(image, mask, np.random.default_rng(2), params)
    np.testing.assert_array_equal(out_mask, mask)
    assert not np.array_equal(out_image, image)
    assert out_image.dtype == np.uint8 and out_image.shape == image.shape


def test_augmentation_is_reproducible_and_leaves_inputs_alone():
    image, mask = make_slice(np.random.default_rng(3), 64, tumor=True)
    mask = (mask > 127).astype(np.uint8)
    image.flags.writeable = False  # like a read-only memmap
    mask.flags.writeable = False
    params = dataclasses.replace(GEOMETRY_ON, p_brightness=1.0, p_gamma=1.0)
    a = augment_pair(image, mask, np.random.default_rng(11), params)
    b = augment_pair(image, mask, np.random.default_rng(11), params)
    c = augment_pair(image, mask, np.random.default_rng(12), params)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.uint8 and a[1].dtype == np.uint8 and set(np.unique(a[1])) <= {0, 1}


def test_no_augmentation_returns_equal_copies():
    image, mask = flair_equals_mask()
    out_image, out_mask = augment_pair(image, mask, np.random.default_rng(0), AugmentParams.none())
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image is not image and out_mask is not mask


def test_augment_params_are_validated():
    with pytest.raises(ValueError, match="p_elastic"):
        AugmentParams(p_elastic=1.5)
    with pytest.raises(ValueError, match="border"):
        AugmentParams(border="wrap")


# --- array cache -------------------------------------------------------------------------------


def test_arrays_match_the_tiffs_row_by_row(data):
    df, arrays = data
    assert isinstance(arrays, SliceArrays) and len(arrays) == len(df)
    assert arrays.images.shape == (len(df), 64, 64, 3) and arrays.images.dtype == np.uint8
    assert arrays.masks.shape == (len(df), 64, 64) and arrays.masks.dtype == np.uint8
    assert isinstance(arrays.images, np.memmap)
    for i in (0, 9, len(df) - 1):
        np.testing.assert_array_equal(arrays.images[i], read_image(df["image_path"].iloc[i]))
        np.testing.assert_array_equal(arrays.masks[i], read_mask(df["mask_path"].iloc[i]))
    np.testing.assert_array_equal(arrays.masks.reshape(len(df), -1).sum(1), df["tumor_pixels"])


def test_second_load_does_not_decode(data, tmp_path, monkeypatch):
    df, _ = data
    load_arrays(df, cache_dir=tmp_path)
    monkeypatch.setattr(cache_module, "read_pair", lambda *a: pytest.fail("decoded again"))
    assert len(load_arrays(df, cache_dir=tmp_path)) == len(df)


def test_interrupted_build_is_rebuilt(data, tmp_path, monkeypatch):
    df, _ = data
    calls = []
    real_read_pair = cache_module.read_pair

    def failing_read_pair(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        return real_read_pair(*args)

    monkeypatch.setattr(cache_module, "read_pair", failing_read_pair)
    with pytest.raises(KeyboardInterrupt):
        load_arrays(df, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # no half-written cache left to be trusted
    monkeypatch.setattr(cache_module, "read_pair", real_read_pair)
    arrays = load_arrays(df, cache_dir=tmp_path)
    np.testing.assert_array_equal(arrays.images[4], read_image(df["image_path"].iloc[4]))


def test_damaged_cache_is_rebuilt(data, tmp_path):
    df, _ = data
    load_arrays(df, cache_dir=tmp_path)
    (folder,) = tmp_path.glob("arrays-*")
    (folder / "masks.npy").write_bytes(b"garbage")
    arrays = load_arrays(df, cache_dir=tmp_path)
    np.testing.assert_array_equal(arrays.masks[0], read_mask(df["mask_path"].iloc[0]))


def test_slices_of_different_sizes_are_named(tmp_path):
    root = write_dataset(tmp_path / "k", cases=(("TCGA_AA_0001_19990101", 3, (1, 2)),))
    write_dataset(root, size=32, cases=(("TCGA_AA_0002_19990202", 2, (1, 1)),))
    df = index_dataset(root, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="share one size") as err:
        load_arrays(df, cache_dir=tmp_path / "cache")
    assert len(err.value.files) == 2 and all("TCGA_AA_0002" in f and "32x32" in f for f in err.value.files)


def test_file_changed_after_indexing_is_reported(tmp_path):
    root = write_dataset(tmp_path / "k", cases=(("TCGA_AA_0001_19990101", 2, (1, 1)),))
    df = index_dataset(root, cache_dir=tmp_path / "cache")
    write_tiff(root / "TCGA_AA_0001_19990101" / "TCGA_AA_0001_19990101_2.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="wrong shape"):
        load_arrays(df, cache_dir=tmp_path / "cache")


# --- tf.data -----------------------------------------------------------------------------------


def _collect(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def test_classify_dataset_shapes_and_labels(data):
    from pipeline.data.dataset import make_dataset

    df, arrays = data
    positions = np.arange(len(df))[::-1][:20]
    batches = _collect(make_dataset(arrays, positions, task="classify", batch_size=8))
    assert [b[0].shape for b in batches] == [(8, 64, 64, 3), (8, 64, 64, 3), (4, 64, 64, 3)]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and labels.dtype == np.float32 and labels.shape == (20, 1)
    np.testing.assert_array_equal(labels[:, 0], df["has_tumor"].to_numpy()[positions].astype(np.float32))


def test_segment_dataset_with_weight_maps(data):
    from pipeline.data.dataset import make_dataset

    df, arrays = data

    def weights(mask):  # stands in for pipeline.losses.border_weight_map
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        return 1.0 + 4.0 * mask.astype(np.float32)

    ds = make_dataset(
        arrays,
        np.arange(len(df)),
        task="segment",
        batch_size=4,
        shuffle=True,
        augment=True,
        seed=1,
        weight_map=weights,
    )
    specs = ds.element_spec
    assert [tuple(s.shape) for s in specs] == [(None, 64, 64, 3), (None, 64, 64, 1), (None, 64, 64)]
    for images, masks, weight in _collect(ds.take(5)):
        assert images.dtype == np.float32 and masks.dtype == np.float32 and weight.dtype == np.float32
        assert set(np.unique(masks)) <= {0.0, 1.0}
        # Weights are computed from the augmented mask, not the stored one.
        np.testing.assert_array_equal(weight, 1.0 + 4.0 * masks[..., 0])


def test_dataset_without_augmentation_feeds_stored_pixels(data):
    """Training and inference must see the same normalisation: the dataset adds none of its own."""
    from pipeline.data.dataset import make_dataset
    from pipeline.preprocessing import classifier_preprocess, segmenter_preprocess

    df, arrays = data
    positions = np.array([3, 0, 17])
    ((images, masks),) = _collect(make_dataset(arrays, positions, task="segment", batch_size=3))
    raw = np.stack([read_image(df["image_path"].iloc[p]) for p in positions])
    np.testing.assert_array_equal(images, raw.astype(np.float32))
    np.testing.assert_array_equal(
        masks[..., 0], np.stack([read_mask(df["mask_path"].iloc[p]) for p in positions])
    )
    np.testing.assert_array_equal(
        np.asarray(segmenter_preprocess(images)), np.asarray(segmenter_preprocess(raw))
    )
    np.testing.assert_array_equal(
        np.asarray(classifier_preprocess(images)), np.asarray(classifier_preprocess(raw))
    )


def test_shuffled_augmented_dataset_is_reproducible(data):
    from pipeline.data.dataset import make_dataset

    df, arrays = data
    positions = np.arange(len(df))

    def build(seed):
        return make_dataset(
            arrays, positions, task="segment", batch_size=16, shuffle=True, augment=True, seed=seed
        )

    a, b = build(5), build(5)
    first_a, second_a = _collect(a), _collect(a)
    first_b, second_b = _collect(b), _collect(b)
    for x, y in zip(first_a + second_a, first_b + second_b, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    # A new pass (Keras epoch) reshuffles and re-augments; another seed gives another stream.
    assert not np.array_equal(first_a[0][0], second_a[0][0])
    assert not np.array_equal(first_a[0][0], _collect(build(6))[0][0])
    # Every slice appears once per epoch.
    assert sum(len(batch[0]) for batch in second_a) == len(positions)


def test_repeated_dataset_visits_every_slice_each_epoch(data):
    from pipeline.data.dataset import make_dataset

    df, arrays = data
    n = len(df)
    ds = make_dataset(arrays, np.arange(n), task="classify", batch_size=n, shuffle=True, repeat=True, seed=0)
    epoch_1, epoch_2 = _collect(ds.take(2))
    labels = df["has_tumor"].to_numpy(np.float32)
    assert epoch_1[1].sum() == epoch_2[1].sum() == labels.sum()
    assert not np.array_equal(epoch_1[0], epoch_2[0])  # reshuffled


def test_make_dataset_rejects_bad_arguments(data):
    from pipeline.data.dataset import make_dataset

    _, arrays = data
    with pytest.raises(ValueError, match="task"):
        make_dataset(arrays, [0], task="detect", batch_size=1)
    with pytest.raises(ValueError, match="positions"):
        make_dataset(arrays, [len(arrays)], task="segment", batch_size=1)


def test_class_weights_balance_the_classes():
    from pipeline.data.dataset import class_weights

    weights = class_weights([0, 0, 0, 1])
    assert weights[0] == pytest.approx(4 / 6) and weights[1] == pytest.approx(2.0)
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)
    assert class_weights([0, 0]) == {0: 1.0, 1: 1.0}


def test_random_crop_cuts_image_and_mask_at_the_same_place():
    from pipeline.data.augment import random_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[50:54, 5:9] = 1  # a small tumour near a corner
    image[..., 1] = mask * 255
    hits = 0
    for _ in range(50):
        crop_img, crop_mask = random_crop(image, mask, 32, rng, p_tumor=0.8)
        assert crop_img.shape == (32, 32, 3) and crop_mask.shape == (32, 32)
        np.testing.assert_array_equal(crop_img[..., 1], crop_mask * 255)
        hits += bool(crop_mask.any())
    assert hits >= 30  # tumour-centred most of the time, though it covers 0.4 % of the slice
    with pytest.raises(ValueError, match="exceeds"):
        random_crop(image, mask, 65, rng)


def test_segment_dataset_with_crops_yields_crop_sized_pairs(data):
    from pipeline.data.dataset import make_dataset

    df, arrays = data
    ds = make_dataset(arrays, np.arange(len(df)), task="segment", batch_size=4, crop_size=32, seed=3)
    assert tuple(ds.element_spec[0].shape) == (None, 32, 32, 3)
    for images, masks in _collect(ds.take(3)):
        assert images.shape[1:] == (32, 32, 3) and masks.shape[1:] == (32, 32, 1)
