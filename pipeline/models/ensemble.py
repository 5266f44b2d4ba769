"""Several segmenters as one: their probabilities averaged before the threshold, in one Keras model.

An ensemble is an ordinary functional model ``image -> member_0 .. member_{n-1} -> mean``, saved
as one ``segmenter.keras``. So everything that handles a segmenter handles an ensemble
unchanged: the pair's SHA-256 sums, `safe_mode` loading, the OpenVINO export and INT8 (the
members become one graph), the bench and diagnose. The members keep their own
weights and designs (fold models, seeds, a ResUNet next to a ResNet50-encoder U-Net); each is
renamed ``member_<i>`` so their names cannot collide.

The gate keeps most slices away from the segmenter, so an ensemble of n members costs about
n times the segmenter's time on flagged slices only.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from pipeline.models.resunet import OUTPUT_NAME

MEMBER_PREFIX = "member_"


def _renamed(model: keras.Model, name: str) -> keras.Model:
    """A copy of functional `model` named `name`, with the same weights."""
    config = model.get_config()
    config["name"] = name
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def build_ensemble(members: Sequence[keras.Model], name: str = "segmenter") -> keras.Model:
    """Members (each (B, H, W, 3) raw 0..255 -> (B, H, W, 1) probability) -> a model giving their mean.

    The mean is computed in float32. Raises ValueError for fewer than two members or members
    whose outputs are not one probability map.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 segmenters, got {len(members)}")
    for i, member in enumerate(members):
        if tuple(member.output.shape[-1:]) != (1,):
            raise ValueError(f"member {i} ({member.name}) does not output one probability map: "
                             f"{member.output.shape}")
    inputs = keras.Input(shape=(None, None, 3), name="image")
    outputs = [_renamed(m, f"{MEMBER_PREFIX}{i}")(inputs) for i, m in enumerate(members)]
    mean = keras.layers.Average(dtype="float32", name=OUTPUT_NAME)(outputs)
    return keras.Model(inputs, mean, name=name)


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The member segmenters of an ensemble built by `build_ensemble` ([] for a single segmenter)."""
    return [layer for layer in model.layers
            if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)]
