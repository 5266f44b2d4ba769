"""Saving and loading models, and the trained pair that inference and evaluation use.

A pair directory holds

    classifier.keras   stage 1, saved without optimizer state
    segmenter.keras    stage 2, saved without optimizer state
    pipeline.json      metadata: threshold, classifier_image_size, segmenter_tile_size,
                       policy (dtype policy used in training), created, versions, and the
                       sha256 of each model file (checked on load)

`pipeline.json` is written last, so its presence marks a complete pair. Models load with
`safe_mode=True` and `compile=False` by default: the files carry no optimizer state, and
inference needs none.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras

from pipeline.errors import DataError
from pipeline.io_utils import atomic_save, atomic_write_json

CLASSIFIER_FILE = "classifier.keras"
SEGMENTER_FILE = "segmenter.keras"
META_FILE = "pipeline.json"
META_FORMAT = 1  # bump when the meaning of pipeline.json changes

DEFAULT_THRESHOLD = 0.5
DEFAULT_TILE_SIZE = 256  # native slice size of the LGG data

# Modules whose registered layers, losses and metrics a saved model may reference.
_SERIALISABLE_MODULES = ("pipeline.preprocessing", "pipeline.losses", "pipeline.metrics")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def register_custom_objects() -> None:
    """Import the modules that register the pipeline's Keras objects (those that exist)."""
    for name in _SERIALISABLE_MODULES:
        if importlib.util.find_spec(name) is not None:
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
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(f"cannot load the Keras model ({type(exc).__name__}: {exc})", files=[path]) from exc


@dataclass
class ModelPair:
    """A trained classifier/segmenter pair and its `pipeline.json` metadata."""

    classifier: keras.Model
    segmenter: keras.Model
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """Classifier probability above which a slice goes to the segmenter."""
        return float(self.meta.get("threshold", DEFAULT_THRESHOLD))


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

    `meta` may hold `threshold`, `classifier_image_size`, `segmenter_tile_size`, `policy` and
    any extra keys (training config, scores); missing standard keys get defaults (image size
    read from the classifier's Resizing layer, the current global dtype policy). `created`,
    `versions` and `sha256` are always filled in here. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Remove a stale marker first: a crash while saving must not leave an old json over new models.
    (directory / META_FILE).unlink(missing_ok=True)
    save_model(classifier, directory / CLASSIFIER_FILE)
    save_model(segmenter, directory / SEGMENTER_FILE)
    record: dict[str, Any] = {
        "format": META_FORMAT,
        "threshold": DEFAULT_THRESHOLD,
        "classifier_image_size": _classifier_image_size(classifier),
        "segmenter_tile_size": DEFAULT_TILE_SIZE,
        "policy": keras.mixed_precision.global_policy().name,
    }
    record.update(meta or {})
    record.update({
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "sha256": {name: sha256_of(directory / name) for name in (CLASSIFIER_FILE, SEGMENTER_FILE)},
    })
    atomic_write_json(directory / META_FILE, record)
    return directory


def read_pair_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `pipeline.json` of a pair directory (DataError naming it when missing or invalid)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"not a model pair: {META_FILE} is missing (run `make train` first)",
                        files=[meta_path])
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the pair metadata ({exc})", files=[meta_path]) from exc
    if not isinstance(meta, dict):
        raise DataError("the pair metadata is not a JSON object", files=[meta_path])
    return meta


def load_pair(directory: str | os.PathLike) -> ModelPair:
    """Load the pair saved by `save_pair`, checking each model file against its recorded sha256."""
    directory = Path(directory)
    meta = read_pair_meta(directory)
    hashes = meta.get("sha256") or {}
    classifier = load_model(directory / CLASSIFIER_FILE, hashes.get(CLASSIFIER_FILE))
    segmenter = load_model(directory / SEGMENTER_FILE, hashes.get(SEGMENTER_FILE))
    return ModelPair(classifier=classifier, segmenter=segmenter, meta=meta)
