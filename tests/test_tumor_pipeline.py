"""TumorPipeline: gating, batching, tiling of other sizes, measurements, loading a pair, Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.image_loading import load_slice
from pipeline.inference.tumor_pipeline import (
    SliceResult,
    TumorPipeline,
    batch_bucket,
    measure,
)
from pipeline.postprocessing import postprocess_mask
from tests.inference_helpers import expected_mask, slice_images, stub_pipeline
from tests.synthetic import make_slice


@pytest.fixture(scope="module")
def slices(synthetic_root):
    """Real synthetic TIFF slices (64x64) and whether each holds a tumour (its mask is non-empty)."""
    paths = slice_images(synthetic_root)[:12]
    images = [load_slice(p) for p in paths]
    labels = [bool(load_slice(p.with_name(p.stem + "_mask.tif")).any()) for p in paths]
    assert any(labels) and not all(labels)
    return images, labels


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_pair) -> TumorPipeline:
    """The saved tiny pair (untrained, `tests.model_helpers`) loaded by `from_dir`, flagging every slice."""
    return TumorPipeline.from_dir(tiny_pair, threshold=0.0, batch_size=8)


def test_a_slice_under_the_threshold_never_reaches_the_segmenter(slices):
    images, labels = slices
    pipe = stub_pipeline(tile_size=64, batch_size=5)
    results = pipe.predict(images)

    flagged = [r.is_tumor for r in results]
    assert flagged == labels  # the stub classifier separates synthetic tumours at GATE
    seen = np.concatenate(pipe.segmenter.batches)
    assert len(seen) == sum(labels)  # the segmenter got exactly the flagged slices ...
    for image, is_tumor in zip(images, labels, strict=True):  # ... and none of the others
        reached = any(np.array_equal(image, s) for s in seen)
        assert reached == is_tumor
    assert all(len(b) <= 5 for b in pipe.segmenter.batches + pipe.classifier.batches)  # batch-wise
    assert pipe.classifier.n_seen == len(images)  # the classifier scores every slice once


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [(0, 16, 1), (1, 16, 1), (2, 16, 2), (3, 16, 4), (5, 16, 8), (9, 16, 16), (16, 16, 16), (9, 12, 12)],
)
def test_batch_bucket_is_the_next_power_of_two_capped_at_the_batch_size(n, size, expected):
    assert batch_bucket(n, size) == expected


def test_few_flagged_slices_are_not_padded_to_a_full_batch(slices):
    images, labels = slices  # 12 slices, a few of them tumour slices
    pipe = stub_pipeline(tile_size=64, batch_size=16)
    pipe.predict(images)
    assert pipe.classifier.padded_lengths == [16]
    n_flagged = sum(labels)
    assert pipe.segmenter.padded_lengths == [batch_bucket(n_flagged, 16)]
    assert n_flagged <= pipe.segmenter.padded_lengths[0] < 2 * n_flagged


def test_unflagged_slices_get_an_empty_result_and_flagged_ones_their_mask(slices):
    images, labels = slices
    results = stub_pipeline().predict(images)
    for image, result, is_tumor in zip(images, results, labels, strict=True):
        assert isinstance(result, SliceResult)
        assert result.probability == pytest.approx(image[..., 1].max() / 255, abs=1e-6)
        assert result.mask.dtype == np.uint8 and result.mask.shape == image.shape[:2]
        if is_tumor:
            np.testing.assert_array_equal(result.mask, expected_mask(image))
            assert result.area_px > 0 and result.bbox is not None and result.n_components == 1
        else:
            assert result.area_px == 0 and not result.mask.any()
            assert result.bbox is None and result.centroid is None and result.n_components == 0


def test_threshold_is_inclusive_and_everything_is_gated_out_at_one(slices):
    images, _ = slices
    pipe = stub_pipeline(threshold=1.0)
    assert not any(r.is_tumor for r in pipe.predict(images))
    assert pipe.segmenter.n_seen == 0
    bright = np.zeros((64, 64, 3), np.uint8)
    bright[10:20, 10:20, 1] = 255  # probability exactly 1.0
    assert pipe.predict_one(bright).is_tumor


def test_other_sizes_go_through_the_tiler_and_keep_their_order():
    rng = np.random.default_rng(3)
    images = [
        make_slice(rng, 64, True)[0],
        make_slice(rng, 96, True)[0][:90, :77],
        make_slice(rng, 64, False)[0],
        make_slice(rng, 48, True)[0][:41, :45],
    ]
    pipe = stub_pipeline(tile_size=32, batch_size=4)
    results = pipe.predict(images)
    for image, result in zip(images, results, strict=True):
        assert result.mask.shape == image.shape[:2]
        if result.is_tumor:  # pointwise stub: the blended tiles equal a direct prediction
            np.testing.assert_array_equal(result.mask, expected_mask(image))
    assert [r.is_tumor for r in results] == [True, True, False, True]
    assert all(b.shape[1:3] == (32, 32) for b in pipe.segmenter.batches)  # only tiles reach the model


def test_measurements_of_a_known_mask():
    image = np.zeros((30, 40, 3), np.uint8)
    image[5:25, 10:30, 1] = 100  # a 20x20 "brain"
    mask = np.zeros((30, 40), np.uint8)
    mask[8:11, 12:16] = 1  # 3x4 = 12 px
    mask[20, 25] = 1  # a separate pixel
    result = measure(image, mask, probability=0.9, is_tumor=True)
    assert result.area_px == 13
    assert result.n_components == 2
    assert result.bbox == (8, 12, 21, 26)  # ends exclusive: mask[8:21, 12:26] holds the tumour
    ys, xs = np.nonzero(mask)
    assert result.centroid == pytest.approx((ys.mean(), xs.mean()))
    assert result.brain_px == 400
    assert result.area_fraction_brain == pytest.approx(13 / 400)
    assert result.area_fraction_slice == pytest.approx(13 / 1200)
    assert result.to_dict()["bbox"] == [8, 12, 21, 26]


def test_diagonal_neighbours_form_one_component():
    mask = np.eye(5, dtype=np.uint8)
    assert measure(np.zeros((5, 5, 3), np.uint8), mask, 1.0, True).n_components == 1


def test_min_component_px_drops_small_regions():
    probs = np.zeros((20, 20), np.float32)
    probs[2:6, 2:6] = 0.9  # 16 px
    probs[10:12, 10:12] = 0.8  # 4 px
    probs[15, 15] = 0.5  # not above seg_threshold 0.5
    np.testing.assert_array_equal(postprocess_mask(probs, 0.5, 0).sum(), 20)
    kept = postprocess_mask(probs, 0.5, min_component_px=5)
    assert kept.sum() == 16 and kept[2:6, 2:6].all()
    assert postprocess_mask(probs, 0.5, min_component_px=17).sum() == 0


def test_min_component_px_in_the_pipeline():
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 1] = 90
    image[10:20, 10:20, 1] = 220  # 100 px tumour
    image[40:42, 40:42, 1] = 220  # 4 px speck
    assert stub_pipeline().predict_one(image).n_components == 2
    result = stub_pipeline(min_component_px=10).predict_one(image)
    assert result.n_components == 1 and result.area_px == 100


def test_segment_only_runs_on_every_slice(slices):
    images, _ = slices
    pipe = stub_pipeline()
    masks = pipe.segment_only(images)
    assert pipe.segmenter.n_seen == len(images)
    for image, mask in zip(images, masks, strict=True):
        np.testing.assert_array_equal(mask, expected_mask(image))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        stub_pipeline(threshold=1.5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stub_pipeline().predict([np.zeros((8, 8), np.uint8)])
    assert stub_pipeline().predict([]) == []


def test_from_dir_reads_the_operating_point_and_overrides_win(monkeypatch):
    import pipeline.models.model_io as model_io

    meta = {"threshold": 0.3, "min_component_px": 7, "seg_threshold": 0.4, "segmenter_tile_size": 128}
    stubs = stub_pipeline()
    monkeypatch.setattr(
        model_io, "load_pair", lambda path, **_: model_io.ModelPair(stubs.classifier, stubs.segmenter, meta)
    )
    pipe = TumorPipeline.from_dir("unused")
    assert (pipe.threshold, pipe.min_component_px, pipe.seg_threshold, pipe.tile_size) == (0.3, 7, 0.4, 128)
    assert pipe.meta is meta
    pipe = TumorPipeline.from_dir("unused", threshold=0.9, min_component_px=None, batch_size=3)
    assert (pipe.threshold, pipe.min_component_px, pipe.batch_size) == (0.9, 7, 3)


@pytest.mark.slow
def test_the_tiny_saved_pair_runs_end_to_end(tiny_pipeline, slices):
    images, _ = slices
    images = images[:5] + [images[0][:40, :56]]  # the last one goes through the tiler
    pipe = tiny_pipeline  # threshold 0: every slice flagged, so both stages run
    assert pipe.tile_size == 64 and pipe.meta["tiny_test_pair"]
    results = pipe.predict(images)
    assert len(results) == len(images)
    for image, r in zip(images, results, strict=True):
        assert 0.0 <= r.probability <= 1.0 and r.is_tumor
        assert r.mask.shape == image.shape[:2] and set(np.unique(r.mask)) <= {0, 1}
        assert r.area_px == int(r.mask.sum())


@pytest.mark.slow
def test_grad_cam_heatmap(tiny_pipeline, slices):
    import keras

    from pipeline.inference.gradcam import grad_cam
    from pipeline.models.resnet_classifier import build_classifier

    image = slices[0][int(np.argmax(slices[1]))]  # a tumour slice
    heatmap = grad_cam(tiny_pipeline.classifier, image)  # the saved pair's nested ResNet50
    assert heatmap.shape == image.shape[:2] and heatmap.dtype == np.float32
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0

    # The tiny pair works at 32x32 (conv5 is 1x1, so its map is flat) and is untrained (its map
    # may be all zero). At 64x64 conv5 is 2x2, and a head with positive weights makes every
    # feature push the score up, so the map must show where the features are.
    keras.utils.set_random_seed(0)
    classifier = build_classifier(64, weights="none", dense_units=8)
    for name in ("head_dense", "tumor_probability"):
        kernel = classifier.get_layer(name).kernel
        kernel.assign(np.abs(kernel.numpy()))
    heatmap = grad_cam(classifier, image)
    assert heatmap.shape == image.shape[:2]
    assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.01  # not constant
    with pytest.raises(ValueError, match="no layer"):
        grad_cam(classifier, image, layer_name="conv9_block1_out")


def test_grad_cam_refuses_a_classifier_without_backbone():
    from pipeline.inference.gradcam import grad_cam

    with pytest.raises(ValueError, match="resnet50"):
        grad_cam(stub_pipeline().classifier, np.zeros((32, 32, 3), np.uint8))


def test_brain_mask_equals_scipys_opening_and_hole_filling(slices):
    """The OpenCV brain mask is pixel for pixel the scipy definition it replaced, borders included."""
    from scipy import ndimage

    from pipeline.inference.tumor_pipeline import BRAIN_THRESHOLD, CONNECTIVITY, brain_mask

    rng = np.random.default_rng(3)
    images = list(slices[0])
    images += [rng.integers(0, 2 * BRAIN_THRESHOLD, (h, w, 3), dtype=np.uint8)
               for h, w in [(1, 1), (2, 9), (5, 5), (64, 71), (129, 128)]]
    ring = np.zeros((32, 32, 3), np.uint8)
    ring[4:28, 4:28, 1] = 200
    ring[10:20, 10:20, 1] = 0  # a hole inside the head: filled
    ring[0:3, 12:20, 1] = 200  # a blob on the edge: opened away only where thinner than 3 px
    images += [ring, np.full((9, 9, 3), 200, np.uint8)]
    for image in images:
        above = image[..., 1] > BRAIN_THRESHOLD
        expected = ndimage.binary_fill_holes(ndimage.binary_opening(above, structure=CONNECTIVITY))
        np.testing.assert_array_equal(brain_mask(image), expected)
