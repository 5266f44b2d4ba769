"""Turns raw slices into model inputs: the one place where normalisation is defined.

Both models take raw pixel values (0..255, channels in file order: pre-contrast, FLAIR,
post-contrast) and normalise inside the model with the layers below, so training,
evaluation, inference and the notebook cannot drift apart.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
FLAIR_CHANNEL = 1
MASK_THRESHOLD = 127  # Kaggle masks are 0/255; anything above this is tumour


def classifier_preprocess(images):
    """Raw RGB 0..255 tensor (B, H, W, 3) -> ResNet50 input (channels reordered, ImageNet mean removed)."""
    return keras.applications.resnet50.preprocess_input(ops.cast(images, "float32"))


def segmenter_preprocess(images):
    """Raw 0..255 tensor (B, H, W, 3) -> float32 in [0, 1] for the ResUNet."""
    return ops.cast(images, "float32") / 255.0


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Mask of any integer range (H, W) -> uint8 array of 0/1."""
    return (np.asarray(mask) > MASK_THRESHOLD).astype(np.uint8)


@keras.saving.register_keras_serializable(package="pipeline")
class ClassifierPreprocess(keras.layers.Layer):
    """First layer of the classifier: applies `classifier_preprocess` in float32."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"  # mean subtraction in bfloat16 loses ~1 grey level
        super().__init__(**kwargs)

    def call(self, inputs):
        return classifier_preprocess(inputs)


@keras.saving.register_keras_serializable(package="pipeline")
class SegmenterPreprocess(keras.layers.Layer):
    """First layer of the segmenter: applies `segmenter_preprocess` in float32."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs):
        return segmenter_preprocess(inputs)
