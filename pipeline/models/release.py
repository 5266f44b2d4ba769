"""The trained release in `models/`: a training run's pair, made small, checked and fingerprinted.

`export_release(run_dir, out_dir)` turns the final pair of a training run into

    classifier.keras   float32 model (computes in float32), weights *stored* in float16
    segmenter.keras    the same for the ResUNet
    splits.csv         the run's patient split, committed with the models
    pipeline.json      the run's metadata plus a `release` section; `sha256` of every file above
    SHA256SUMS         `sha256sum -c` list of all four files

How the weights are stored in float16: the model is saved as an ordinary float32 `.keras` file
(config with float32 dtype policies, no optimizer state) and then the archive's
`model.weights.h5` is rewritten with every float32 tensor cast to float16. Keras casts a stored
value to its variable's dtype when it loads it (`Variable.assign`), so plain
`keras.saving.load_model` - hence `model_io.load_pair`, `TumorPipeline.from_dir`, `make diagnose`,
`make evaluate --models models/` - gets float32 variables and float32 computation, with no
release-specific loading code. Building the model under a float16 policy instead would make
every loader rebuild it in float32 (and a plain Keras user would run BatchNormalization in
float16). A tensor with values beyond float16's range (65504) stays float32.

Before anything lands in `out_dir`, the release is built in a staging folder inside it, loaded
back through `model_io.load_model` and compared with the run's models on a deterministic probe
batch: classifier probabilities, segmenter probabilities and the binary masks must stay within
`Tolerance`, and both model files together under `max_total_bytes`; otherwise a DataError gives
the measured numbers and `out_dir` is left untouched. Files are then moved in with `os.replace`,
`pipeline.json` (the marker of a complete pair) and `SHA256SUMS` last.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from pipeline.data.splits import SPLITS_FILE
from pipeline.data.synthetic_slices import probe_batch
from pipeline.errors import DataError
from pipeline.io_utils import atomic_write_bytes, sha256_of
from pipeline.models.agreement import MASK_AGREEMENT, MASK_PROBABILITY, PROBABILITY_TOL, mask_agreement
from pipeline.models.model_io import load_model, load_pair, save_model, versions
from pipeline.models.pair_artifact import (
    CLASSIFIER_FILE,
    INT8_DIR,
    META_FILE,
    MODEL_FILES,
    SEGMENTER_FILE,
    SUMS_FILE,
    read_pair_meta,
    read_pair_record,
    read_sums,
    write_pair_meta,
    write_sums,
)
from pipeline.models.precision import as_float32_model
from pipeline.paths import MODELS_DIR, PROJECT_ROOT, from_project

DEFAULT_RELEASE_DIR = MODELS_DIR
WEIGHTS_DTYPES = ("float16", "float32")
MAX_TOTAL_BYTES = 100_000_000  # both model files together (100 MB, below GitHub's 100 MiB file limit)
WEIGHTS_ENTRY = "model.weights.h5"  # the weights inside a .keras archive (a zip)
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Tolerance:
    """How far the stored-in-16-bit release may drift from the run's float32 models on the probe batch.

    classifier_max_abs: largest allowed |p_release - p_run| of the tumour probability.
    segmenter_max_abs: largest allowed per-pixel |p_release - p_run| of the mask probability.
    min_mask_agreement: smallest allowed fraction of pixels whose binary mask (`> mask_threshold`) agrees.
    mask_threshold: None (default) for the pair's own mask threshold (its `seg_threshold`): masks
        are compared where the release draws them.
    """

    classifier_max_abs: float = PROBABILITY_TOL
    segmenter_max_abs: float = 2e-2
    min_mask_agreement: float = MASK_AGREEMENT
    mask_threshold: float | None = None


@dataclass(frozen=True)
class ProbeSpec:
    """The deterministic synthetic probe batch: `n` slices of `size` x `size`, from `seed`."""

    n: int = 8
    size: int = 256
    seed: int = 0


# ---------------------------------------------------------------------------- float32 models


# ---------------------------------------------------------------------------- float16 storage


def _storage_array(data: np.ndarray, dtype: str) -> np.ndarray:
    """The array as it is stored: float32 tensors cast to `dtype` unless their values overflow it."""
    if dtype == "float16" and data.dtype == np.float32:
        finite = data[np.isfinite(data)]
        if finite.size == 0 or float(np.max(np.abs(finite))) <= FLOAT16_MAX:
            return data.astype(np.float16)
    return data


def _copy_h5(src: h5py.Group, dst: h5py.Group, dtype: str, stats: dict[str, int]) -> None:
    """Copy groups, datasets and attributes from `src` to `dst`, storing float tensors as `dtype`."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name, item in src.items():
        if isinstance(item, h5py.Group):
            _copy_h5(item, dst.create_group(name), dtype, stats)
            continue
        data = item[()]
        stored = _storage_array(np.asarray(data), dtype) if isinstance(data, np.ndarray) else data
        if isinstance(data, np.ndarray) and data.dtype == np.float32:
            stats["float32_tensors"] += 1
            stats["kept_float32"] += int(np.asarray(stored).dtype == np.float32)
        out = dst.create_dataset(name, data=stored)
        for key, value in item.attrs.items():
            out.attrs[key] = value


def store_weights_as(path: str | os.PathLike, dtype: str) -> dict[str, int]:
    """Rewrite the `.keras` file at `path` (atomically) with its weight tensors stored as `dtype`.

    Only `model.weights.h5` inside the archive changes; the config (float32 policies) and
    metadata stay, so the file loads as a float32 model. Returns counts of float32 tensors seen
    and of those kept in float32 (values out of `dtype`'s range). A DataError names the file
    when it is not a `.keras` archive with a single weights file.
    """
    path = Path(path)
    if dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"unknown weights dtype {dtype!r}; valid: {', '.join(WEIGHTS_DTYPES)}")
    stats = {"float32_tensors": 0, "kept_float32": 0}
    if dtype == "float32":
        return stats
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"not a .keras archive ({exc})", files=[path]) from exc
    if [info.filename for info, _ in entries].count(WEIGHTS_ENTRY) != 1:
        raise DataError(f"the .keras archive has no single {WEIGHTS_ENTRY} (sharded or another format)",
                        files=[path])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, payload in entries:
            if info.filename == WEIGHTS_ENTRY:
                converted = io.BytesIO()
                with h5py.File(io.BytesIO(payload), "r") as src, h5py.File(converted, "w") as dst:
                    _copy_h5(src, dst, dtype, stats)
                payload = converted.getvalue()
            archive.writestr(info, payload)  # keeps name, date and compression of the entry
    atomic_write_bytes(path, buffer.getvalue())
    return stats


# ---------------------------------------------------------------------------- verification


def _predict(model: keras.Model, images: np.ndarray, batch_size: int = 4) -> np.ndarray:
    # Eager calls: a handful of batches does not repay tracing a graph per model and batch shape.
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(np.float32)
        outputs.append(keras.ops.convert_to_numpy(model(batch, training=False)))
    return np.concatenate(outputs).astype(np.float64)


def compare_models(reference: tuple[keras.Model, keras.Model], candidate: tuple[keras.Model, keras.Model],
                   probe: np.ndarray, mask_threshold: float = MASK_PROBABILITY) -> dict[str, float]:
    """Outputs of two (classifier, segmenter) pairs on `probe` uint8 (N, H, W, 3) -> drift numbers.

    Returns `classifier_max_abs_diff`, `segmenter_max_abs_diff` (probabilities) and
    `mask_agreement` (fraction of pixels where `p > mask_threshold` agrees).
    """
    cls_ref, cls_new = _predict(reference[0], probe), _predict(candidate[0], probe)
    seg_ref, seg_new = _predict(reference[1], probe), _predict(candidate[1], probe)
    agreement = mask_agreement(seg_ref, seg_new, mask_threshold)
    return {
        "classifier_max_abs_diff": float(np.max(np.abs(cls_ref - cls_new))),
        "segmenter_max_abs_diff": float(np.max(np.abs(seg_ref - seg_new))),
        "mask_agreement": float(agreement),
    }


def _worst(measurements: list[dict[str, float]]) -> dict[str, float]:
    """Combine the drift numbers of several probe batches: largest diffs, smallest agreement."""
    return {
        "classifier_max_abs_diff": max(m["classifier_max_abs_diff"] for m in measurements),
        "segmenter_max_abs_diff": max(m["segmenter_max_abs_diff"] for m in measurements),
        "mask_agreement": min(m["mask_agreement"] for m in measurements),
    }


def _check_tolerance(measured: dict[str, float], tolerance: Tolerance, files: list[Path]) -> None:
    problems = []
    if not measured["classifier_max_abs_diff"] <= tolerance.classifier_max_abs:
        problems.append(f"classifier probability max abs diff {measured['classifier_max_abs_diff']:.3g} "
                        f"> {tolerance.classifier_max_abs:g}")
    if not measured["segmenter_max_abs_diff"] <= tolerance.segmenter_max_abs:
        problems.append(f"segmenter probability max abs diff {measured['segmenter_max_abs_diff']:.3g} "
                        f"> {tolerance.segmenter_max_abs:g}")
    if not measured["mask_agreement"] >= tolerance.min_mask_agreement:
        problems.append(f"binary mask agreement at {tolerance.mask_threshold:g} "
                        f"{100 * measured['mask_agreement']:.3f} % "
                        f"< {100 * tolerance.min_mask_agreement:.3f} %")
    if problems:
        raise DataError("the release's outputs drift from the run's models beyond tolerance on the probe "
                        "batch: " + "; ".join(problems) + " (try --weights-dtype float32)", files=files)


def _check_size(paths: list[Path], max_total_bytes: int) -> None:
    sizes = {p: p.stat().st_size for p in paths}
    total = sum(sizes.values())
    if total > max_total_bytes:
        listed = ", ".join(f"{p.name} {n / 1e6:.1f} MB" for p, n in sizes.items())
        raise DataError(f"the release is too large: {total / 1e6:.1f} MB > {max_total_bytes / 1e6:.1f} MB "
                        f"for the model files together ({listed})", files=list(sizes))


def verify_release(directory: str | os.PathLike) -> dict[str, str]:
    """Check every file of a release against `SHA256SUMS` and the `sha256` entries of `pipeline.json`.

    Returns {file name: sha256}. Raises DataError naming each missing or mismatching file.
    """
    directory = Path(directory)
    sums_path = directory / SUMS_FILE
    if not sums_path.is_file():
        raise DataError(f"not a release: {SUMS_FILE} is missing", files=[sums_path])
    expected = read_sums(sums_path)
    for name, digest in read_pair_meta(directory).sha256.items():
        if expected.get(name, digest) != digest:
            raise DataError(f"{SUMS_FILE} and {META_FILE} record different sha256 for {name}",
                            files=[directory / name])
        expected.setdefault(name, digest)
    missing = [directory / n for n in expected if not (directory / n).is_file()]
    if missing:
        raise DataError("release files are missing", files=missing)
    actual = {name: sha256_of(directory / name) for name in expected}
    bad = [directory / n for n in expected if actual[n] != expected[n]]
    if bad:
        raise DataError("sha256 mismatch: these release files were modified or replaced after export",
                        files=bad)
    return actual


# ---------------------------------------------------------------------------- export


def _display_path(path: Path) -> str:
    """`path` relative to the project root when inside it (the release is committed), else absolute."""
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _existing_release(out_dir: Path) -> list[Path]:
    return [out_dir / n for n in (*MODEL_FILES, META_FILE, SUMS_FILE) if (out_dir / n).exists()]


def release_split(run_dir: Path) -> Path:
    """The split file released with a run's pair: the run's own (`splits.csv`), except for a final
    model retrained on every fold (``data.fold: all``), which keeps the split its folds were dealt
    from (`data.splits`, normally `models/splits.csv`), so the project's train / validation / test
    split of record survives the release (the pair's `data` record says what the segmenter saw)."""
    record = read_pair_record(run_dir) if (run_dir / META_FILE).is_file() else {}
    data = (record.get("config") or {}).get("data") or {}
    if data.get("fold") == "all" and data.get("splits"):
        return from_project(data["splits"])
    return run_dir / SPLITS_FILE


def _check_export_arguments(dtypes: dict[str, str], probe_images: np.ndarray | None, run_dir: Path,
                            out_dir: Path, force: bool) -> np.ndarray | None:
    """The checks `export_release` makes before touching anything; returns `probe_images` as an array."""
    for dtype in dtypes.values():
        if dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"unknown weights dtype {dtype!r}; valid: {', '.join(WEIGHTS_DTYPES)}")
    if probe_images is not None:
        probe_images = np.asarray(probe_images)
        if probe_images.ndim != 4 or probe_images.shape[-1] != 3:
            raise ValueError(f"probe_images must be (N, H, W, 3), got shape {probe_images.shape}")
    if run_dir == out_dir:
        raise ValueError(f"the release directory must differ from the run directory: {run_dir}")
    splits_src = release_split(run_dir)
    if not splits_src.is_file():
        raise DataError("the run has no split file to release with the models", files=[splits_src])
    existing = _existing_release(out_dir)
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds a release ({', '.join(p.name for p in existing)}); "
                              "pass force=True (--force) to replace it")
    splits_dst = out_dir / SPLITS_FILE
    if splits_dst.is_file() and not force and sha256_of(splits_dst) != sha256_of(splits_src):
        raise FileExistsError(f"{splits_dst} differs from the run's split {splits_src}; "
                              "pass force=True (--force) to replace it with the run's")
    return probe_images


def _stage(staging: Path, reference: tuple[keras.Model, keras.Model], dtypes: dict[str, str],
           splits_src: Path, max_total_bytes: int) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Write the release's model files (weights stored as `dtypes`) and split file into `staging`,
    check their size -> (storage counts per model file, sha256 of every file)."""
    storage: dict[str, dict[str, int]] = {}
    for name, model in zip(MODEL_FILES, reference, strict=True):
        save_model(model, staging / name)
        storage[name] = store_weights_as(staging / name, dtypes[name])
    _check_size([staging / n for n in MODEL_FILES], max_total_bytes)
    shutil.copyfile(splits_src, staging / SPLITS_FILE)
    return storage, {n: sha256_of(staging / n) for n in (*MODEL_FILES, SPLITS_FILE)}


def _measure_staged(staging: Path, hashes: dict[str, str], reference: tuple[keras.Model, keras.Model],
                    batches: list[np.ndarray], tolerance: Tolerance) -> dict[str, float]:
    """Load the staged model files the way every user will (`load_model`, sha256 checked), check
    they compute in float32, and measure their drift from `reference` on every probe batch."""
    released = tuple(load_model(staging / n, hashes[n]) for n in MODEL_FILES)
    for name, model in zip(MODEL_FILES, released, strict=True):
        wrong = sorted({v.dtype for v in model.weights if "float" in v.dtype} - {"float32"})
        if wrong:
            raise DataError(f"the released model loads with {wrong} variables, not float32",
                            files=[staging / name])
    return _worst([compare_models(reference, released, images, tolerance.mask_threshold)
                   for images in batches])


def _measured_record(measured: dict[str, float], tolerance: Tolerance, probe: ProbeSpec,
                     probe_images: np.ndarray | None) -> dict[str, Any]:
    """The drift numbers of the release section of `pipeline.json`, with what they were measured on."""
    return {
        "max_abs_diff": {"classifier": measured["classifier_max_abs_diff"],
                         "segmenter": measured["segmenter_max_abs_diff"]},
        "mask_agreement": measured["mask_agreement"],
        "tolerance": asdict(tolerance),
        "probe": {**asdict(probe), "extra_images": 0 if probe_images is None else len(probe_images)},
    }


def _swap_in(staging: Path, out_dir: Path) -> list[str]:
    """Move the staged release into `out_dir`: the stale marker goes first, pipeline.json and
    SHA256SUMS come last; the previous release's INT8 IRs (`openvino/`, made from its models)
    are removed. Returns the files SHA256SUMS lists."""
    for name in (META_FILE, SUMS_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / INT8_DIR, ignore_errors=True)
    for name in (*MODEL_FILES, SPLITS_FILE, META_FILE):
        os.replace(staging / name, out_dir / name)
    listed = [*MODEL_FILES, SPLITS_FILE, META_FILE]
    write_sums(out_dir, listed)
    return listed


def _source_and_tolerance(run_dir: Path, tolerance: Tolerance) -> tuple[Any, Tolerance]:
    """The run's pair (its files checked against their recorded sha256) and `tolerance` with its
    mask threshold resolved: the pair's own `seg_threshold` unless one was given."""
    source = load_pair(run_dir)
    if tolerance.mask_threshold is None:
        tolerance = replace(tolerance, mask_threshold=float(source.artifact.point.seg_threshold))
    return source, tolerance


def export_release(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike = DEFAULT_RELEASE_DIR,
    *,
    weights_dtype: str = "float16",
    segmenter_weights_dtype: str | None = None,
    tolerance: Tolerance = Tolerance(),
    probe: ProbeSpec = ProbeSpec(),
    probe_images: np.ndarray | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    force: bool = False,
) -> dict[str, Any]:
    """Write the release of the training run `run_dir` into `out_dir` (default `models/`); return its record.

    run_dir: a run directory holding the final pair (`classifier.keras`, `segmenter.keras`,
        `pipeline.json`, checked against its sha256) and `splits.csv`.
    weights_dtype: "float16" (weights stored in 16 bits, models still compute in float32) or "float32".
    segmenter_weights_dtype: the segmenter's own storage (default: `weights_dtype`); a small
        segmenter whose float16 copy drifts beyond tolerance can stay float32 at little cost.
    tolerance: allowed drift on the probe batch (`Tolerance`); probe: the synthetic batch (`ProbeSpec`).
    probe_images: optional real slices uint8 (N, H, W, 3) checked as well (e.g. a few test slices:
        trained models may be saturated, hence insensitive, on synthetic images).
    max_total_bytes: cap on both model files together.
    force: replace an existing release (and a differing `splits.csv`) in `out_dir`.

    Returns {"out_dir", "source_run", "weights_dtype", "files": {name: {"bytes", "sha256"}},
    "model_bytes", "measured": drift numbers, "tolerance", "meta": the written pipeline.json}.
    Raises DataError (with the measured numbers / sizes / files) when a check fails, and
    FileExistsError when `out_dir` already holds a release and `force` is false; `out_dir`
    is unchanged in both cases.
    """
    dtypes = {CLASSIFIER_FILE: weights_dtype, SEGMENTER_FILE: segmenter_weights_dtype or weights_dtype}
    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    probe_images = _check_export_arguments(dtypes, probe_images, run_dir, out_dir, force)
    splits_src = release_split(run_dir)

    source, tolerance = _source_and_tolerance(run_dir, tolerance)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".release-"))
    try:
        # The reference is the run's models computing in float32 (a mixed-precision run's models
        # rebuilt so): the check then measures what 16-bit storage changes and nothing else.
        reference = (as_float32_model(source.classifier), as_float32_model(source.segmenter))
        storage, hashes = _stage(staging, reference, dtypes, splits_src, max_total_bytes)
        batches = [probe_batch(probe.n, probe.size, probe.seed)]
        if probe_images is not None and len(probe_images):
            batches.append(probe_images)
        measured = _measure_staged(staging, hashes, reference, batches, tolerance)
        _check_tolerance(measured, tolerance, [run_dir / n for n in MODEL_FILES])

        meta = dict(source.meta)
        meta["policy"] = "float32"  # the release computes in float32 whatever the run trained in
        meta["sha256"] = hashes
        meta["release"] = {
            "source_run": _display_path(run_dir),
            "weights_dtype": weights_dtype if len(set(dtypes.values())) == 1 else dtypes,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "training_policy": source.meta.get("policy"),
            **_measured_record(measured, tolerance, probe, probe_images),
            "tensors_kept_float32": {n: s["kept_float32"] for n, s in storage.items()},
            "versions": versions(),
        }
        meta = write_pair_meta(staging, meta).to_dict()  # validated; paths relative to the project
        listed = _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    final_hashes = verify_release(out_dir)
    return {
        "out_dir": str(out_dir),
        "source_run": _display_path(run_dir),
        "weights_dtype": weights_dtype if len(set(dtypes.values())) == 1 else dtypes,
        "files": {n: {"bytes": (out_dir / n).stat().st_size, "sha256": final_hashes[n]} for n in listed},
        "model_bytes": sum((out_dir / n).stat().st_size for n in MODEL_FILES),
        "source_model_bytes": sum((run_dir / n).stat().st_size for n in MODEL_FILES),
        "measured": measured,
        "tolerance": asdict(tolerance),
        "meta": meta,
    }
