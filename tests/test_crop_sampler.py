"""The segmenter's crop sampler: the configured mix of tumour, random and empty crops, and hard negatives."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.data.array_cache import SliceArrays
from pipeline.data.crop_sampler import CropMix, SamplerPools, draw_element, make_crop_dataset
from tests.synthetic import make_slice


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(3)
    pairs = [make_slice(rng, 64, tumor=i % 3 == 0) for i in range(12)]
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([(p[1] > 0).astype(np.uint8) for p in pairs])
    return SliceArrays(images, masks)


def _pools(arrays, hot=None, weights=None) -> SamplerPools:
    has = arrays.masks.reshape(len(arrays), -1).any(axis=1)
    every = np.arange(len(arrays))
    return SamplerPools(tumor=every[has], every=every, empty=every[~has], empty_weights=weights, hot=hot)


def test_the_sampler_yields_the_configured_mix(arrays):
    pools = _pools(arrays)
    mix = CropMix(tumor=0.6, random=0.1, empty=0.3)
    rng = np.random.default_rng(0)
    kinds = Counter(draw_element(rng, pools, pools.probabilities(mix))[0] for _ in range(4000))
    assert kinds["tumor"] / 4000 == pytest.approx(0.6, abs=0.03)
    assert kinds["random"] / 4000 == pytest.approx(0.1, abs=0.02)
    assert kinds["empty"] / 4000 == pytest.approx(0.3, abs=0.03)


def test_crops_hold_tumour_or_nothing_as_their_kind_says(arrays):
    pools = _pools(arrays)
    only_tumour = make_crop_dataset(arrays, pools, CropMix(1, 0, 0), batch_size=64, crop_size=32, seed=1,
                                    augment=False)
    images, masks = next(iter(only_tumour))
    assert images.shape == (64, 32, 32, 3) and masks.shape == (64, 32, 32, 1)
    assert (masks.numpy().reshape(64, -1).sum(axis=1) > 0).mean() > 0.95  # placed on the tumour
    only_empty = make_crop_dataset(arrays, pools, CropMix(0, 0, 1), batch_size=64, crop_size=32, seed=1)
    images, masks = next(iter(only_empty))
    assert masks.numpy().sum() == 0 and images.numpy().max() > 0  # normal tissue, target all zero


def test_the_stream_is_reproducible(arrays):
    pools = _pools(arrays)
    a = next(iter(make_crop_dataset(arrays, pools, CropMix(), batch_size=8, crop_size=32, seed=5)))
    b = next(iter(make_crop_dataset(arrays, pools, CropMix(), batch_size=8, crop_size=32, seed=5)))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())


def test_empty_crops_go_to_hard_negatives_and_where_the_reference_fired(arrays):
    pools = _pools(arrays)
    n_empty = len(pools.empty)
    weights = np.full(n_empty, 1e-9)
    weights[0] = 1.0  # one hard negative takes (almost) every draw
    hot = np.zeros((n_empty, 64, 64), bool)
    hot[0, 2:4, 2:4] = True  # the reference fired in the top-left corner, outside the head
    pools = _pools(arrays, hot=hot, weights=weights)
    rng = np.random.default_rng(0)
    drawn = [draw_element(rng, pools, pools.probabilities(CropMix(0, 0, 1))) for _ in range(200)]
    assert {position for _, position, _ in drawn} == {int(pools.empty[0])}
    ds = make_crop_dataset(arrays, pools, CropMix(0, 0, 1), batch_size=16, crop_size=16, seed=0,
                           augment=False)
    images, _ = next(iter(ds))
    expected = arrays.images[pools.empty[0]]
    # every crop lies within reach of the hot pixels (centre + jitter of a quarter crop, clamped)
    for crop in images.numpy():
        windows = [expected[y : y + 16, x : x + 16] for y in range(0, 12) for x in range(0, 12)]
        assert any(np.array_equal(crop, w) for w in windows)


def test_an_empty_pool_drops_its_kind_and_a_bad_mix_is_refused(arrays):
    pools = _pools(arrays)
    no_empty = SamplerPools(tumor=pools.tumor, every=pools.every, empty=np.array([], np.int64))
    assert no_empty.probabilities(CropMix(0.5, 0.25, 0.25)).tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    with pytest.raises(ValueError, match="non-negative"):
        CropMix(-1, 1, 1)


def test_cached_hard_negatives_are_reused_only_for_the_models_that_scored_them(arrays, tmp_path, monkeypatch):
    """A resumed run reuses its scores; one whose classifier or reference changed scores again."""
    import keras

    from pipeline.training import hard_negatives

    calls = []

    def score(images, classifier, reference):  # the scorer's answer depends on the classifier's weights
        calls.append(len(images))
        value = float(keras.ops.convert_to_numpy(classifier.weights[0]).ravel()[0])
        return np.full(len(images), value), None

    monkeypatch.setattr(hard_negatives, "score_empty_slices", score)
    has = arrays.masks.reshape(len(arrays), -1).any(axis=1)

    def tiny(value: float) -> keras.Model:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")])
        model.weights[0].assign(np.full((2, 1), value, np.float32))
        return model

    def pools(model):
        return hard_negatives.sampler_pools(arrays, np.arange(len(arrays)), has, classifier=model,
                                            reference_segmenter=None, weight=4.0, cache_dir=tmp_path)

    first = pools(tiny(0.25))
    assert len(calls) == 1 and (tmp_path / hard_negatives.CACHE_FILE).is_file()
    again = pools(tiny(0.25))  # same weights: read from the cache
    assert len(calls) == 1
    np.testing.assert_array_equal(again.empty_weights, first.empty_weights)
    changed = pools(tiny(0.5))  # another classifier: scored again, not the stale weights
    assert len(calls) == 2
    np.testing.assert_allclose(changed.empty_weights, 1.0 + 4.0 * 0.5)
