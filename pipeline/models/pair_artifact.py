"""The model pair as an artifact: its `pipeline.json` as one validated record, and which pair to use.

A pair directory holds `classifier.keras`, `segmenter.keras` and `pipeline.json`, written
last (so it marks a complete pair). `PairArtifact` is that file, parsed once and checked:

    point                  the operating point, `pipeline.postprocessing.OperatingPoint` (its fields
                           are top-level keys of the file: threshold, seg_threshold, min_component_px
                           required; min_volume_px, neighbour_weight 0 if absent; ranges there)
    tile_size              the segmenter's native input side, > 0
    classifier_image_size  the classifier's internal size, > 0 (None if absent)
    policy                 the dtype policy the models were trained under (None if absent)
    sha256                 {file name: hex sha256} of at least both model files (a release also
                           lists `splits.csv`)
    extra                  every other key (`format`, `created`, `versions`, `validation`, `data`,
                           `config`, `release`, `durations_minutes`, `calibration`, `variants`, ...),
                           kept as written; `variants` (which OpenVINO variants agree with Keras on
                           which CPU class, `pipeline.models.variant_record`) validated too

Required: the operating point's required fields, `tile_size`, `sha256`; a missing or
out-of-range value is a DataError naming the key and the file, never a silent default. Older
files are read too: `segmenter_tile_size` stands for `tile_size` (both are written, equal, for
older readers) and a top-level `mask_threshold` for `seg_threshold`. A pair without the sums of
its model files, or whose `SHA256SUMS` (the trust root, written beside `pipeline.json` by
`write_pair_meta`) is missing or does not vouch for `pipeline.json`, is refused unless the caller
passes `allow_unverified=True` (`--allow-unverified`), and the loader then logs a loud warning.

Which pair to use is decided by `pipeline.paths.resolve_pair`, one rule for every command.

INT8 IRs a pair may ship for the OpenVINO backend (made by `pipeline.quantization`):

    <pair>/openvino/<role>.int8.xml, <role>.int8.bin    role: classifier and/or segmenter
    pipeline.json  "openvino_int8": {role: {"xml", "bin", "source_sha256", ...}}, and the
                   files' sha256 in its `sha256` map (and SHA256SUMS, for a release)

`int8_irs` is the one rule for which of them apply: an INT8 IR is used only while its
`source_sha256` is the sha256 of the model file it was made from (a retrained model never runs
with an old INT8 copy); INT8 files that do not match their sums are refused (a DataError, never a
silent fallback to float32); the OpenVINO backend prefers it under
`precision="auto"` only (`f32` / `bf16` never use it).

`write_pair_meta` is the one writer: it validates the record the same way and stores paths
relative to the project root when they lie inside it, and drops absolute paths outside it, so
a pair copied or committed holds no machine's layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write, atomic_write_json, sha256_of
from pipeline.models.variant_record import VARIANTS_KEY, check_variants, merge_variants
from pipeline.paths import PAIR_META_FILE, project_relative
from pipeline.postprocessing import OperatingPoint, check_number

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_FILE",
    "META_FILE",
    "MODEL_FILES",
    "MODEL_ROLES",
    "SEGMENTER_FILE",
    "INT8_DIR",
    "INT8_KEY",
    "PairArtifact",
    "SUMS_FILE",
    "int8_irs",
    "model_sums",
    "read_sums",
    "write_sums",
    "portable_paths",
    "read_pair_meta",
    "read_pair_record",
    "record_variants",
    "write_pair_meta",
]

CLASSIFIER_FILE = "classifier.keras"
SEGMENTER_FILE = "segmenter.keras"
MODEL_FILES = (CLASSIFIER_FILE, SEGMENTER_FILE)
MODEL_ROLES = {"classifier": CLASSIFIER_FILE, "segmenter": SEGMENTER_FILE}
META_FILE = PAIR_META_FILE  # pipeline.json
INT8_KEY = "openvino_int8"  # pipeline.json section listing the pair's INT8 IRs
INT8_DIR = "openvino"  # where a pair keeps them
ALLOW_UNVERIFIED_HINT = "pass --allow-unverified (allow_unverified=True) to load it anyway"

# (key, integer, lowest, highest, required) of the pair's own numeric fields (the operating
# point's are `OperatingPoint`'s)
_FIELDS = (
    ("tile_size", True, 1, None, True),
    ("classifier_image_size", True, 1, None, False),
)
_LEGACY = {"tile_size": "segmenter_tile_size", "seg_threshold": "mask_threshold"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- the record


def _invalid(exc: ValueError, source: Path | None) -> DataError:
    return DataError(f"invalid model pair metadata: {exc}", [source] if source else [])


@dataclass(frozen=True)
class PairArtifact:
    """A pair's `pipeline.json`, validated (module docstring). Build it with `from_dict` or `read`."""

    point: OperatingPoint
    tile_size: int
    sha256: Mapping[str, str]
    classifier_image_size: int | None = None
    policy: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    @property
    def verified(self) -> bool:
        """True when the sums of both model files are recorded."""
        return all(name in self.sha256 for name in MODEL_FILES)

    def pipeline_settings(self) -> dict[str, Any]:
        """What `TumorPipeline` takes from the pair: {"point", "tile_size"}."""
        return {"point": self.point, "tile_size": self.tile_size}

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
        required = [*OperatingPoint.required(), *(key for key, *_, needed in _FIELDS if needed)]
        missing = [key for key in required if key not in record]
        if missing:
            raise DataError(
                f"invalid model pair metadata: required key(s) {', '.join(map(repr, missing))} missing "
                "(the calibrated operating point; re-run `make train`, or `calibrate` on the pair)",
                files,
            )
        values: dict[str, Any] = {}
        try:
            point = OperatingPoint.from_json(record)
            for key, integer, low, high, needed in _FIELDS:
                if needed or record.get(key) is not None:
                    values[key] = check_number(key, record[key], integer=integer, low=low, high=high)
        except ValueError as exc:
            raise _invalid(exc, source) from exc
        legacy_tile = record.get("segmenter_tile_size")
        if legacy_tile is not None and legacy_tile != values["tile_size"]:
            raise DataError(
                f"invalid model pair metadata: 'tile_size' ({values['tile_size']}) and "
                f"'segmenter_tile_size' ({legacy_tile}) disagree",
                files,
            )
        if record.get(VARIANTS_KEY) is not None:
            try:
                check_variants(record[VARIANTS_KEY])
            except ValueError as exc:
                raise _invalid(exc, source) from exc
        policy = record.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise DataError(f"invalid model pair metadata: 'policy' must be a string, got {policy!r}", files)
        sha256 = cls._sums(record.get("sha256"), files, allow_unverified)
        known = {*OperatingPoint.names(), *(key for key, *_ in _FIELDS), "policy", "sha256",
                 *_LEGACY.values()}
        extra = {k: v for k, v in record.items() if k not in known}
        return cls(point=point, sha256=sha256, policy=policy, extra=extra, source=source, **values)

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
            **self.point.to_json(),
            "tile_size": self.tile_size,
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


def int8_irs(pair_dir: str | os.PathLike, meta: Mapping[str, Any],
             model_sha256: Mapping[str, str], *, allow_unverified: bool = False) -> dict[str, Path]:
    """{role: xml path} of the INT8 IRs a pair ships that still belong to its model files.

    An entry whose `source_sha256` differs from the model file's sum (`model_sha256`, {role: sum})
    is skipped with a warning (the model was retrained after it was made). An entry whose files are
    missing or do not match the sums in `meta["sha256"]` is refused: DataError naming them (the
    pair is damaged; running float32 instead would hide it), or with `allow_unverified` skipped
    with a loud warning.
    """
    pair_dir = Path(pair_dir)
    entries = meta.get(INT8_KEY) or {}
    sums = meta.get("sha256") or {}
    found: dict[str, Path] = {}
    for role, entry in entries.items():
        if role not in MODEL_ROLES or not isinstance(entry, dict):
            continue
        if entry.get("source_sha256") != model_sha256.get(role):
            log.warning("the INT8 %s in %s was made from another model file; not used", role, pair_dir)
            continue
        names = [entry.get("xml"), entry.get("bin")]
        problems = [n for n in names
                    if not n or not (pair_dir / n).is_file() or sums.get(n) != sha256_of(pair_dir / n)]
        if problems and not allow_unverified:
            raise DataError(
                f"the pair's INT8 {role} files are missing or do not match their sha256 in {META_FILE}; "
                f"re-run `python -m pipeline quantize`, restore them, or {ALLOW_UNVERIFIED_HINT} "
                "(without INT8)", [pair_dir / str(n) for n in problems])
        if problems:
            log.warning("UNVERIFIED PAIR: the INT8 %s files in %s are missing or do not match their "
                        "sha256 (%s); not used (allow_unverified=True)", role, pair_dir,
                        ", ".join(str(p) for p in problems))
            continue
        found[role] = pair_dir / entry["xml"]
    return found


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


SUMS_FILE = "SHA256SUMS"  # every pair's `sha256sum -c` list, which also covers pipeline.json


def read_sums(path: str | os.PathLike) -> dict[str, str]:
    """{file name: hex sha256} of a `sha256sum` list (`SHA256SUMS`), in its order.

    DataError naming the file for a line that is not `<64 hex>  <name>` (`*<name>`: binary mode).
    """
    path = Path(path)
    listed: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise DataError(f"malformed line in {path.name}: {line!r}", files=[path])
        listed[name.lstrip("*")] = digest
    return listed


def write_sums(directory: str | os.PathLike, names: list[str]) -> Path:
    """Write `<directory>/SHA256SUMS` (atomically) listing the files `names` with their sums, in order."""
    path = Path(directory) / SUMS_FILE
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(sums_text(directory, names))
    return path


def sums_text(directory: str | os.PathLike, names: list[str]) -> str:
    """`sha256sum` output (`<hex>  <name>` lines) for the files `names` in `directory`."""
    return "".join(f"{sha256_of(Path(directory) / name)}  {name}\n" for name in names)


def _trust_root_problem(directory: Path, artifact: PairArtifact) -> str | None:
    """Why the pair's `SHA256SUMS` does not vouch for its `pipeline.json`, or None when it does:
    the file must exist, list `pipeline.json` with its sum, and agree with `pipeline.json` on
    every file both list."""
    sums, meta = directory / SUMS_FILE, directory / META_FILE
    if not sums.is_file():
        return (f"{SUMS_FILE} is missing, so {META_FILE} (the operating point and the model sums) "
                "cannot be verified")
    listed = read_sums(sums)
    recorded = listed.get(META_FILE)
    if recorded is None:
        return f"{SUMS_FILE} records no sha256 for {META_FILE}"
    actual = sha256_of(meta)
    if actual != recorded:
        return (f"sha256 mismatch: {META_FILE} has {actual}, {SUMS_FILE} records {recorded}; "
                "the operating point or the model sums were edited after the pair was saved")
    differ = [name for name, digest in artifact.sha256.items() if listed.get(name, digest) != digest]
    if differ:
        return f"{SUMS_FILE} and {META_FILE} record different sha256 for {', '.join(differ)}"
    return None


def read_pair_meta(directory: str | os.PathLike, *, allow_unverified: bool = False) -> PairArtifact:
    """The validated `pipeline.json` of the pair in `directory` (see `PairArtifact.from_dict`),
    vouched for by the pair's `SHA256SUMS` (the trust root: `_trust_root_problem`).

    A missing or mismatching `SHA256SUMS` is a DataError, like a missing model sum; with
    `allow_unverified` the pair loads with a loud warning instead.
    """
    directory = Path(directory)
    path = directory / META_FILE
    artifact = PairArtifact.from_dict(read_pair_record(directory), path, allow_unverified=allow_unverified)
    problem = _trust_root_problem(directory, artifact)
    if problem is not None and not allow_unverified:
        raise DataError(f"{problem}; re-save the pair (make train / make release / `calibrate`), or "
                        f"{ALLOW_UNVERIFIED_HINT}", [directory / SUMS_FILE if "missing" in problem else path])
    if problem is not None:
        log.warning("UNVERIFIED PAIR %s: %s; loading it anyway (allow_unverified=True)", directory, problem)
    return artifact


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
    pair's `pipeline.json`, atomically, with `portable_paths`, then the pair's `SHA256SUMS` (the
    trust root `read_pair_meta` requires): the model files, the other files the record sums that
    are there, and `pipeline.json` last. Returns the artifact written."""
    directory = Path(directory)
    path = directory / META_FILE
    artifact = PairArtifact.from_dict(record, path)
    artifact = PairArtifact.from_dict(portable_paths(artifact.to_dict()), path)
    atomic_write_json(path, artifact.to_dict())
    others = [n for n in artifact.sha256 if n not in MODEL_FILES and (directory / n).is_file()]
    write_sums(directory, [*MODEL_FILES, *others, META_FILE])
    return artifact


def record_variants(directory: str | os.PathLike,
                    results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> PairArtifact:
    """File `results` ({role: {variant: result}}, `variant_record.merge_variants`) into the
    `variants` record of the pair in `directory` and write it back with `write_pair_meta`; the
    pair's `SHA256SUMS` keeps every file it listed, in its order, `pipeline.json` with its new
    sum last, so a release stays verifiable (`release.verify_release`). Returns the artifact."""
    directory = Path(directory)
    record = read_pair_record(directory)
    record[VARIANTS_KEY] = merge_variants(record.get(VARIANTS_KEY), results)
    listed = list(read_sums(directory / SUMS_FILE)) if (directory / SUMS_FILE).is_file() else []
    artifact = write_pair_meta(directory, record)
    if listed:
        names = [n for n in listed if n != META_FILE and (directory / n).is_file()]
        names += [n for n in read_sums(directory / SUMS_FILE) if n not in names and n != META_FILE]
        write_sums(directory, [*names, META_FILE])
    return artifact
