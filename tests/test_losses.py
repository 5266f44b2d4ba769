"""Losses and U-Net border weight maps: hand-computed values, conventions, serialisation."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import losses
from pipeline.losses import (
    LOSSES,
    BCEDiceLoss,
    BCELoss,
    BorderWeightedBCE,
    DiceLoss,
    FocalTverskyLoss,
    TverskyLoss,
    border_weight_map,
    get_loss,
)


def _batch(*masks) -> np.ndarray:
    """Stack (H, W) arrays into a float32 (B, H, W, 1) batch."""
    return np.stack([np.asarray(m, np.float32) for m in masks])[..., None]


def _value(loss, y_true, y_pred, **kw) -> float:
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred, **kw)))


@pytest.fixture
def pair():
    """A (2, 8, 8, 1) ground truth with a 3x3 tumour in sample 0 and an empty sample 1."""
    y = np.zeros((2, 8, 8, 1), np.float32)
    y[0, 2:5, 2:5] = 1
    return y


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_prediction_is_near_zero_and_inverted_is_high(name, pair):
    loss = get_loss(name)
    assert _value(loss, pair, pair) == pytest.approx(0.0, abs=1e-5)
    inverted = _value(loss, pair, 1.0 - pair)
    assert inverted > (5.0 if "bce" in name else 0.9)


def test_dice_loss_hand_computed():
    y = _batch([[1, 1, 0, 0]])
    p = _batch([[1.0, 0.5, 0.5, 0.0]])
    # 2 * 1.5 / (2 + 2) = 0.75
    assert _value(DiceLoss(smooth=0.0), y, p) == pytest.approx(0.25)
    # smoothing: 1 - (3 + 1) / (4 + 1)
    assert _value(DiceLoss(smooth=1.0), y, p) == pytest.approx(0.2)


def test_dice_loss_is_averaged_per_sample_not_over_the_batch():
    y = _batch([[1, 1, 1, 1]], [[1, 0, 0, 0]])
    p = _batch([[1, 1, 1, 1]], [[0, 1, 0, 0]])
    # sample 0 perfect (loss 0), sample 1 disjoint (loss 1) -> mean 0.5
    # (one Dice over the whole batch would be 1 - 8/10 = 0.2)
    assert _value(DiceLoss(smooth=0.0), y, p) == pytest.approx(0.5)


def test_tversky_equals_dice_at_half_half():
    rng = np.random.default_rng(0)
    y = (rng.random((3, 16, 16, 1)) > 0.7).astype(np.float32)
    p = rng.random((3, 16, 16, 1)).astype(np.float32)
    dice = _value(DiceLoss(smooth=0.0), y, p)
    assert _value(TverskyLoss(0.5, 0.5, smooth=0.0), y, p) == pytest.approx(dice, rel=1e-5)
    # with smoothing, Tversky(smooth=s) is Dice(smooth=2s)
    assert _value(TverskyLoss(0.5, 0.5, smooth=1.0), y, p) == pytest.approx(
        _value(DiceLoss(smooth=2.0), y, p), rel=1e-5)


def test_tversky_alpha_weights_false_positives_and_beta_false_negatives():
    y = _batch([[1, 1, 0, 0]])
    only_fp = _batch([[1, 1, 1, 1]])  # TP 2, FP 2, FN 0
    only_fn = _batch([[1, 0, 0, 0]])  # TP 1, FP 0, FN 1
    loss = TverskyLoss(alpha=0.3, beta=0.7, smooth=0.0)
    assert _value(loss, y, only_fp) == pytest.approx(1 - 2 / (2 + 0.3 * 2))
    assert _value(loss, y, only_fn) == pytest.approx(1 - 1 / (1 + 0.7 * 1))


def test_focal_tversky_ordering():
    y = _batch([[1, 1, 1, 1, 0, 0, 0, 0]])
    good = _batch([[0.9, 0.9, 0.9, 0.6, 0.1, 0.1, 0.1, 0.0]])
    poor = _batch([[0.6, 0.4, 0.3, 0.2, 0.5, 0.4, 0.2, 0.1]])
    tversky = TverskyLoss(smooth=0.0)
    t_good, t_poor = _value(tversky, y, good), _value(tversky, y, poor)
    assert 0 < t_good < t_poor < 1

    # gamma = 1 is plain Tversky
    assert _value(FocalTverskyLoss(gamma=1.0, smooth=0.0), y, good) == pytest.approx(t_good, rel=1e-6)
    # gamma = 0.75 (the paper's 4/3): (1 - TI) ** 0.75 exceeds (1 - TI) in (0, 1) ...
    ft = FocalTverskyLoss(gamma=0.75, smooth=0.0)
    f_good, f_poor = _value(ft, y, good), _value(ft, y, poor)
    assert f_good == pytest.approx(t_good**0.75, rel=1e-5)
    assert f_good > t_good and f_poor > t_poor
    # ... keeps the ordering of prediction quality, and boosts the better prediction relatively more
    assert f_good < f_poor
    assert f_good / t_good > f_poor / t_poor
    # gamma > 1 does the opposite
    f43 = FocalTverskyLoss(gamma=4 / 3, smooth=0.0)
    assert _value(f43, y, good) < t_good and _value(f43, y, poor) < t_poor


def test_focal_tversky_gradient_is_finite_at_a_perfect_prediction(pair):
    y_pred = tf.Variable(pair)
    with tf.GradientTape() as tape:
        value = FocalTverskyLoss()(pair, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    assert np.isfinite(grad).all()


def test_bce_dice_is_the_weighted_sum(pair):
    p = np.clip(pair * 0.8 + 0.1, 0, 1)
    bce, dice = _value(BCELoss(), pair, p), _value(DiceLoss(), pair, p)
    assert _value(BCEDiceLoss(bce_weight=2.0, dice_weight=0.5), pair, p) == pytest.approx(
        2.0 * bce + 0.5 * dice, rel=1e-5)


def test_bce_on_classifier_labels():
    y = np.array([[1.0], [0.0]], np.float32)
    p = np.array([[0.8], [0.4]], np.float32)
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert _value(BCELoss(), y, p) == pytest.approx(expected, rel=1e-5)


def test_losses_compute_in_float32_from_bfloat16_predictions(pair):
    p = np.clip(pair * 0.7 + 0.2, 0, 1)
    p_bf16 = tf.cast(p, tf.bfloat16)
    for name in LOSSES:
        out = get_loss(name)(pair, p_bf16)
        assert out.dtype == tf.float32, name
        reference = _value(get_loss(name), pair, tf.cast(p_bf16, tf.float32))
        assert float(out) == pytest.approx(reference, rel=1e-6), name


# --------------------------------------------------------------------------- per-pixel weights


def test_border_bce_returns_per_pixel_losses(pair):
    assert tuple(BorderWeightedBCE().call(pair, pair * 0.5).shape) == (2, 8, 8)


def test_sample_weight_multiplies_each_pixel(pair):
    p = np.full_like(pair, 0.3)
    per_pixel = np.where(pair > 0, -np.log(0.3), -np.log(0.7))[..., 0]
    weights = np.ones((2, 8, 8), np.float32)
    weights[0, 2:5, 2:5] = 4.0  # tumour pixels count 4x
    weights[1] = 0.0  # the empty sample does not count at all
    loss = BorderWeightedBCE()
    assert _value(loss, pair, p) == pytest.approx(per_pixel.mean(), rel=1e-5)
    expected = (per_pixel * weights).sum() / per_pixel.size  # Keras divides by the pixel count
    assert _value(loss, pair, p, sample_weight=weights) == pytest.approx(expected, rel=1e-5)
    assert _value(loss, pair, p, sample_weight=weights) != pytest.approx(per_pixel.mean(), rel=1e-3)


def test_model_fit_uses_a_per_pixel_weight_map(pair):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=BorderWeightedBCE())
    weights = np.stack([border_weight_map(m[..., 0]) for m in pair])
    weights[0, 0, 0] = 7.0  # make sure the map is not uniform anywhere
    ds = tf.data.Dataset.from_tensor_slices((pair, pair, weights)).batch(2)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    # zero kernel -> every prediction is sigmoid(0) = 0.5 -> every pixel loss is log 2
    expected = math.log(2.0) * weights.sum() / weights.size
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    unweighted = model.evaluate(pair, pair, verbose=0)
    assert unweighted == pytest.approx(math.log(2.0), rel=1e-4)


# --------------------------------------------------------------------------- weight maps


def test_weight_map_is_all_ones_for_an_empty_or_full_mask():
    for mask in (np.zeros((16, 16), np.uint8), np.ones((16, 16), np.uint8)):
        w = border_weight_map(mask)
        assert w.dtype == np.float32 and w.shape == (16, 16)
        np.testing.assert_array_equal(w, 1.0)


def test_single_component_has_only_class_balancing_with_mean_one():
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:9] = 1  # 20 of 400 pixels
    w = border_weight_map(mask)
    assert w[mask == 1] == pytest.approx(0.5 / 0.05)
    assert w[mask == 0] == pytest.approx(0.5 / 0.95)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)


def test_weight_map_peaks_in_the_gap_between_two_blobs():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:14] = 1
    mask[8:24, 16:26] = 1  # a two-pixel gap at columns 14 and 15
    w = border_weight_map(mask, w0=10.0, sigma=5.0)
    w_background = 0.5 / (1 - mask.mean())
    peak = np.unravel_index(np.argmax(w), w.shape)
    assert 8 <= peak[0] < 24 and peak[1] in (14, 15)
    assert w.max() > 10.0 / 2 + w_background
    # a gap pixel is 1 px from one blob and 2 px from the other
    assert w[15, 14] == pytest.approx(w_background + 10.0 * math.exp(-(3**2) / (2 * 5.0**2)), rel=1e-5)
    # the border term is only added to background pixels
    assert w[15, 13] == pytest.approx(0.5 / mask.mean(), rel=1e-6)
    # far from the gap only the class weight is left
    assert w[0, 31] == pytest.approx(w_background, abs=1e-3)


def test_diagonal_contact_is_one_component_and_class_weights_can_be_fixed():
    mask = np.zeros((12, 12), bool)
    mask[2:5, 2:5] = True
    mask[5:8, 5:8] = True  # touches the first blob at a corner
    w = border_weight_map(mask, class_weights=(1.0, 3.0))
    np.testing.assert_allclose(w, np.where(mask, 3.0, 1.0))


def test_border_weighted_bce_builds_maps_with_its_parameters():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:14] = 1
    mask[8:24, 16:26] = 1
    loss = BorderWeightedBCE(w0=5.0, sigma=3.0)
    np.testing.assert_array_equal(loss.weight_map(mask), border_weight_map(mask, w0=5.0, sigma=3.0))


def test_weight_map_rejects_a_batch():
    with pytest.raises(ValueError, match="2-D"):
        border_weight_map(np.zeros((2, 8, 8)))


# --------------------------------------------------------------------------- registry and saving


def test_get_loss_builds_by_name_with_kwargs():
    loss = get_loss("Focal-Tversky", alpha=0.4, beta=0.6, gamma=0.5)
    assert isinstance(loss, FocalTverskyLoss)
    assert (loss.alpha, loss.beta, loss.gamma) == (0.4, 0.6, 0.5)
    assert isinstance(get_loss("border_bce"), BorderWeightedBCE)


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_loss("dcie")
    for name in LOSSES:
        assert name in str(err.value)


_CONFIGURED = [
    BCELoss(),
    DiceLoss(smooth=0.5),
    TverskyLoss(alpha=0.2, beta=0.8, smooth=2.0),
    FocalTverskyLoss(alpha=0.4, beta=0.6, gamma=4 / 3),
    BCEDiceLoss(bce_weight=0.3, dice_weight=0.7),
    BorderWeightedBCE(w0=8.0, sigma=4.0),
]


@pytest.mark.parametrize("loss", _CONFIGURED, ids=lambda obj: type(obj).__name__)
def test_loss_serialisation_round_trip(loss, pair):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    p = np.clip(pair * 0.6 + 0.3, 0, 1)
    assert _value(restored, pair, p) == pytest.approx(_value(loss, pair, p))


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # never-built optimizer
def test_compiled_model_reloads_every_loss_in_safe_mode(tmp_path, pair):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs)
    model = keras.Model(inputs, outputs)
    for loss in _CONFIGURED:
        model.compile(optimizer="adam", loss=loss)
        path = tmp_path / f"{loss.name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)  # safe_mode=True, no custom_objects
        assert type(loaded.loss) is type(loss)
        assert loaded.loss.get_config() == loss.get_config()
        np.testing.assert_allclose(loaded.predict(pair, verbose=0), model.predict(pair, verbose=0))


def test_module_exports_what_the_architecture_promises():
    for name in ("get_loss", "DiceLoss", "TverskyLoss", "FocalTverskyLoss", "BCEDiceLoss",
                 "BorderWeightedBCE", "border_weight_map"):
        assert hasattr(losses, name)


def test_batch_dice_keeps_counting_false_positives_on_empty_crops_where_per_sample_dice_saturates():
    from pipeline.losses import BCEDiceLoss

    y = np.zeros((2, 32, 32, 1), np.float32)
    y[0, :10, :10] = 1.0  # a tumour crop (100 px) and an empty crop

    def prediction(fp_px: int) -> np.ndarray:
        p = y.copy()
        p[1].reshape(-1)[:fp_px] = 1.0  # false positives on the empty crop only
        return np.clip(p, 1e-4, 1 - 1e-4)

    def dice_term(loss, fp_px):
        bce_only = BCEDiceLoss(dice_weight=0.0)
        return float(loss(y, prediction(fp_px))) - float(bce_only(y, prediction(fp_px)))

    per_sample, batch = BCEDiceLoss(), BCEDiceLoss(batch_dice=True)
    # per sample: the empty crop's Dice term is already ~1 at 50 px, so 500 px cost no more
    assert dice_term(per_sample, 500) - dice_term(per_sample, 50) < 0.02
    # batch Dice: 2*100 / (200 + fp) - the false positives keep costing
    assert dice_term(batch, 500) - dice_term(batch, 50) > 0.3
    assert dice_term(batch, 0) == pytest.approx(0.0, abs=5e-3)  # clipping leaves a trace
    assert BCEDiceLoss.from_config(batch.get_config()).batch_dice
