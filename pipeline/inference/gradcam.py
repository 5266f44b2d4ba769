"""Grad-CAM (Selvaraju et al., 2017): where in the slice the classifier saw a tumour.

The heatmap is ReLU(sum_k alpha_k * A_k), where A_k are the feature maps of the backbone's
last convolutional block (`conv5_block3_out` of the nested ResNet50) and alpha_k the spatial
mean of the gradient of the tumour *logit* with respect to them. The logit rather than the
sigmoid probability: a confident classifier saturates the sigmoid and its gradient vanishes.

Keras 3 cannot build a gradient model spanning the outer classifier and a layer *inside* the
nested ResNet50 (the inner layer's symbolic output belongs to the nested graph). So the
classifier is run piece by piece inside a `tf.GradientTape`: the layers before the backbone
(resizing, normalisation), a model over the backbone that returns both the target feature
maps and its output, then the head layers. This needs the classifier to be a chain of layers
around the backbone, as `build_classifier` makes it; the chain's probability is checked
against the classifier's own.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np

__all__ = ["grad_cam"]

BACKBONE_NAME = "resnet50"
TARGET_LAYER = "conv5_block3_out"


def _split_chain(classifier: keras.Model, backbone_name: str) -> tuple[list, keras.Model, list]:
    """The classifier's layers before the backbone, the backbone, and the layers after it."""
    layers = [layer for layer in classifier.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if backbone_name not in names:
        raise ValueError(
            f"classifier {classifier.name!r} has no nested model {backbone_name!r}; layers: {names}"
        )
    at = names.index(backbone_name)
    return layers[:at], layers[at], layers[at + 1 :]


def _logit_of_last(layer: keras.layers.Layer, x):
    """Apply the output layer without its sigmoid when it has one (Dense(1, sigmoid) -> its logit)."""
    from keras import ops

    if isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.sigmoid:
        x = ops.cast(x, "float32")
        logit = ops.matmul(x, ops.cast(layer.kernel, "float32"))
        if layer.use_bias:
            logit = logit + ops.cast(layer.bias, "float32")
        return logit, ops.sigmoid(logit)
    if isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.sigmoid:
        return ops.cast(x, "float32"), ops.sigmoid(ops.cast(x, "float32"))
    out = ops.cast(layer(x, training=False), "float32")
    return out, out


def grad_cam(
    classifier: keras.Model,
    image: np.ndarray,
    backbone_name: str = BACKBONE_NAME,
    layer_name: str = TARGET_LAYER,
) -> np.ndarray:
    """Grad-CAM heatmap of the tumour score for one slice.

    classifier: a model built like `build_classifier` (a chain around a nested backbone).
    image: uint8 (H, W, 3) raw slice, as fed to the pipeline.
    backbone_name, layer_name: the nested model and the convolutional layer inside it.

    Returns float32 (H, W) in [0, 1] (bilinearly upsampled from the feature map's resolution;
    all zero when no feature pushes the score up). Raises ValueError when the classifier does
    not have that structure.
    """
    import tensorflow as tf

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    before, backbone, after = _split_chain(classifier, backbone_name)
    if not after:
        raise ValueError(f"classifier {classifier.name!r} has no layers after {backbone_name!r}")
    try:
        target = backbone.get_layer(layer_name)
    except ValueError as exc:
        raise ValueError(f"nested model {backbone_name!r} has no layer {layer_name!r}") from exc
    features_model = keras.Model(backbone.inputs, [target.output, backbone.output])

    x = tf.convert_to_tensor(image[None].astype(np.float32))
    for layer in before:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        features, y = features_model(x, training=False)
        tape.watch(features)
        for layer in after[:-1]:
            y = layer(y, training=False)
        logit, probability = _logit_of_last(after[-1], y)
        score = logit[:, 0]
    expected = np.asarray(classifier(image[None].astype(np.float32), training=False), np.float32)
    if not np.allclose(np.asarray(probability), expected, atol=1e-3):
        raise ValueError(
            f"classifier {classifier.name!r} is not a simple chain around {backbone_name!r}; "
            "Grad-CAM cannot rebuild it"
        )

    grads = tf.cast(tape.gradient(score, features), tf.float32)[0]  # (h, w, K)
    features = tf.cast(features, tf.float32)[0]
    weights = tf.reduce_mean(grads, axis=(0, 1))  # alpha_k
    cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1)).numpy()
    cam = cv2.resize(cam, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    cam = np.maximum(cam, 0.0)
    peak = float(cam.max())
    return (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)
