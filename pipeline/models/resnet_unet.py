"""Stage 2, pretrained design: a U-Net whose encoder is the ImageNet ResNet50.

    raw slice (B, H, W, 3) 0..255, file channel order
      -> ClassifierPreprocess (caffe: BGR, ImageNet mean removed), the input ResNet50 was trained on
      -> encoder "resnet50_encoder": ResNet50 cut after stage `encoder_stages` (3, 4 or 5),
         returning the features at strides 2 (conv1), 4 (stage 2), 8 (stage 3), 16 (stage 4), 32 (stage 5)
      -> 1x1 conv + BN + ReLU reduces the deepest features to `decoder_filters[0]`
      -> per level, deepest first: 2x up-sampling, concatenate the encoder skip of that stride,
         a residual block of the course (`resunet.res_block`) with `decoder_filters[i]` filters
      -> last level at full resolution: the skip is a small full-resolution stem on the [0, 1]
         input (two 3x3 convs), because ResNet50 has no stride-1 feature map
      -> 1x1 conv with sigmoid in float32: (B, H, W, 1) tumour probability

Why cut the encoder: stage 5 holds 15M of ResNet50's 23.5M parameters and works at stride 32
(an 8x8 map on a 256 px slice); without it (`encoder_stages=4`) the segmenter has about 12M
parameters and a release pair stays under the 100 MB cap.

BatchNorm: the encoder is always called with ``training=False``, so its BN layers normalise
with the ImageNet moving statistics, also in the stages that are fine-tuned (their convolution
weights train; BN gamma/beta stay frozen). Batches of 16 MRI crops are too small and too
alike to re-estimate statistics that the pretrained convolutions were built around; the
decoder's BN layers are new and train normally. `encoder_trainable` says how many of the top
stages used are trainable (0: the whole encoder frozen; the stem is never trained).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras

from pipeline.models.backbone_weights import resolve_backbone_weights
from pipeline.models.resunet import OUTPUT_NAME, _conv_bn_relu, res_block
from pipeline.preprocessing import ClassifierPreprocess, SegmenterPreprocess

ENCODER_NAME = "resnet50_encoder"
# ResNet50 (keras.applications) layer whose output is the skip at each stage; stride = 2**stage
SKIP_LAYERS = {1: "conv1_relu", 2: "conv2_block3_out", 3: "conv3_block4_out", 4: "conv4_block6_out",
               5: "conv5_block3_out"}
DEFAULT_DECODER_FILTERS = (256, 128, 64, 32)


def _check(encoder_stages: int, decoder_filters: Sequence[int], encoder_trainable: int) -> None:
    if encoder_stages not in (3, 4, 5):
        raise ValueError(f"encoder_stages must be 3, 4 or 5 (ResNet50 stages used), got {encoder_stages}")
    if len(decoder_filters) != encoder_stages or min(decoder_filters) < 1:
        raise ValueError(f"decoder_filters needs one positive width per up-sampling level "
                         f"({encoder_stages}), got {list(decoder_filters)}")
    if not 0 <= encoder_trainable <= encoder_stages - 1:
        raise ValueError(f"encoder_trainable must be in 0..{encoder_stages - 1}, "
                         f"got {encoder_trainable}")


def build_encoder(encoder_stages: int = 4, weights: str | os.PathLike | None = "imagenet") -> keras.Model:
    """ResNet50 cut after `encoder_stages` -> model with one output per stride 2, 4, ... 2**encoder_stages.

    Input: caffe-preprocessed float batch (B, H, W, 3). `weights`: "imagenet", "none" or a file
    (`resolve_backbone_weights`); loaded into the full ResNet50 before it is cut.
    """
    backbone = keras.applications.ResNet50(include_top=False, weights=resolve_backbone_weights(weights),
                                           input_shape=(None, None, 3))
    outputs = [backbone.get_layer(SKIP_LAYERS[s]).output for s in range(1, encoder_stages + 1)]
    return keras.Model(backbone.inputs, outputs, name=ENCODER_NAME)


def set_encoder_trainable(model: keras.Model, encoder_trainable: int) -> list[str]:
    """Make the top `encoder_trainable` stages of the encoder trainable, the rest frozen; BN always frozen.

    Returns the sorted stage prefixes made trainable (e.g. ["conv4_"]). Recompile afterwards.
    """
    encoder = model.get_layer(ENCODER_NAME)
    deepest = max(int(layer.name[4]) for layer in encoder.layers if layer.name[:4] == "conv" and
                  layer.name[4:5].isdigit())
    prefixes = tuple(f"conv{s}_" for s in range(deepest - encoder_trainable + 1, deepest + 1))
    encoder.trainable = True
    for layer in encoder.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = bool(encoder_trainable) and layer.name.startswith(prefixes) and not is_bn
    return sorted(prefixes) if encoder_trainable else []


def build_resnet_unet(encoder_stages: int = 4, decoder_filters: Sequence[int] = DEFAULT_DECODER_FILTERS,
                      encoder_trainable: int = 1, weights: str | os.PathLike | None = "imagenet",
                      stem_filters: int = 16, name: str = "segmenter") -> keras.Model:
    """Build the ResNet50-encoder U-Net (see the module docstring).

    Input: float batch (B, H, W, 3) of raw 0..255 pixels, H and W divisible by 2**encoder_stages.
    Output: (B, H, W, 1) float32 per-pixel tumour probability. `decoder_filters` lists the
    widths from the deepest level up (one per level: `encoder_stages` of them).
    """
    decoder_filters = tuple(int(f) for f in decoder_filters)
    _check(encoder_stages, decoder_filters, encoder_trainable)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    encoder = build_encoder(encoder_stages, weights)
    skips = encoder(ClassifierPreprocess(name="encoder_preprocess")(inputs), training=False)
    stem = SegmenterPreprocess(name="preprocess")(inputs)
    stem = _conv_bn_relu(stem, stem_filters, "stem_a")
    skips = [_conv_bn_relu(stem, stem_filters, "stem_b"), *skips]  # index = log2(stride)

    x = keras.layers.Conv2D(decoder_filters[0], 1, kernel_initializer="he_normal",
                            name="bridge_conv")(skips[-1])
    x = keras.layers.BatchNormalization(name="bridge_bn")(x)
    x = keras.layers.ReLU(name="bridge_relu")(x)
    for i, filters in enumerate(decoder_filters):
        level = encoder_stages - 1 - i  # stride 2**level after this up-sampling
        x = keras.layers.UpSampling2D(2, name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = res_block(x, filters, f"dec{level}")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name=name)
    set_encoder_trainable(model, encoder_trainable)
    return model
