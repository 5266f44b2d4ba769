"""A hand-built evaluation case whose every number is known exactly, and stub models for it.

Each slice's image *encodes* what the stub models will answer: pixel (0, 0) of channel 0 is
the classifier probability x 255 and channel 2 is the segmenter's mask x 255. The stubs
(`StubPipeline`, `stub_segment`, and the Keras `stub_classifier`/`stub_segmenter` for the real
`TumorPipeline`) just read them back, so the expected report follows by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import keras
import numpy as np
import pandas as pd
from keras import ops

SIZE = 8


def _square(r0: int, c0: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[r0 : r0 + h, c0 : c0 + w] = 1
    return mask


def encode_slice(probability_u8: int, prediction: np.ndarray) -> np.ndarray:
    """A uint8 (SIZE, SIZE, 3) image: channel 0 pixel (0, 0) = probability x 255, channel 2 = mask x 255."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 1] = 90  # a plain FLAIR channel for the overlays
    image[..., 2] = prediction.astype(np.uint8) * 255
    image[0, 0, 0] = probability_u8
    return image


@dataclass
class HandBuiltCase:
    """Rows, images and masks of the hand-built case and the exact numbers the report must hold."""

    rows: pd.DataFrame
    images: np.ndarray
    masks: np.ndarray
    threshold: float
    expected: dict


def hand_built_case() -> HandBuiltCase:
    """Three patients, seven 8x8 slices; expected values worked out in the comments.

    P1 s1: GT 4 px, p=0.90 (flagged), seg = GT exactly             -> e2e TP 4
    P1 s2: GT 4 px, p=0.20 (not flagged), seg = GT exactly          -> e2e FN 4 (classifier miss)
    P1 s3: no GT,  p=0.10 (not flagged), seg 2 px                   -> segmenter-alone FP 2 only
      e2e P1: TP 4, FP 0, FN 4 -> Dice 8/12 = 2/3; segmenter alone: TP 8, FP 2 -> 16/18 = 8/9
    P2 s1: GT 6 px, p=0.80 (flagged), seg 3 px of GT + 3 outside    -> TP 3, FP 3, FN 3
    P2 s2: no GT,  p=0.70 (flagged), seg 2 px                       -> e2e false-positive slice
      P2 (both): TP 3, FP 5, FN 3 -> 6/14 = 3/7
    P3 s1: no GT, p=0.30; P3 s2: no GT, p=0.60 (flagged), seg empty -> both empty: Dice 1 (empty="one")
    Classifier at 0.5: labels 1,1,0,1,0,0,0 vs predicted 1,0,0,1,1,0,1 -> TP 2, FN 1, FP 2, TN 2;
    accuracy 4/7; ROC-AUC: 9 of the 12 positive/negative pairs ordered right -> 3/4.
    Segmenter alone on the 3 tumour slices: Dice 1, 1, 1/2 -> mean 5/6, median 1; IoU 1, 1, 1/3 -> mean 7/9.
    """
    p1_gt = _square(2, 2, 2, 2)
    p2_gt = _square(1, 1, 2, 3)  # 6 px
    p2_pred = np.zeros((SIZE, SIZE), np.uint8)
    p2_pred[1, 1:4] = 1  # 3 px inside the GT
    p2_pred[5, 4:7] = 1  # 3 px outside
    fp2 = _square(6, 6, 1, 2)  # 2 px
    empty = np.zeros((SIZE, SIZE), np.uint8)
    # (patient, case, slice, gt, probability*255, segmenter mask)
    spec = [
        ("TCGA_HB_0001", "TCGA_HB_0001_20000101", 1, p1_gt, 230, p1_gt),
        ("TCGA_HB_0001", "TCGA_HB_0001_20000101", 2, p1_gt, 51, p1_gt),
        ("TCGA_HB_0001", "TCGA_HB_0001_20000101", 3, empty, 26, fp2),
        ("TCGA_HB_0002", "TCGA_HB_0002_20000202", 1, p2_gt, 204, p2_pred),
        ("TCGA_HB_0002", "TCGA_HB_0002_20000202", 2, empty, 179, fp2),
        ("TCGA_HB_0003", "TCGA_HB_0003_20000303", 1, empty, 77, empty),
        ("TCGA_HB_0003", "TCGA_HB_0003_20000303", 2, empty, 153, empty),
    ]
    rows = pd.DataFrame(
        {
            "patient_id": [s[0] for s in spec],
            "case": [s[1] for s in spec],
            "slice": [s[2] for s in spec],
            "has_tumor": [bool(s[3].any()) for s in spec],
            "tumor_pixels": [int(s[3].sum()) for s in spec],
        }
    )
    images = np.stack([encode_slice(s[4], s[5]) for s in spec])
    masks = np.stack([s[3] for s in spec]).astype(np.uint8)
    e2e = {"TCGA_HB_0001": Fraction(2, 3), "TCGA_HB_0002": Fraction(3, 7), "TCGA_HB_0003": Fraction(1)}
    seg = {"TCGA_HB_0001": Fraction(8, 9), "TCGA_HB_0002": Fraction(3, 7), "TCGA_HB_0003": Fraction(1)}
    expected = {
        "e2e_patient_dice": {k: float(v) for k, v in e2e.items()},
        "seg_patient_dice": {k: float(v) for k, v in seg.items()},
        "e2e_mean": float(sum(e2e.values()) / 3),
        "e2e_median": float(Fraction(2, 3)),
        "e2e_min": float(Fraction(3, 7)),
        "seg_mean": float(sum(seg.values()) / 3),
        "accuracy": 4 / 7,
        "roc_auc": 0.75,
        "sensitivity": 2 / 3,
        "specificity": 0.5,
        "confusion": {"tn": 2, "fp": 2, "fn": 1, "tp": 2},
        "seg_slice_dice_mean": 5 / 6,
        "seg_slice_dice_median": 1.0,
        "seg_slice_iou_mean": 7 / 9,
        "false_positives": [("TCGA_HB_0002", 2)],
        "false_negatives": [("TCGA_HB_0001", 2, "classifier did not flag")],
    }
    return HandBuiltCase(rows, images, masks, 0.5, expected)


# --------------------------------------------------------------------------- stubs


@dataclass
class StubResult:
    """The fields of `SliceResult` the evaluation reads."""

    probability: float
    is_tumor: bool
    mask: np.ndarray


class StubPipeline:
    """Reads the encoded answers back, gating like `TumorPipeline` (probability >= threshold)."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.calls = 0

    def predict(self, images):
        self.calls += 1
        out = []
        for image in images:
            probability = float(image[0, 0, 0]) / 255.0
            flagged = probability >= self.threshold
            mask = stub_segment(image[None])[0] if flagged else np.zeros(image.shape[:2], np.uint8)
            out.append(StubResult(probability, flagged, mask))
        return out


def stub_segment(batch: np.ndarray) -> np.ndarray:
    """Segmenter-alone stub: the mask encoded in channel 2 of each image of the batch."""
    return (np.asarray(batch)[..., 2] > 127).astype(np.uint8)


@keras.saving.register_keras_serializable(package="tests")
class ReadProbability(keras.layers.Layer):
    """Stub classifier layer: (B, H, W, 3) raw pixels -> (B, 1) = pixel (0, 0) of channel 0 / 255."""

    def call(self, inputs):
        return ops.reshape(ops.cast(inputs[:, 0, 0, 0], "float32") / 255.0, (-1, 1))


@keras.saving.register_keras_serializable(package="tests")
class ReadMask(keras.layers.Layer):
    """Stub segmenter layer: (B, H, W, 3) raw pixels -> (B, H, W, 1) = channel 2 / 255."""

    def call(self, inputs):
        return ops.cast(inputs[..., 2:3], "float32") / 255.0


def stub_classifier() -> keras.Model:
    """A Keras classifier that answers the probability encoded in each image."""
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, ReadProbability()(inputs), name="stub_classifier")


def stub_segmenter() -> keras.Model:
    """A Keras segmenter that answers the mask encoded in each image."""
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, ReadMask()(inputs), name="stub_segmenter")


def evaluate_hand_built(out, n_boot: int = 200):
    """(case, EvaluationResult) of the stub pipeline on `hand_built_case()`, written into `out`."""
    from pipeline.evaluation import evaluate as ev

    case = hand_built_case()
    result = ev.evaluate_pipeline(
        StubPipeline(case.threshold), stub_segment, case.rows, case.images, case.masks, out,
        threshold=case.threshold, batch_size=3, n_boot=n_boot, seed=7,
        provenance={"split": "hand-built", "models_dir": "stubs"}, progress=False,
    )
    return case, result
