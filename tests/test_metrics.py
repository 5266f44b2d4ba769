"""Metrics on tiny hand-computed masks: exact fractions, every empty case, Keras parity, sklearn parity."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from pipeline.metrics import (
    DiceMetric,
    IoUMetric,
    bootstrap_ci,
    classification_summary,
    confusion_counts,
    dice_from_counts,
    dice_score,
    iou_from_counts,
    iou_score,
    patient_dice,
    patient_scores,
    score_summary,
    slice_scores,
)

# |A| = 4, |B| = 5, |A & B| = 3, |A | B| = 6
A = np.array([[1, 1, 1],
              [1, 0, 0],
              [0, 0, 0]], np.uint8)
B = np.array([[1, 1, 1],
              [0, 1, 1],
              [0, 0, 0]], np.uint8)
EMPTY = np.zeros((3, 3), np.uint8)


def _keras_value(metric) -> float:
    return float(keras.ops.convert_to_numpy(metric.result()))


# --------------------------------------------------------------------------- counts and scores


def test_the_3x3_example():
    assert confusion_counts(A, B) == (3, 2, 1, 3)
    assert iou_score(A, B) == 0.5  # 3 / 6
    assert dice_score(A, B) == pytest.approx(2 / 3)  # 2 * 3 / (4 + 5) = 6 / 9
    assert dice_score(B, A) == dice_score(A, B)


@pytest.mark.parametrize(
    ("truth", "pred", "one", "nan"),
    [
        (EMPTY, EMPTY, 1.0, math.nan),  # nothing to find, nothing found
        (EMPTY, B, 0.0, 0.0),  # prediction on an empty ground truth
        (A, EMPTY, 0.0, 0.0),  # missed tumour
        (A, A, 1.0, 1.0),  # both non-empty, perfect
    ],
)
def test_every_empty_combination_under_both_conventions(truth, pred, one, nan):
    for fn in (dice_score, iou_score):
        assert fn(truth, pred, empty="one") == one
        got = fn(truth, pred, empty="nan")
        assert (math.isnan(got) and math.isnan(nan)) or got == nan


def test_unknown_empty_convention_is_rejected():
    with pytest.raises(ValueError, match="one"):
        dice_score(A, B, empty="zero")


def test_from_counts_is_vectorised():
    tp, fp, fn = np.array([3, 0, 0]), np.array([2, 0, 4]), np.array([1, 0, 0])
    np.testing.assert_allclose(dice_from_counts(tp, fp, fn, "nan"), [6 / 9, np.nan, 0.0])
    np.testing.assert_allclose(iou_from_counts(tp, fp, fn, "one"), [0.5, 1.0, 0.0])


def test_threshold_is_strict_and_configurable():
    truth = np.array([1, 1, 0, 0])
    probs = np.array([0.9, 0.5, 0.4, 0.2])
    # > 0.5: predicts only the first -> TP 1, FN 1 -> Dice 2/3
    assert dice_score(truth, probs) == pytest.approx(2 / 3)
    # > 0.3: TP 2, FP 1 -> Dice 4/5
    assert dice_score(truth, probs, threshold=0.3) == pytest.approx(4 / 5)
    assert confusion_counts(truth, probs, threshold=0.3) == (2, 1, 0, 1)


def test_counts_per_slice_and_shape_check():
    stack = np.stack([A, B, EMPTY])
    preds = np.stack([B, B, A])
    tp, fp, fn, tn = confusion_counts(stack, preds, axis=(1, 2))
    np.testing.assert_array_equal(tp, [3, 5, 0])
    np.testing.assert_array_equal(fp, [2, 0, 4])
    np.testing.assert_array_equal(fn, [1, 0, 0])
    np.testing.assert_array_equal(tp + fp + fn + tn, 9)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_counts(A, np.zeros((4, 4)))


def test_slice_scores_table():
    table = slice_scores(np.stack([A, EMPTY, EMPTY]), np.stack([B, EMPTY, A]), empty="nan")
    assert list(table.columns) == ["tp", "fp", "fn", "gt_pixels", "pred_pixels", "dice", "iou"]
    assert table["tp"].tolist() == [3, 0, 0] and table["fp"].tolist() == [2, 0, 4]
    assert table["gt_pixels"].tolist() == [4, 0, 0] and table["pred_pixels"].tolist() == [5, 0, 4]
    assert table.loc[0, "dice"] == pytest.approx(2 / 3) and table.loc[0, "iou"] == 0.5
    assert math.isnan(table.loc[1, "dice"]) and table.loc[2, "dice"] == 0.0


def test_slice_scores_agree_with_direct_counts_across_chunks():
    rng = np.random.default_rng(1)
    masks = (rng.random((150, 8, 8, 1)) > 0.8).astype(np.uint8)  # more slices than one chunk
    probs = rng.random((150, 8, 8, 1)).astype(np.float32)
    table = slice_scores(masks, probs, threshold=0.7)
    tp, fp, fn, _ = confusion_counts(masks, probs, 0.7, axis=(1, 2, 3))
    np.testing.assert_array_equal(table["tp"], tp)
    np.testing.assert_array_equal(table["fp"], fp)
    np.testing.assert_array_equal(table["fn"], fn)


def _crafted_patients():
    """Patient P: a 8-px tumour found exactly + a 2-px tumour missed; patient Q: no tumour at all."""
    big = np.zeros((4, 4), np.uint8)
    big[:2, :] = 1  # 8 px
    small = np.zeros((4, 4), np.uint8)
    small[3, :2] = 1  # 2 px
    none = np.zeros((4, 4), np.uint8)
    masks = np.stack([big, small, none, none])
    preds = np.stack([big, none, none, none]).astype(np.float32)
    return ["P", "P", "Q", "Q"], masks, preds


def test_patient_volume_dice_differs_from_the_mean_of_slice_dice():
    ids, masks, preds = _crafted_patients()
    per_slice = slice_scores(masks[:2], preds[:2])
    assert per_slice["dice"].tolist() == [1.0, 0.0]  # mean of slice Dice: 1/2
    table = patient_scores(ids, masks, preds, empty="one")
    assert table["patient_id"].tolist() == ["P", "Q"]
    p = table.iloc[0]
    assert (p.n_slices, p.tp, p.fp, p.fn, p.gt_pixels, p.pred_pixels) == (2, 8, 0, 2, 10, 8)
    assert p.dice == pytest.approx(8 / 9)  # 2*8 / (2*8 + 0 + 2), not 1/2
    assert p.iou == pytest.approx(8 / 10)
    assert table.iloc[1].dice == 1.0
    assert math.isnan(patient_scores(ids, masks, preds, empty="nan").iloc[1].dice)
    series = patient_dice(ids, masks, preds)
    assert series.to_dict() == pytest.approx({"P": 8 / 9, "Q": 1.0})


def test_patient_scores_rejects_misaligned_ids():
    ids, masks, preds = _crafted_patients()
    with pytest.raises(ValueError, match="3 patient ids for 4 slices"):
        patient_scores(ids[:3], masks, preds)


def test_score_summary_reports_empty_cases():
    table = slice_scores(np.stack([A, EMPTY, EMPTY, A]), np.stack([B, EMPTY, A, EMPTY]), empty="nan")
    summary = score_summary(table, empty="nan")
    assert summary["n"] == 4 and summary["n_scored"] == 3
    assert summary["n_gt_empty"] == 2 and summary["n_both_empty"] == 1
    assert summary["n_pred_on_empty_gt"] == 1 and summary["n_missed_gt"] == 1
    assert summary["dice_mean"] == pytest.approx((2 / 3 + 0 + 0) / 3)


# --------------------------------------------------------------------------- Keras metrics


def _batches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = (rng.random((4, 8, 8, 1)) > 0.7).astype(np.float32)
        if i == 1:
            truth[0] = 0  # an empty ground-truth slice
        probs = rng.random((4, 8, 8, 1)).astype(np.float32)
        probs[0, ...] = 0.0 if i == 1 else probs[0]  # and an empty prediction on it
        out.append((truth, probs))
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_keras_metrics_equal_numpy_over_several_batches(threshold):
    batches = _batches()
    metrics = [DiceMetric(threshold=threshold), IoUMetric(threshold=threshold)]
    for truth, probs in batches:
        for metric in metrics:
            metric.update_state(truth, probs)
    truth = np.concatenate([b[0] for b in batches])
    probs = np.concatenate([b[1] for b in batches])
    assert _keras_value(metrics[0]) == pytest.approx(dice_score(truth, probs, threshold), rel=1e-6)
    assert _keras_value(metrics[1]) == pytest.approx(iou_score(truth, probs, threshold), rel=1e-6)
    # the global Dice is not the mean of per-batch Dice
    batch_mean = np.mean([dice_score(t, p, threshold) for t, p in batches])
    assert _keras_value(metrics[0]) != pytest.approx(batch_mean, rel=1e-6)


def test_keras_metrics_reset_ignore_weights_and_accept_bfloat16():
    metric = DiceMetric()
    metric.update_state(A[None, ..., None], B[None, ..., None])
    assert _keras_value(metric) == pytest.approx(2 / 3)
    metric.reset_state()
    assert _keras_value(metric) == 1.0  # nothing seen: empty convention "one"
    metric.update_state(A[None, ..., None], tf.cast(B[None, ..., None], tf.bfloat16),
                        sample_weight=np.full((1, 3, 3), 5.0))
    assert _keras_value(metric) == pytest.approx(2 / 3)
    iou = IoUMetric()
    iou.update_state(EMPTY[None], A[None])
    assert _keras_value(iou) == 0.0  # prediction on an empty ground truth


def test_keras_metric_in_a_compiled_model_matches_numpy():
    inputs = keras.Input((3, 3, 1))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss="mse", metrics=[DiceMetric(), IoUMetric()])
    x = np.stack([A, B, EMPTY]).astype(np.float32)[..., None]
    y = np.stack([B, B, EMPTY]).astype(np.float32)[..., None]
    result = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    assert result["dice"] == pytest.approx(dice_score(y, x), rel=1e-6)
    assert result["iou"] == pytest.approx(iou_score(y, x), rel=1e-6)


@pytest.mark.parametrize("cls", [DiceMetric, IoUMetric])
def test_metric_serialisation_round_trip(cls):
    metric = cls(threshold=0.3, name="custom")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is cls
    assert restored.threshold == 0.3 and restored.name == "custom"
    assert restored.get_config() == metric.get_config()


def test_model_compiled_with_metrics_reloads_in_safe_mode(tmp_path):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="binary_crossentropy",
                  metrics=[DiceMetric(threshold=0.4), IoUMetric()])
    truth, probs = _batches(n=1)[0]
    model.evaluate(probs, truth, verbose=0)  # builds the compiled metrics
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode=True, no custom_objects
    before = model.evaluate(probs, truth, verbose=0, return_dict=True)
    after = loaded.evaluate(probs, truth, verbose=0, return_dict=True)
    assert after == pytest.approx(before)
    assert {"dice", "iou"} <= set(after)


# --------------------------------------------------------------------------- classification


def test_classification_summary_matches_sklearn():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.6, 0.3, 0.2, 0.7, 0.1, 0.4, 0.8])
    s = classification_summary(labels, probs)
    preds = (probs >= 0.5).astype(int)  # TP 3, FN 1, FP 1, TN 3
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (3, 1, 1, 3)
    assert s["confusion_matrix"] == [[3, 1], [1, 3]]
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["sensitivity"] == s["recall"] == pytest.approx(3 / 4)
    assert s["specificity"] == pytest.approx(3 / 4)
    assert s["precision"] == pytest.approx(skm.precision_score(labels, preds))
    assert s["f1"] == pytest.approx(skm.f1_score(labels, preds))
    assert s["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert s["roc_auc"] == pytest.approx(13 / 16)  # 13 of 16 positive/negative pairs ranked right
    assert s["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert s["notes"] == []
    assert classification_summary(labels, probs, threshold=0.25)["tp"] == 4
    # A probability equal to the threshold is positive, as in the pipeline's gate.
    assert classification_summary(labels, probs, threshold=0.3)["tp"] == 4


def test_classification_summary_handles_a_single_class():
    s = classification_summary([0, 0, 0], [0.1, 0.7, 0.2])
    assert math.isnan(s["roc_auc"]) and math.isnan(s["pr_auc"]) and math.isnan(s["sensitivity"])
    assert s["specificity"] == pytest.approx(2 / 3) and s["fp"] == 1
    assert any("one class" in note for note in s["notes"])
    s = classification_summary(np.ones((2, 1)), np.array([[0.9], [0.8]]))
    assert s["accuracy"] == 1.0 and math.isnan(s["specificity"]) and math.isnan(s["roc_auc"])


def test_classification_summary_rejects_bad_labels():
    with pytest.raises(ValueError, match="0/1"):
        classification_summary([0, 2], [0.1, 0.9])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(3)
    dice = rng.beta(5, 2, size=40)
    ci = bootstrap_ci(dice, n_boot=500, seed=7)
    assert ci.estimate == pytest.approx(dice.mean())
    assert ci.low < ci.estimate < ci.high
    assert ci.n_groups == 40 and ci.n_boot == 500
    assert bootstrap_ci(dice, n_boot=500, seed=7) == ci
    assert bootstrap_ci(dice, n_boot=500, seed=8) != ci
    assert bootstrap_ci(dice, n_boot=500, seed=7, alpha=0.5).high < ci.high  # a narrower interval


def test_bootstrap_ci_ignores_nan_values():
    values = np.array([0.2, np.nan, 0.8, 0.6, 0.4])
    ci = bootstrap_ci(values, n_boot=200)
    assert ci.estimate == pytest.approx(0.5)
    assert 0.2 <= ci.low <= ci.estimate <= ci.high <= 0.8


def test_bootstrap_cluster_and_function_forms_agree():
    rng = np.random.default_rng(5)
    groups = np.repeat([f"p{i}" for i in range(12)], rng.integers(1, 6, size=12))
    values = rng.random(len(groups))
    cluster = bootstrap_ci(values, groups, n_boot=300, seed=2)
    by_function = bootstrap_ci(lambda rows: values[rows].mean(), groups, n_boot=300, seed=2)
    assert cluster.n_groups == 12
    assert cluster.estimate == pytest.approx(values.mean())
    assert by_function.estimate == pytest.approx(cluster.estimate)
    assert by_function.low == pytest.approx(cluster.low) and by_function.high == pytest.approx(cluster.high)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(lambda rows: 0.0)
