"""Both stages: shapes and dtypes under float32 and mixed bfloat16, freezing, save/reload of a pair."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.models import model_io
from pipeline.models.resnet_classifier import (
    build_classifier,
    get_backbone,
    set_backbone_trainable,
    trainable_counts,
)
from pipeline.models.resunet import build_resunet
from tests.model_helpers import TINY_CLASSIFIER, make_tiny_classifier, make_tiny_segmenter


@pytest.fixture
def policy():
    """Set a global dtype policy for one test and restore the previous one afterwards."""
    before = keras.mixed_precision.global_policy().name
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(before)


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


# ------------------------------------------------------------------ shapes and dtypes


@pytest.mark.slow
def test_classifier_shape_and_dtypes_under_mixed_bfloat16(policy):
    # float32 shapes and dtypes are checked on the saved pair below (one ResNet50 build fewer)
    policy("mixed_bfloat16")
    model = make_tiny_classifier()
    out = model(_images((2, 40, 56, 3)), training=False)  # any slice size: resized inside
    assert tuple(out.shape) == (2, 1)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert get_backbone(model).get_layer("conv1_conv").compute_dtype == "bfloat16"
    # normalisation, resizing and the output stay float32 under every policy
    for layer_name in ("resize", "preprocess", "tumor_probability"):
        assert model.get_layer(layer_name).compute_dtype == "float32"
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))


@pytest.mark.parametrize(("name", "compute"), [("float32", "float32"), ("mixed_bfloat16", "bfloat16")])
def test_resunet_non_square_shape_and_dtypes(policy, name, compute):
    policy(name)
    model = make_tiny_segmenter()
    out = model(_images((2, 32, 64, 3)), training=False)
    assert tuple(out.shape) == (2, 32, 64, 1)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert model.get_layer("bottleneck_1_conv").compute_dtype == compute
    assert model.get_layer("preprocess").compute_dtype == "float32"
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))


def test_resunet_follows_the_course_layout():
    model = build_resunet(base_filters=4, depth=3, input_shape=(64, 32, 3))
    filters = {layer.name: layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}
    assert filters["enc0_a_conv"] == filters["enc0_b_conv"] == 4  # stem: conv-ReLU-BN twice
    assert [filters[f"enc{i}_1_conv"] for i in (1, 2)] == [8, 16]  # doubling per level
    assert filters["bottleneck_1_conv"] == 32
    assert [filters[f"dec{i}_2_conv"] for i in (2, 1, 0)] == [16, 8, 4]
    assert filters["mask_probability"] == 1
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 3
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(isinstance(c.kernel_initializer, keras.initializers.HeNormal) for c in convs)
    assert model.get_layer("mask_probability").dtype_policy.name == "float32"
    # every res-block adds a 1x1 projection shortcut
    assert model.get_layer("dec1_shortcut_conv").kernel_size == (1, 1)


@pytest.mark.parametrize("shape", [(30, 64, 3), (32, 66, 3)])
def test_resunet_rejects_sides_not_divisible_by_two_to_the_depth(shape):
    with pytest.raises(ValueError, match="divisible by 4"):
        build_resunet(base_filters=4, depth=2, input_shape=shape)


def test_resunet_rejects_bad_parameters():
    with pytest.raises(ValueError, match="depth"):
        build_resunet(depth=0)


def test_classifier_rejects_tiny_image_size():
    with pytest.raises(ValueError, match="image_size"):
        build_classifier(image_size=16, weights="none")


# ------------------------------------------------------------------ transfer-learning strategies


@pytest.fixture(scope="module")
def tiny_classifier():
    return make_tiny_classifier()


@pytest.mark.parametrize(
    ("mode", "backbone_weights"),
    [
        ("frozen", 0),
        (0, 0),
        (1, 20),  # conv5: 10 convolutions x (kernel, bias); BN stays frozen
        ("2", 58),  # + conv4: 19 convolutions
        (4, 104),  # every stage; only the conv1 stem is left frozen
        ("all", 106),  # all 53 convolutions; 53 BN layers stay frozen
    ],
)
def test_freezing_counts(tiny_classifier, mode, backbone_weights):
    counts = set_backbone_trainable(tiny_classifier, mode)
    assert counts == {"backbone": backbone_weights, "head": 4, "total": backbone_weights + 4}
    assert len(get_backbone(tiny_classifier).trainable_weights) == backbone_weights
    assert counts == trainable_counts(tiny_classifier)


def test_freezing_sets_every_layer_object(tiny_classifier):
    set_backbone_trainable(tiny_classifier, "frozen")
    assert not any(layer.trainable for layer in get_backbone(tiny_classifier).layers)
    counts = set_backbone_trainable(tiny_classifier, "all", freeze_batchnorm=False)
    assert counts["backbone"] == 212  # 53 x (kernel, bias) + 53 x (gamma, beta); moving stats never train
    set_backbone_trainable(tiny_classifier, 1)
    backbone = get_backbone(tiny_classifier)
    assert backbone.get_layer("conv5_block3_3_conv").trainable
    assert not backbone.get_layer("conv5_block3_3_bn").trainable
    assert not backbone.get_layer("conv4_block6_3_conv").trainable


@pytest.mark.parametrize("bad", ["some", 5, -1, True, 1.5])
def test_freezing_rejects_unknown_modes(tiny_classifier, bad):
    with pytest.raises(ValueError):
        set_backbone_trainable(tiny_classifier, bad)


@pytest.mark.slow
def test_frozen_backbone_does_not_change_during_training(tiny_classifier):
    set_backbone_trainable(tiny_classifier, "frozen")
    # run_eagerly: one step does not repay tracing the training graph
    tiny_classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                            run_eagerly=True)
    backbone = get_backbone(tiny_classifier)
    before = [w.numpy().copy() for w in backbone.weights]
    head_before = tiny_classifier.get_layer("head_dense").kernel.numpy().copy()
    tiny_classifier.train_on_batch(_images((4, 32, 32, 3)), np.array([[1], [0], [1], [0]], "float32"))
    for old, new in zip(before, backbone.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())  # kernels and BN moving statistics alike
    assert not np.array_equal(head_before, tiny_classifier.get_layer("head_dense").kernel.numpy())


@pytest.mark.slow
def test_pretrained_backbone_keeps_batchnorm_in_inference_mode(tmp_path):
    # Any weights file counts as "pretrained": save random ResNet50 weights and load them back.
    weights = tmp_path / "r50.weights.h5"
    random_backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    random_backbone.save_weights(weights)
    model = build_classifier(image_size=32, weights=str(weights), dense_units=8)
    set_backbone_trainable(model, "all")
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    x = _images((2, 32, 32, 3))
    np.testing.assert_allclose(features(x, training=True), features(x, training=False), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ saving and loading


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny pair saved with save_pair (as `make_tiny_pair` does), plus the in-memory models' outputs."""
    directory = tmp_path_factory.mktemp("pair")
    classifier, segmenter = make_tiny_classifier(), make_tiny_segmenter()
    x_cls, x_seg = _images((2, 48, 40, 3), 1), _images((2, 32, 64, 3), 2)
    expected = (np.asarray(classifier(x_cls, training=False)), np.asarray(segmenter(x_seg, training=False)))
    model_io.save_pair(directory, classifier, segmenter, {"threshold": 0.35, "segmenter_tile_size": 64})
    return directory, (x_cls, x_seg), expected


@pytest.mark.slow
def test_pair_reload_gives_identical_outputs(saved_pair):
    directory, (x_cls, x_seg), (p_cls, p_seg) = saved_pair
    assert p_cls.shape == (2, 1) and p_cls.dtype == np.float32
    assert p_seg.shape == (2, 32, 64, 1) and p_seg.dtype == np.float32
    pair = model_io.load_pair(directory)
    np.testing.assert_array_equal(np.asarray(pair.classifier(x_cls, training=False)), p_cls)
    np.testing.assert_array_equal(np.asarray(pair.segmenter(x_seg, training=False)), p_seg)
    assert pair.threshold == 0.35


def test_pair_metadata(saved_pair):
    directory, _, _ = saved_pair
    meta = json.loads((directory / model_io.META_FILE).read_text())
    assert meta["threshold"] == 0.35
    assert meta["classifier_image_size"] == TINY_CLASSIFIER["image_size"]
    assert meta["segmenter_tile_size"] == 64
    assert meta["policy"] == "float32"
    assert {"keras", "tensorflow", "pipeline"} <= set(meta["versions"])
    for name in (model_io.CLASSIFIER_FILE, model_io.SEGMENTER_FILE):
        assert meta["sha256"][name] == model_io.sha256_of(directory / name)


def test_sha256_mismatch_names_the_file(saved_pair, tmp_path):
    directory, _, _ = saved_pair
    path = directory / model_io.SEGMENTER_FILE
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        model_io.load_model(path, expected_sha256="0" * 64)
    assert str(path) in str(info.value)


def test_tampered_pair_is_refused(saved_pair, tmp_path):
    directory, _, _ = saved_pair
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (model_io.CLASSIFIER_FILE, model_io.SEGMENTER_FILE, model_io.META_FILE, "SHA256SUMS"):
        (copy / name).write_bytes((directory / name).read_bytes())
    with open(copy / model_io.CLASSIFIER_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError, match=model_io.CLASSIFIER_FILE):
        model_io.load_pair(copy)
    (copy / "SHA256SUMS").unlink()  # the trust root gone: refused too, not a switched-off check
    with pytest.raises(DataError, match="SHA256SUMS is missing"):
        model_io.load_pair(copy)


def test_missing_pair_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="pipeline.json"):
        model_io.load_pair(tmp_path)
    with pytest.raises(DataError, match="not found"):
        model_io.load_model(tmp_path / "nothing.keras")


def test_saved_model_has_no_optimizer_state(tmp_path):
    model = build_resunet(base_filters=2, depth=1)
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    x = _images((2, 8, 8, 3))
    model.train_on_batch(x, (x[..., :1] > 128).astype("float32"))
    path = model_io.save_model(model, tmp_path / "seg.keras")
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as h5:
        assert "optimizer" not in h5
    loaded = model_io.load_model(path)
    assert getattr(loaded, "optimizer", None) is None
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)))
    assert model.optimizer is not None  # the caller's model is untouched
    with pytest.raises(ValueError, match=".keras"):
        model_io.save_model(model, tmp_path / "seg.h5")
