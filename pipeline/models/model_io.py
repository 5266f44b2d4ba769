"""Saving and loading models, and the trained pair that inference and evaluation use.

A pair directory holds

    classifier.keras   stage 1, saved without optimizer state
    segmenter.keras    stage 2, saved without optimizer state
    pipeline.json      metadata (`pipeline.models.pair_artifact.PairArtifact`): the operating
                       point (threshold, seg_threshold, min_component_px, ...), tile_size,
                       classifier_image_size, policy (dtype policy used in training), created,
                       versions, and the sha256 of each model file (required, checked on load)
    SHA256SUMS         `sha256sum -c` list of the files and pipeline.json (required, checked on load)

`pipeline.json` is written last, so its presence marks a complete pair. Models load with
`safe_mode=True` and `compile=False` by default: the files carry no optimizer state, and
inference needs none.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras

from pipeline.errors import DataError
from pipeline.io_utils import atomic_save, sha256_of
from pipeline.models.pair_artifact import (
    CLASSIFIER_FILE,
    META_FILE,
    SEGMENTER_FILE,
    SUMS_FILE,
    PairArtifact,
    read_pair_meta,
    write_pair_meta,
)

__all__ = [
    "CLASSIFIER_FILE",
    "META_FILE",
    "SEGMENTER_FILE",
    "ModelPair",
    "load_model",
    "load_pair",
    "read_pair_meta",
    "save_model",
    "save_pair",
    "sha256_of",
]

log = logging.getLogger(__name__)

META_FORMAT = 1  # bump when the meaning of pipeline.json changes
DEFAULT_TILE_SIZE = 256  # native slice size of the LGG data

# Modules whose registered layers, losses and metrics a saved model may reference.
_SERIALISABLE_MODULES = ("pipeline.preprocessing", "pipeline.losses", "pipeline.metrics")


def register_custom_objects() -> None:
    """Import the modules that register the pipeline's Keras objects."""
    for name in _SERIALISABLE_MODULES:
        importlib.import_module(name)


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save `model` as a `.keras` file at `path` atomically, without optimizer state.

    Keras 3 ignores `include_optimizer` for `.keras` files (a compiled ResNet50 classifier
    then weighs 289 MB instead of 96 MB, two thirds of it Adam moments), and `clone_model`
    recompiles its clone. So a compiled model is rebuilt from its config (same architecture,
    dtype policies and trainable flags, never compiled), given the trained weights, and that
    copy is saved. Returns `path`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"model file name must end with .keras: {path}")
    to_save = model
    if getattr(model, "optimizer", None) is not None:
        to_save = model.__class__.from_config(model.get_config())
        to_save.set_weights(model.get_weights())
    atomic_save(path, to_save.save)
    return path


def load_model(path: str | os.PathLike, expected_sha256: str | None = None, *,
               compile: bool = False) -> keras.Model:
    """Load a `.keras` model with `safe_mode=True`.

    `expected_sha256`: when given, the file's hash must match (DataError naming the file
    otherwise). `compile=False` (default) skips restoring the loss/metrics; pass True to
    get the compiled model back for continued training.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("model file not found", files=[path])
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise DataError(f"sha256 mismatch: the file has {actual}, {expected_sha256} was recorded; "
                            "it was modified or replaced after training", files=[path])
    register_custom_objects()
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except (ValueError, OSError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # damaged file
        raise DataError(f"cannot load the Keras model ({type(exc).__name__}: {exc})", files=[path]) from exc


@dataclass
class ModelPair:
    """A trained classifier/segmenter pair and its `pipeline.json` metadata.

    meta: the full record (`PairArtifact.to_dict()`, canonical key names); artifact: the
    validated `PairArtifact` it came from (None for a pair assembled in memory).
    """

    classifier: keras.Model
    segmenter: keras.Model
    meta: dict[str, Any] = field(default_factory=dict)
    artifact: PairArtifact | None = None

    @property
    def threshold(self) -> float:
        """Classifier probability at or above which a slice goes to the segmenter."""
        if self.artifact is not None:
            return self.artifact.point.threshold
        return float(self.meta["threshold"])


def versions() -> dict[str, str]:
    """Versions of the software that produced a pair."""
    import numpy as np
    import tensorflow as tf

    from pipeline import __version__

    return {"pipeline": __version__, "keras": keras.__version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _classifier_image_size(classifier: keras.Model) -> int | None:
    try:
        return int(classifier.get_layer("resize").height)
    except (ValueError, AttributeError):
        return None


def save_pair(directory: str | os.PathLike, classifier: keras.Model, segmenter: keras.Model,
              meta: dict[str, Any] | None = None) -> Path:
    """Write `classifier.keras`, `segmenter.keras` and `pipeline.json` into `directory`.

    `meta` holds the operating point (`threshold`, `seg_threshold`, `min_component_px`,
    `min_volume_px`, `neighbour_weight`), `tile_size` (or the older `segmenter_tile_size`),
    `classifier_image_size`, `policy` and any extra keys (training config, scores). Standard
    keys it leaves out are written with their defaults: `OperatingPoint()`, tile size 256,
    the image size of the classifier's Resizing layer, the current global dtype policy. `created`,
    `versions` and `sha256` are always filled in here. The record is validated and written by
    `pair_artifact.write_pair_meta` (paths made relative to the project). Returns the directory.
    """
    from pipeline.postprocessing import OperatingPoint

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Remove a stale marker first: a crash while saving must not leave an old json over new models.
    for name in (META_FILE, SUMS_FILE):
        (directory / name).unlink(missing_ok=True)
    save_model(classifier, directory / CLASSIFIER_FILE)
    save_model(segmenter, directory / SEGMENTER_FILE)
    given = dict(meta or {})
    tile_size = given.pop("tile_size", given.pop("segmenter_tile_size", DEFAULT_TILE_SIZE))
    given.pop("segmenter_tile_size", None)
    record: dict[str, Any] = {
        "format": META_FORMAT,
        **OperatingPoint().to_json(),
        "classifier_image_size": _classifier_image_size(classifier),
        "tile_size": tile_size,
        "policy": keras.mixed_precision.global_policy().name,
    }
    record.update(given)
    record.update({
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "sha256": {name: sha256_of(directory / name) for name in (CLASSIFIER_FILE, SEGMENTER_FILE)},
    })
    write_pair_meta(directory, record)
    return directory


def load_pair(directory: str | os.PathLike, *, allow_unverified: bool = False) -> ModelPair:
    """Load the pair saved by `save_pair`, checking each model file against its recorded sha256.

    A `pipeline.json` that records no sha256 for a model file is refused (DataError) unless
    `allow_unverified=True`; that file is then loaded unchecked, with a loud warning.
    """
    directory = Path(directory)
    artifact = read_pair_meta(directory, allow_unverified=allow_unverified)
    models = []
    for name in (CLASSIFIER_FILE, SEGMENTER_FILE):
        expected = artifact.sha256.get(name)
        if expected is None:
            log.warning("UNVERIFIED MODEL: %s records no sha256 for %s; loading it unchecked "
                        "(allow_unverified=True); it may have been modified or replaced",
                        directory / META_FILE, name)
        models.append(load_model(directory / name, expected))
    return ModelPair(classifier=models[0], segmenter=models[1], meta=artifact.to_dict(), artifact=artifact)
