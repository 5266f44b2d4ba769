"""The model pair as an artifact: its `pipeline.json` as one validated record, and which pair to use.

A pair directory holds `classifier.keras`, `segmenter.keras` and `pipeline.json`, written
last (so it marks a complete pair). `PairArtifact` is that file, parsed once and checked:

    threshold              classifier probability at or above which a slice is segmented, in [0, 1]
    seg_threshold          segmenter probability above which a pixel is tumour, in [0, 1]
    min_component_px       2D components smaller than this are dropped, >= 0
    min_volume_px          3D components (patient volumes) smaller than this are dropped, >= 0 (0 if absent)
    neighbour_weight       the volume-aware gate's weight, in [0, 1] (0.0 if absent)
    tile_size              the segmenter's native input side, > 0
    classifier_image_size  the classifier's internal size, > 0 (None if absent)
    policy                 the dtype policy the models were trained under (None if absent)
    sha256                 {file name: hex sha256} of at least both model files (a release also
                           lists `splits.csv`)
    extra                  every other key (`format`, `created`, `versions`, `validation`, `data`,
                           `config`, `release`, `durations_minutes`, `calibration`, ...), kept as written

Required: `threshold`, `seg_threshold`, `min_component_px`, `tile_size`, `sha256`; a missing or
out-of-range value is a DataError naming the key and the file, never a silent default. Older
files are read too: `segmenter_tile_size` stands for `tile_size` (both are written, equal, for
older readers) and a top-level `mask_threshold` for `seg_threshold`. A pair without the sums of
its model files is refused unless the caller passes `allow_unverified=True` (`--allow-unverified`),
and the loader then logs a loud warning.

Which pair to use is decided by `pipeline.paths.resolve_pair`, one rule for every command.

`write_pair_meta` is the one writer: it validates the record the same way and stores paths
relative to the project root when they lie inside it, and drops absolute paths outside it, so
a pair copied or committed holds no machine's layout.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write_json
from pipeline.paths import PAIR_META_FILE, project_relative

__all__ = [
    "CLASSIFIER_FILE",
    "META_FILE",
    "MODEL_FILES",
    "MODEL_ROLES",
    "SEGMENTER_FILE",
    "PairArtifact",
    "model_sums",
    "portable_paths",
    "read_pair_meta",
    "read_pair_record",
    "write_pair_meta",
]

CLASSIFIER_FILE = "classifier.keras"
SEGMENTER_FILE = "segmenter.keras"
MODEL_FILES = (CLASSIFIER_FILE, SEGMENTER_FILE)
MODEL_ROLES = {"classifier": CLASSIFIER_FILE, "segmenter": SEGMENTER_FILE}
META_FILE = PAIR_META_FILE  # pipeline.json
ALLOW_UNVERIFIED_HINT = "pass --allow-unverified (allow_unverified=True) to load it anyway"

# (key, integer, lowest, highest, required) of the numeric fields
_FIELDS = (
    ("threshold", False, 0.0, 1.0, True),
    ("seg_threshold", False, 0.0, 1.0, True),
    ("min_component_px", True, 0, None, True),
    ("tile_size", True, 1, None, True),
    ("min_volume_px", True, 0, None, False),
    ("neighbour_weight", False, 0.0, 1.0, False),
    ("classifier_image_size", True, 1, None, False),
)
_LEGACY = {"tile_size": "segmenter_tile_size", "seg_threshold": "mask_threshold"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- the record


def _number(record: Mapping[str, Any], key: str, source: Path | None, *, integer: bool) -> Any:
    value = record[key]
    kind = "an integer" if integer else "a number"
    files = [source] if source else []
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"invalid model pair metadata: {key!r} must be {kind}, got {value!r}", files)
    if not math.isfinite(value):
        raise DataError(f"invalid model pair metadata: {key!r} must be finite, got {value!r}", files)
    if integer:
        if value != int(value):
            raise DataError(f"invalid model pair metadata: {key!r} must be {kind}, got {value!r}", files)
        return int(value)
    return float(value)


def _check_range(key: str, value: float, low: float, high: float | None, source: Path | None) -> None:
    if value < low or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        files = [source] if source else []
        raise DataError(f"invalid model pair metadata: {key!r} must be {bounds}, got {value!r}", files)


@dataclass(frozen=True)
class PairArtifact:
    """A pair's `pipeline.json`, validated (module docstring). Build it with `from_dict` or `read`."""

    threshold: float
    seg_threshold: float
    min_component_px: int
    tile_size: int
    sha256: Mapping[str, str]
    min_volume_px: int = 0
    neighbour_weight: float = 0.0
    classifier_image_size: int | None = None
    policy: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    @property
    def verified(self) -> bool:
        """True when the sums of both model files are recorded."""
        return all(name in self.sha256 for name in MODEL_FILES)

    def pipeline_settings(self) -> dict[str, Any]:
        """The operating point as `TumorPipeline` keyword arguments."""
        return {
            "threshold": self.threshold,
            "seg_threshold": self.seg_threshold,
            "min_component_px": self.min_component_px,
            "min_volume_px": self.min_volume_px,
            "neighbour_weight": self.neighbour_weight,
            "tile_size": self.tile_size,
        }

    @classmethod
    def from_dict(
        cls, record: Any, source: str | os.PathLike | None = None, *, allow_unverified: bool = False
    ) -> PairArtifact:
        """Validate a parsed `pipeline.json` (`source`: the file, for messages) -> PairArtifact.

        Raises DataError naming the key and the file for a missing required key, a value of the
        wrong type or out of range, or (unless `allow_unverified`) missing model sums.
        """
        source = Path(source) if source is not None else None
        files = [source] if source else []
        if not isinstance(record, Mapping):
            raise DataError("invalid model pair metadata: not a JSON object", files)
        record = dict(record)
        for key, legacy in _LEGACY.items():
            if legacy in record and key not in record:
                record[key] = record[legacy]
        missing = [key for key, *_, required in _FIELDS if required and key not in record]
        if missing:
            raise DataError(
                f"invalid model pair metadata: required key(s) {', '.join(map(repr, missing))} missing "
                "(the calibrated operating point; re-run `make train`, or `calibrate` on the pair)",
                files,
            )
        values: dict[str, Any] = {}
        for key, integer, low, high, required in _FIELDS:
            if required or record.get(key) is not None:
                values[key] = _number(record, key, source, integer=integer)
                _check_range(key, values[key], low, high, source)
        legacy_tile = record.get("segmenter_tile_size")
        if legacy_tile is not None and legacy_tile != values["tile_size"]:
            raise DataError(
                f"invalid model pair metadata: 'tile_size' ({values['tile_size']}) and "
                f"'segmenter_tile_size' ({legacy_tile}) disagree",
                files,
            )
        policy = record.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise DataError(f"invalid model pair metadata: 'policy' must be a string, got {policy!r}", files)
        sha256 = cls._sums(record.get("sha256"), files, allow_unverified)
        known = {key for key, *_ in _FIELDS} | {"policy", "sha256", *_LEGACY.values()}
        extra = {k: v for k, v in record.items() if k not in known}
        return cls(sha256=sha256, policy=policy, extra=extra, source=source, **values)

    @staticmethod
    def _sums(value: Any, files: list[Path], allow_unverified: bool) -> dict[str, str]:
        if value is None:
            value = {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in value.items()
        ):
            raise DataError(
                "invalid model pair metadata: 'sha256' must map file names to 64-digit hex sums", files
            )
        absent = [name for name in MODEL_FILES if name not in value]
        if absent and not allow_unverified:
            raise DataError(
                f"the model pair records no sha256 for {', '.join(absent)} (key 'sha256'), so the model "
                f"files cannot be verified; re-save the pair (make train / make release), or "
                f"{ALLOW_UNVERIFIED_HINT}",
                files,
            )
        return dict(value)

    def to_dict(self) -> dict[str, Any]:
        """The full record: the standard keys (and the `segmenter_tile_size` mirror), then `extra`."""
        record: dict[str, Any] = {
            **self.pipeline_settings(),
            "segmenter_tile_size": self.tile_size,  # for readers older than this module
            "classifier_image_size": self.classifier_image_size,
            "policy": self.policy,
        }
        record.update(self.extra)
        record["sha256"] = dict(self.sha256)
        return record


def model_sums(sha256: Mapping[str, str]) -> dict[str, str]:
    """{role: sha256} of the model files in a pair's `sha256` map (a role without a sum is left out)."""
    return {role: sha256[name] for role, name in MODEL_ROLES.items() if name in sha256}


def read_pair_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed, unvalidated `pipeline.json` of a pair directory (DataError when missing or not JSON)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"not a model pair: {META_FILE} is missing (run `make train` first)", [meta_path])
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"cannot read the pair metadata ({exc})", [meta_path]) from exc
    if not isinstance(record, dict):
        raise DataError("invalid model pair metadata: not a JSON object", [meta_path])
    return record


SUMS_FILE = "SHA256SUMS"  # a release's `sha256sum -c` list, which also covers pipeline.json


def _check_listed_sum(directory: Path) -> None:
    """When the pair has a `SHA256SUMS` listing `pipeline.json`, the file must match it (a release's
    operating point cannot be edited unnoticed); DataError naming the file otherwise."""
    import hashlib

    sums, meta = directory / SUMS_FILE, directory / META_FILE
    if not sums.is_file():
        return
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if sep and name.strip() == META_FILE:
            with open(meta, "rb") as fh:
                actual = hashlib.file_digest(fh, "sha256").hexdigest()
            if actual != digest.strip():
                raise DataError(
                    f"sha256 mismatch: {META_FILE} has {actual}, {SUMS_FILE} records {digest.strip()}; "
                    "the operating point was edited after the release (re-run `make release`)",
                    [meta],
                )
            return


def read_pair_meta(directory: str | os.PathLike, *, allow_unverified: bool = False) -> PairArtifact:
    """The validated `pipeline.json` of the pair in `directory` (see `PairArtifact.from_dict`),
    checked against the pair's `SHA256SUMS` when it has one (unless `allow_unverified`)."""
    path = Path(directory) / META_FILE
    record = read_pair_record(directory)
    if not allow_unverified:
        _check_listed_sum(Path(directory))
    return PairArtifact.from_dict(record, path, allow_unverified=allow_unverified)


def portable_paths(value: Any) -> Any:
    """`value` with every absolute path string made relative to the project root when inside it;
    dictionary entries holding an absolute path outside it are dropped (`project_relative`)."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            converted = portable_paths(item)
            if converted is not _DROP:
                out[key] = converted
        return out
    if isinstance(value, list | tuple):
        return [item for item in map(portable_paths, value) if item is not _DROP]
    if isinstance(value, str) and os.path.isabs(value):
        relative = project_relative(value)
        return _DROP if relative is None else relative
    return value


_DROP = object()


def write_pair_meta(directory: str | os.PathLike, record: Mapping[str, Any]) -> PairArtifact:
    """Validate `record` (`PairArtifact.from_dict`, model sums required) and write it as the
    pair's `pipeline.json`, atomically, with `portable_paths`. Returns the artifact written."""
    path = Path(directory) / META_FILE
    artifact = PairArtifact.from_dict(record, path)
    artifact = PairArtifact.from_dict(portable_paths(artifact.to_dict()), path)
    atomic_write_json(path, artifact.to_dict())
    return artifact
