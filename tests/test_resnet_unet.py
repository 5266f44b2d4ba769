"""The ResNet50-encoder segmenter: shapes, what it freezes, BatchNorm in inference mode, safe_mode reload."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.models import model_io
from pipeline.models.resnet_unet import ENCODER_NAME, build_resnet_unet, set_encoder_trainable
from pipeline.training.config import load_config
from pipeline.training.segmenter_training import build_segmenter

TOY = {"encoder_stages": 4, "decoder_filters": (8, 8, 4, 4), "weights": "none", "stem_filters": 4}


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


@pytest.fixture(scope="module")
def toy() -> keras.Model:
    return build_resnet_unet(encoder_trainable=1, **TOY)


def test_output_is_a_full_size_probability_map_on_non_square_input(toy):
    out = np.asarray(toy(_images((2, 32, 64, 3)), training=False))
    assert out.shape == (2, 32, 64, 1)
    assert out.dtype == np.float32 and np.all((out >= 0) & (out <= 1))


def test_encoder_is_cut_after_the_stage_asked_for(toy):
    names = [layer.name for layer in toy.get_layer(ENCODER_NAME).layers]
    assert any(n.startswith("conv4_") for n in names)
    assert not any(n.startswith("conv5_") for n in names)  # stage 5 (15M parameters) left out
    three = build_resnet_unet(encoder_stages=3, decoder_filters=(8, 4, 4), weights="none",
                              encoder_trainable=0)
    assert not any(layer.name.startswith("conv4_") for layer in three.get_layer(ENCODER_NAME).layers)


def test_freezes_the_early_stages_and_every_encoder_batchnorm(toy):
    encoder = toy.get_layer(ENCODER_NAME)
    trainable = {layer.name for layer in encoder.layers if layer.trainable and layer.weights}
    assert trainable and all(n.startswith("conv4_") and not n.endswith("_bn") for n in trainable)
    bn = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    # the decoder and the full-resolution stem train
    assert toy.get_layer("dec0_1_conv").trainable and toy.get_layer("stem_a_conv").trainable
    assert set_encoder_trainable(toy, 0) == []
    assert not any(w.path.startswith(ENCODER_NAME) for w in toy.trainable_weights)
    assert set_encoder_trainable(toy, 2) == ["conv3_", "conv4_"]
    set_encoder_trainable(toy, 1)


def test_a_training_step_moves_stage_4_only_and_keeps_encoder_statistics():
    model = build_resnet_unet(encoder_trainable=1, **TOY)
    encoder = model.get_layer(ENCODER_NAME)
    watched = {n: [w.numpy() for w in encoder.get_layer(n).weights]
               for n in ("conv3_block1_1_conv", "conv4_block1_1_conv", "conv4_block1_1_bn")}
    # eager: one step does not repay tracing ResNet50's gradient graph (tens of seconds on 2 cores)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", run_eagerly=True)
    x, y = _images((4, 32, 32, 3)), (np.random.default_rng(1).random((4, 32, 32, 1)) > 0.7).astype("float32")
    model.train_on_batch(x, y)
    changed = {n: any(not np.array_equal(a, b.numpy()) for a, b in zip(v, encoder.get_layer(n).weights,
                                                                           strict=True))
               for n, v in watched.items()}
    assert changed == {"conv3_block1_1_conv": False, "conv4_block1_1_conv": True, "conv4_block1_1_bn": False}


def test_saves_and_reloads_with_safe_mode_to_identical_outputs(toy, tmp_path):
    path = model_io.save_model(toy, tmp_path / "segmenter.keras")
    again = model_io.load_model(path)
    x = _images((1, 64, 64, 3), seed=3)
    np.testing.assert_array_equal(np.asarray(toy(x, training=False)), np.asarray(again(x, training=False)))


def test_invalid_designs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="encoder_stages"):
        build_resnet_unet(encoder_stages=2, decoder_filters=(8, 8), weights="none")
    with pytest.raises(ValueError, match="decoder_filters"):
        build_resnet_unet(encoder_stages=4, decoder_filters=(8, 8), weights="none")
    with pytest.raises(ValueError, match="encoder_trainable"):
        build_resnet_unet(encoder_stages=3, decoder_filters=(8, 8, 8), encoder_trainable=3, weights="none")


def test_the_config_chooses_the_design():
    cfg = load_config(None, [], ["segmenter.encoder=resnet50", "segmenter.encoder_weights=none",
                                 "segmenter.encoder_stages=3", "segmenter.decoder_filters=[8, 4, 4]"])
    model = build_segmenter(cfg.segmenter)
    assert ENCODER_NAME in [layer.name for layer in model.layers]
    plain_cfg = load_config(None, [], ["segmenter.base_filters=4", "segmenter.depth=2"])
    plain = build_segmenter(plain_cfg.segmenter)
    assert ENCODER_NAME not in [layer.name for layer in plain.layers]


def test_a_bf16_trained_encoder_runs_on_openvino_as_its_float32_rebuild(tmp_path):
    """A run trained under mixed_bfloat16 (what `auto` picks on AMX, and on AVX512-BF16 where the
    probe times it faster) must run on the default backend: its encoder's casts did not compile."""
    from pipeline.inference.backends.ir_cache import export_ir
    from pipeline.inference.backends.openvino_runner import OpenVINORunner
    from pipeline.models.precision import as_float32_model

    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_resnet_unet(encoder_trainable=1, **TOY)
    finally:
        keras.mixed_precision.set_global_policy(before)
    export_ir(mixed, tmp_path / "model.xml")
    x = _images((2, 64, 64, 3), seed=4)
    reference = np.asarray(as_float32_model(mixed).predict_on_batch(x))
    got = OpenVINORunner(tmp_path / "model.xml", "f32").predict_on_batch(x)
    np.testing.assert_allclose(got, reference, atol=1e-4)
