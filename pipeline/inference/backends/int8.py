"""Optional INT8 models for the OpenVINO backend: post-training quantization with NNCF.

A pair may ship INT8 IRs next to its `.keras` files (`quantize_pair`, `python -m pipeline
quantize`):

    <pair>/openvino/<role>.int8.xml, <role>.int8.bin    role: classifier and/or segmenter
    pipeline.json  "openvino_int8": {role: {"xml", "bin", "source_sha256", ...}}, and the
                   files' sha256 in its `sha256` map (and SHA256SUMS, for a release)

An INT8 IR is used by the OpenVINO backend under `precision="auto"` only while its
`source_sha256` is the sha256 of the model file it was made from (a retrained model never
runs with an old INT8 copy) and its own files match their sums; `f32` / `bf16` never use it.

How one is made: the model's float32 IR is quantized by `nncf.quantize` (activations and
weights to 8 bits, statistics from calibration slices of the *training* patients, half of them
with tumour, full bias correction), then the pipeline is evaluated on the validation patients
with and without it (`quantize_pair`). A variant is kept only when the mean per-patient
end-to-end Dice drops by at most `MAX_DROP`, the classifier's probabilities stay within the
backend tolerance of float32 (`agreement.PROBABILITY_TOL`, so the gate decides as Keras does)
and the segmenter's masks agree on >= `agreement.MASK_AGREEMENT` of the validation pixels;
otherwise nothing is written.
NNCF is needed only to make the files (`requirements-int8.txt`), not to run them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["INT8_DIR", "INT8_KEY", "MAX_DROP", "calibration_slices", "int8_irs", "quantize_ir"]

INT8_KEY = "openvino_int8"
INT8_DIR = "openvino"
MAX_DROP = 0.005
DEFAULT_CALIBRATION_SLICES = 300
ROLES = ("classifier", "segmenter")


def int8_irs(pair_dir: str | os.PathLike, meta: dict[str, Any],
             model_sha256: dict[str, str]) -> dict[str, Path]:
    """{role: xml path} of the INT8 IRs a pair ships that still belong to its model files.

    An entry whose `source_sha256` differs from the model file's sum, or whose files are missing
    or do not match the sums in `meta["sha256"]`, is skipped with a warning.
    """
    from pipeline.models.model_io import sha256_of

    pair_dir = Path(pair_dir)
    entries = meta.get(INT8_KEY) or {}
    sums = meta.get("sha256") or {}
    found: dict[str, Path] = {}
    for role, entry in entries.items():
        if role not in ROLES or not isinstance(entry, dict):
            continue
        if entry.get("source_sha256") != model_sha256.get(role):
            log.warning("the INT8 %s in %s was made from another model file; not used", role, pair_dir)
            continue
        names = [entry.get("xml"), entry.get("bin")]
        problems = [n for n in names
                    if not n or not (pair_dir / n).is_file() or sums.get(n) != sha256_of(pair_dir / n)]
        if problems:
            log.warning("the INT8 %s files in %s are missing or do not match their sha256 (%s); not used",
                        role, pair_dir, ", ".join(str(p) for p in problems))
            continue
        found[role] = pair_dir / entry["xml"]
    return found


def calibration_slices(images: np.ndarray, has_tumour: np.ndarray, n: int = DEFAULT_CALIBRATION_SLICES,
                       seed: int = 0) -> np.ndarray:
    """float32 (n, H, W, 3): up to n slices, half with tumour where there are enough, picked at random."""
    rng = np.random.default_rng(seed)
    tumour, clear = np.flatnonzero(has_tumour), np.flatnonzero(~np.asarray(has_tumour, bool))
    n_tumour = min(len(tumour), n // 2)
    n_clear = min(len(clear), n - n_tumour)
    picked = np.concatenate([rng.choice(tumour, n_tumour, replace=False),
                             rng.choice(clear, n_clear, replace=False)]).astype(int)
    if not len(picked):
        raise DataError("no calibration slices: the training patients hold no slice")
    return np.asarray(images[np.sort(picked)], np.float32)


def quantize_ir(xml: str | os.PathLike, slices: np.ndarray, out_xml: str | os.PathLike) -> Path:
    """Quantize the float32 IR `xml` to INT8 with NNCF on `slices` (one per calibration step) -> `out_xml`."""
    try:
        import nncf
    except ImportError as exc:
        raise DataError("INT8 quantization needs NNCF: pip install -r requirements-int8.txt") from exc
    import openvino as ov

    from pipeline.inference.backends.openvino_runner import core

    model = core().read_model(str(xml))
    model.reshape([1, *slices.shape[1:]])
    dataset = nncf.Dataset([s[None] for s in slices])
    # Full bias correction, not NNCF's fast default: on the release segmenter it took the
    # validation segmenter-alone Dice from 0.7656 back to 0.7702 (float32 0.7700).
    quantized = nncf.quantize(model, dataset, subset_size=len(slices), fast_bias_correction=False)
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


# --------------------------------------------------------------------------- making the files

VARIANTS = {
    "classifier": ("classifier",),
    "segmenter": ("segmenter",),
    "both": ("classifier", "segmenter"),
}


def _dataset(data_dir: Any, cache_dir: Any) -> tuple[Any, np.ndarray]:
    """(index frame, decoded images aligned with it) of the data root, read once for every step."""
    from pipeline.data.array_cache import load_arrays
    from pipeline.data.index import index_dataset
    from pipeline.paths import resolve_cache_dir, resolve_data_dir

    cache = resolve_cache_dir(cache_dir)
    index_df = index_dataset(resolve_data_dir(data_dir), cache_dir=cache, progress=False)
    return index_df, load_arrays(index_df, cache, progress=False).images


def _training_slices(index_df: Any, images: np.ndarray, splits: Path, n: int, seed: int) -> np.ndarray:
    """`calibration_slices` from the training patients of `splits`."""
    from pipeline.evaluation.evaluate import select_positions

    positions = select_positions(index_df, "train", splits)
    has_tumour = index_df.iloc[positions]["has_tumor"].to_numpy(bool)
    chosen = calibration_slices(np.arange(len(positions)), has_tumour, n, seed).astype(int)
    return np.asarray(images[positions[chosen]], np.float32)


def _segmenter_mask_agreement(f32_xml: Path, int8_xml: Path, index_df: Any, images: np.ndarray,
                              splits: Path) -> float:
    """Share of pixels of every validation slice on the same side of 0.5 under the two IRs."""
    from pipeline.evaluation.evaluate import select_positions
    from pipeline.inference.backends.openvino_runner import OpenVINORunner

    positions = select_positions(index_df, "val", splits)
    runners = OpenVINORunner(f32_xml, "f32"), OpenVINORunner(int8_xml, "f32")
    same = total = 0
    for start in range(0, len(positions), 16):
        x = np.asarray(images[positions[start : start + 16]], np.float32)
        a, b = (r.predict_on_batch(x) > 0.5 for r in runners)
        same += int((a == b).sum())
        total += a.size
    return same / total if total else 1.0


def _int8_record(meta: dict[str, Any], files: dict[str, dict[str, Any]], directory: Path,
                 place: Any) -> dict[str, Any]:
    """`meta` listing the INT8 `files` ({role: entry}) as a pair in `directory` ships them.

    `place(source, target)` puts each file there (a link, a copy); the record's `sha256` map
    gets their sums and loses those of INT8 files no longer listed.
    """
    from pipeline.models.model_io import sha256_of

    sums = {n: v for n, v in (meta.get("sha256") or {}).items() if not n.startswith(f"{INT8_DIR}/")}
    record = {**meta, INT8_KEY: {}, "sha256": sums}
    for role, entry in files.items():
        for key in ("xml", "bin"):
            target = directory / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            place(Path(entry["abs_" + key]), target)
            sums[entry[key]] = sha256_of(target)
        record[INT8_KEY][role] = {k: v for k, v in entry.items() if not k.startswith("abs_")}
    return record


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        os.symlink(source.resolve(), target)


def _variant_pair(pair_dir: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]],
                  where: Path) -> Path:
    """A pair directory `where` that links to `pair_dir`'s models and ships the INT8 `files`."""
    from pipeline.models.pair_artifact import MODEL_FILES, write_pair_meta

    where.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        _link(pair_dir / name, where / name)
    write_pair_meta(where, _int8_record(meta, files, where, _link))
    return where


def quantize_pair(pair_dir: str | os.PathLike, *, data_dir: Any = None, cache_dir: Any = None,
                  n_calibration: int = DEFAULT_CALIBRATION_SLICES, max_drop: float = MAX_DROP,
                  seed: int = 0, write: bool = True,
                  work_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Quantize a pair's models, measure each variant on the validation patients, keep the best passing one.

    Variants: the classifier alone in INT8, the segmenter alone, and both. Each is evaluated end
    to end on the validation split against the float32 OpenVINO pipeline, in its own process. A
    variant passes with a drop <= `max_drop`, classifier probabilities within `PROBABILITY_TOL`
    and segmenter masks (on every validation slice) agreeing >= `MASK_AGREEMENT` with float32;
    the kept one has the most INT8 models among those that pass. With `write`, its files go into
    `<pair>/openvino/` and `pipeline.json` (and `SHA256SUMS` when the pair is a release).
    Returns the measurements and the decision.
    """
    import shutil
    import tempfile

    import nncf  # noqa: F401 - fail before the long steps when NNCF is missing
    import pandas as pd

    from pipeline.inference.backends.agreement import MASK_AGREEMENT, PROBABILITY_TOL
    from pipeline.inference.backends.ir_cache import cached_ir
    from pipeline.models.model_io import load_pair
    from pipeline.models.pair_artifact import META_FILE, model_sums, write_pair_meta

    pair_dir = Path(pair_dir)
    pair = load_pair(pair_dir)
    meta = dict(pair.meta)
    sums = meta["sha256"]
    source_sums = model_sums(sums)
    splits = pair_dir / "splits.csv"
    if not splits.is_file():
        splits = Path((meta.get("data") or {}).get("splits_file") or splits)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="quantize-"))
    index_df, images = _dataset(data_dir, cache_dir)
    slices = _training_slices(index_df, images, splits, n_calibration, seed)
    log.info("calibration: %d slices of the training patients", len(slices))

    files: dict[str, dict[str, str]] = {}
    for role, model in (("classifier", pair.classifier), ("segmenter", pair.segmenter)):
        entry, _ = cached_ir(model, source_sums[role])
        out = quantize_ir(entry.xml, slices, work / "int8" / f"{role}.int8.xml")
        files[role] = {"xml": f"{INT8_DIR}/{role}.int8.xml", "bin": f"{INT8_DIR}/{role}.int8.bin",
                       "abs_xml": str(out), "abs_bin": str(out.with_suffix(".bin")),
                       "source_sha256": source_sums[role], "calibration_slices": int(len(slices)),
                       "calibration_patients": "train split", "nncf": nncf.__version__}

    def run(pair: Path, precision: str, name: str) -> tuple[float, pd.DataFrame]:
        # Each evaluation in its own process: with OpenVINO 2026.4.1, INT8 IRs of the earlier export
        # (UpSampling2D as Tile/Transpose) gave corrupted segmenter maps when several pairs were
        # evaluated in one process (validation segmenter-alone Dice 0.29-0.55 instead of 0.77,
        # varying run to run), while fresh processes agreed. Not seen with the current export.
        out = work / f"eval-{name}"
        cmd = [sys.executable, "-m", "pipeline", "evaluate", "--models", str(pair), "--split", "val",
               "--splits", str(splits), "--out", str(out), "--n-boot", "200", "--no-progress",
               "--backend", "openvino", "--precision", precision]
        cmd += ["--data-dir", str(data_dir)] if data_dir else []
        cmd += ["--cache-dir", str(cache_dir)] if cache_dir else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DataError(f"evaluating {name} failed: {proc.stderr.strip().splitlines()[-1:]}", [pair])
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        dice = next(r["value"] for r in report["headline"] if r["metric"].startswith("End-to-end mean"))
        return float(dice), pd.read_csv(out / "slices.csv")

    base_dice, base_slices = run(pair_dir, "f32", "f32")
    masks = _segmenter_mask_agreement(cached_ir(pair.segmenter, source_sums["segmenter"])[0].xml,
                                      Path(files["segmenter"]["abs_xml"]), index_df, images, splits)
    measured: dict[str, Any] = {"float32": {"val_e2e_mean_patient_dice": base_dice}}
    for variant, roles in VARIANTS.items():
        where = _variant_pair(pair_dir, meta, {r: files[r] for r in roles}, work / f"pair-{variant}")
        dice, slices_df = run(where, "auto", variant)
        drift = float(np.max(np.abs(slices_df["probability"].to_numpy()
                                    - base_slices["probability"].to_numpy())))
        agree = masks if "segmenter" in roles else 1.0
        measured[variant] = {"val_e2e_mean_patient_dice": dice, "drop": base_dice - dice,
                             "max_probability_diff": drift, "segmenter_mask_agreement": agree,
                             "kept": base_dice - dice <= max_drop and drift <= PROBABILITY_TOL
                             and agree >= MASK_AGREEMENT}
    kept = [v for v in VARIANTS if measured[v]["kept"]]
    decision = max(kept, key=lambda v: len(VARIANTS[v])) if kept else None
    report = {"measured": measured, "kept": decision, "max_drop": max_drop, "work_dir": str(work)}
    if decision and write:
        chosen = {r: {**files[r], "validation": measured[decision]} for r in VARIANTS[decision]}
        write_pair_meta(pair_dir, _int8_record(meta, chosen, pair_dir, shutil.copyfile))
        sums_file = pair_dir / "SHA256SUMS"
        if sums_file.is_file():
            from pipeline.io_utils import atomic_write
            from pipeline.models.release import sums_text

            listed = [line.partition("  ")[2] for line in sums_file.read_text().splitlines() if line.strip()]
            listed = [n for n in listed if n != META_FILE and not n.startswith(f"{INT8_DIR}/")]
            listed += [files[r][k] for r in VARIANTS[decision] for k in ("xml", "bin")] + [META_FILE]
            with atomic_write(sums_file, "w", encoding="utf-8") as fh:
                fh.write(sums_text(pair_dir, listed))
    return report
