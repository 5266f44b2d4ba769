"""Stage 2: ResUNet segmenter, the residual U-Net of the course material, generalised in depth.

With `base_filters=F` and `depth=D` (course: F=16, D=4):

* SegmenterPreprocess (0..255 -> [0, 1], float32)
* encoder level 0: two 3x3 conv + ReLU + BatchNorm (F filters), then 2x2 max-pooling;
  levels 1..D-1: a res-block with F*2^level filters, then 2x2 max-pooling;
* bottleneck: a res-block with F*2^D filters;
* decoder, levels D-1..0: 2x2 up-sampling, concatenate the encoder features of that level,
  res-block with F*2^level filters (the level-0 one is the final res-block);
* 1x1 convolution with sigmoid, in float32: (B, H, W, 1) tumour probability.

A res-block is conv3x3-BN-ReLU, conv3x3-BN, plus a 1x1-conv + BN projection shortcut, added
and passed through ReLU. All convolutions use He-normal initialisation. The network is fully
convolutional: any input whose height and width are divisible by 2^depth works.
"""

from __future__ import annotations

import keras

from pipeline.preprocessing import SegmenterPreprocess

OUTPUT_NAME = "mask_probability"
_INIT = "he_normal"


def _conv_bn_relu(x, filters: int, name: str, *, relu_first: bool = False):
    """3x3 conv, BN and ReLU; `relu_first` gives the stem's conv -> ReLU -> BN order."""
    x = keras.layers.Conv2D(filters, 3, padding="same", kernel_initializer=_INIT, name=f"{name}_conv")(x)
    if relu_first:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        return keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def res_block(x, filters: int, name: str):
    """Residual block: two 3x3 conv/BN(/ReLU) plus a 1x1 conv/BN shortcut, added, then ReLU."""
    shortcut = keras.layers.Conv2D(filters, 1, padding="same", kernel_initializer=_INIT,
                                   name=f"{name}_shortcut_conv")(x)
    shortcut = keras.layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
    y = _conv_bn_relu(x, filters, f"{name}_1")
    y = keras.layers.Conv2D(filters, 3, padding="same", kernel_initializer=_INIT, name=f"{name}_2_conv")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def check_input_size(height: int | None, width: int | None, depth: int) -> None:
    """Raise ValueError when a known side is not divisible by 2**depth (None = decided at run time)."""
    step = 2**depth
    bad = [s for s in (height, width) if s is not None and s % step]
    if bad:
        raise ValueError(f"ResUNet with depth {depth} needs height and width divisible by {step}; "
                         f"got {height}x{width}")


def build_resunet(base_filters: int = 16, depth: int = 4, input_shape: tuple = (None, None, 3),
                  name: str = "segmenter") -> keras.Model:
    """Build the ResUNet (see the module docstring).

    Input: float batch (B, H, W, C) of raw 0..255 pixels (file channel order), H and W
    divisible by 2**depth. Output: (B, H, W, 1) float32 per-pixel tumour probability.
    Raises ValueError for a concrete `input_shape` whose sides are not divisible by 2**depth.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base_filters must be >= 1, got depth={depth}, "
                         f"base_filters={base_filters}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    check_input_size(input_shape[0], input_shape[1], depth)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = SegmenterPreprocess(name="preprocess")(inputs)

    skips = []
    x = _conv_bn_relu(x, base_filters, "enc0_a", relu_first=True)
    x = _conv_bn_relu(x, base_filters, "enc0_b", relu_first=True)
    for level in range(depth):
        if level > 0:
            x = res_block(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)

    x = res_block(x, base_filters * 2**depth, "bottleneck")

    for level in reversed(range(depth)):
        x = keras.layers.UpSampling2D(2, name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = res_block(x, base_filters * 2**level, f"dec{level}")

    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=_INIT,
                                  dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)
