"""Stage 1: tumour / no-tumour slice classifier, an ImageNet ResNet50 with a small new head.

    raw slice (H, W, 3) 0..255, file channel order
      -> Resizing(image_size)            (float32: interpolating 0..255 in bf16 would round)
      -> ClassifierPreprocess            (caffe preprocessing of keras.applications.resnet50)
      -> ResNet50 backbone (nested model "resnet50", include_top=False)
      -> GlobalAveragePooling2D -> Dropout -> Dense(relu) -> Dropout -> Dense(1, sigmoid, float32)

Transfer learning follows the Keras guide: phase 1 trains the head with the backbone frozen
(`set_backbone_trainable(model, "frozen")`), phase 2 unfreezes all or the top N stages and
fine-tunes with a ~10x smaller learning rate. Recompile after changing trainability.

BatchNormalization stays in inference mode: with pretrained weights the backbone is called
with `training=False` inside the functional graph, so its BN layers always normalise with the
ImageNet moving statistics, even once unfrozen (small medical batches would otherwise
overwrite them). In addition, `set_backbone_trainable` keeps BN layers frozen (gamma/beta
untrained) when unfreezing. With `weights="none"` there are no statistics worth keeping, so
the backbone is called without `training=False` and BN learns normally; pass
`freeze_batchnorm=False` to `set_backbone_trainable` in that case.
"""

from __future__ import annotations

import os

import keras

from pipeline.models.backbone_weights import resolve_backbone_weights
from pipeline.preprocessing import ClassifierPreprocess

BACKBONE_NAME = "resnet50"
OUTPUT_NAME = "tumor_probability"
RESIZE_NAME = "resize"  # kept in float32 under any policy (`precision.FLOAT32_LAYERS`)
STAGES = (5, 4, 3, 2)  # ResNet50 residual stages from the top; the stem is conv1
MIN_IMAGE_SIZE = 32  # keras.applications.ResNet50 refuses smaller inputs


def build_classifier(image_size: int = 256, weights: str | os.PathLike | None = "imagenet",
                     dropout: float = 0.3, dense_units: int = 256, name: str = "classifier") -> keras.Model:
    """Build the slice classifier; see the module docstring for the layer stack.

    Input: float batch (B, H, W, 3), raw 0..255 in file channel order, any H and W (resized
    inside to `image_size`). Output: (B, 1) float32 tumour probability. `weights` is
    `"imagenet"`, `"none"` or a weights-file path (see `resolve_backbone_weights`). The
    backbone is trainable as built; call `set_backbone_trainable` to choose a strategy.
    """
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} for ResNet50, got {image_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    image_size = int(image_size)
    weights_path = resolve_backbone_weights(weights)

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Resizing(image_size, image_size, name=RESIZE_NAME, dtype="float32")(inputs)
    x = ClassifierPreprocess(name="preprocess")(x)
    backbone = keras.applications.ResNet50(include_top=False, weights=weights_path,
                                           input_shape=(image_size, image_size, 3), name=BACKBONE_NAME)
    # Pretrained: keep BN on the ImageNet statistics for good (see module docstring).
    x = backbone(x, training=False) if weights_path is not None else backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout_1")(x)
    x = keras.layers.Dense(dense_units, activation="relu", kernel_initializer="he_normal",
                           name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout_2")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)


def get_backbone(model: keras.Model) -> keras.Model:
    """The nested ResNet50 of a classifier built by `build_classifier`."""
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError as exc:
        raise ValueError(f"model {model.name!r} has no nested {BACKBONE_NAME!r} backbone") from exc


def _stage_prefixes(top_n: int) -> tuple[str, ...]:
    if not 0 <= top_n <= len(STAGES):
        raise ValueError(f"number of stages to unfreeze must be in 0..{len(STAGES)}, got {top_n}")
    return tuple(f"conv{stage}_" for stage in STAGES[:top_n])


def set_backbone_trainable(model: keras.Model, mode: str | int, *,
                           freeze_batchnorm: bool = True) -> dict[str, int]:
    """Choose which backbone layers train; the head always trains.

    `mode`: `"frozen"` (every backbone layer `.trainable = False`), `"all"` (every layer
    trainable) or an int N (only the top N of the stages conv5, conv4, conv3, conv2, chosen
    by layer-name prefix `conv{S}_`; N = 0 is frozen, N = 4 leaves only the conv1 stem frozen).
    With `freeze_batchnorm` (default) BatchNormalization layers stay frozen when unfreezing.
    Recompile the model afterwards. Returns counts of trainable weight tensors:
    `{"backbone": ..., "head": ..., "total": ...}`.
    """
    backbone = get_backbone(model)
    if mode == "frozen":
        prefixes: tuple[str, ...] | None = ()
    elif mode == "all":
        prefixes = None
    elif isinstance(mode, int) and not isinstance(mode, bool):
        prefixes = _stage_prefixes(mode)
    elif isinstance(mode, str) and mode.strip().isdigit():
        prefixes = _stage_prefixes(int(mode))
    else:
        raise ValueError(f"backbone mode must be 'frozen', 'all' or a number of stages 0..4, got {mode!r}")

    # The container must be trainable for any child to be; then set each layer object.
    backbone.trainable = prefixes != ()
    for layer in backbone.layers:
        wanted = prefixes is None or layer.name.startswith(prefixes)
        if freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            wanted = False
        layer.trainable = wanted
    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    return trainable_counts(model)


def trainable_counts(model: keras.Model) -> dict[str, int]:
    """Number of trainable weight tensors in the backbone, the rest of the model, and in total."""
    backbone = len(get_backbone(model).trainable_weights)
    total = len(model.trainable_weights)
    return {"backbone": backbone, "head": total - backbone, "total": total}
