"""The offline INT8 workflow: post-training quantization with NNCF, checked on validation patients.

What a pair ships and when it applies at run time: `pipeline.models.pair_artifact` (`INT8_KEY`,
`INT8_DIR`, `int8_irs`). How the files are made here (`quantize_pair`): the model's float32 IR is
quantized by `nncf.quantize` (activations and weights to 8 bits, statistics from calibration
slices of the *training* patients, half of them with tumour, full bias correction), then the
pipeline is evaluated on the validation patients with and without it (`evaluate()`, in this
process; the numbers are read from its report). A variant is kept only when the mean per-patient
end-to-end Dice drops by at most `MAX_DROP`, the classifier's probabilities stay within the
backend tolerance of float32 (`agreement.PROBABILITY_TOL`, so the gate decides as Keras does)
and the segmenter's masks at the pair's mask threshold agree on >= `agreement.MASK_AGREEMENT` of
the validation pixels with a Dice >= `agreement.MASK_DICE` (`decide`), the variant check's own
limits; otherwise nothing is written.

NNCF's `mixed` preset (symmetric weights, asymmetric activations) is the default: on release
0.3.1's ensemble segmenter its masks reached a Dice of 0.994 against the float32 IR (185
validation slices, mask 0.2), where the `performance` preset (symmetric activations too) had
reached 0.963 against Keras (0.3.0's mask 0.5): an asymmetric range fits activations that are
not centred on zero more finely. That copy still gave wrong end-to-end maps on the test patients
under `auto` (0.41 against 0.843; segmenter alone 0.836): that evaluation shared the CPU with
another process, and an INT8 IR compiled with two streams on a busy CPU gives wrong maps without
an error. INT8 IRs therefore run on one stream (`openvino_runner.INT8_STREAMS`, here too), and
the variant check that follows a write runs each variant idle and under load.

When files are written, the pair's variant record is checked again on this CPU
(`pipeline.inference.backends.variant_check`), so `auto` runs the new
INT8 IR only where it passed.
NNCF is needed only to make the files (`requirements-int8.txt`), not to run them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.array_cache import dataset_images
from pipeline.data.splits import select_positions
from pipeline.errors import DataError
from pipeline.inference.backends.base import INT8, OPENVINO
from pipeline.io_utils import sha256_of
from pipeline.models.agreement import MASK_AGREEMENT, MASK_DICE, PROBABILITY_TOL, mask_agreement, mask_dice
from pipeline.models.pair_artifact import INT8_DIR, INT8_KEY
from pipeline.quantization import DEFAULT_CALIBRATION_SLICES, MAX_DROP, PRESETS

# How each candidate pair is evaluated: its INT8 IRs forced (the other model f32). Not `auto`: a
# pair whose variant record covers this CPU class but not the new, unchecked INT8 files runs
# them only once `variants` has passed them, so `auto` would measure f32 or bf16 instead.
CANDIDATE_PRECISION = INT8

log = logging.getLogger(__name__)

__all__ = ["MAX_DROP", "PRESETS", "VARIANTS", "calibration_slices", "decide", "quantize_ir", "quantize_pair"]



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


def quantize_ir(xml: str | os.PathLike, slices: np.ndarray, out_xml: str | os.PathLike,
                preset: str = PRESETS[0]) -> Path:
    """Quantize the float32 IR `xml` to INT8 with NNCF on `slices` (one per calibration step) -> `out_xml`.

    `preset`: NNCF's quantization preset, one of `PRESETS` (module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}; valid: {', '.join(PRESETS)}")
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
    quantized = nncf.quantize(model, dataset, subset_size=len(slices), fast_bias_correction=False,
                              preset=nncf.QuantizationPreset(preset))
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


def _training_slices(index_df: Any, images: np.ndarray, splits: Path, n: int, seed: int) -> np.ndarray:
    """`calibration_slices` from the training patients of `splits`."""
    positions = select_positions(index_df, "train", splits)
    has_tumour = index_df.iloc[positions]["has_tumor"].to_numpy(bool)
    chosen = calibration_slices(np.arange(len(positions)), has_tumour, n, seed).astype(int)
    return np.asarray(images[positions[chosen]], np.float32)


def _segmenter_masks(f32_xml: Path, int8_xml: Path, index_df: Any, images: np.ndarray, splits: Path,
                     cut: float) -> tuple[float, float]:
    """(share of pixels on the same side of `cut`, pooled mask Dice) of the two IRs' maps on every
    validation slice (`agreement.mask_agreement`, `agreement.mask_dice`)."""
    from pipeline.inference.backends.openvino_runner import OpenVINORunner, int8_runner

    positions = select_positions(index_df, "val", splits)
    runners = OpenVINORunner(f32_xml, "f32"), int8_runner(int8_xml)  # each as the pipeline runs it
    maps: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for start in range(0, len(positions), 16):
        x = np.asarray(images[positions[start : start + 16]], np.float32)
        for kept, runner in zip(maps, runners, strict=True):
            kept.append(runner.predict_on_batch(x) > cut)  # boolean masks: 1/32 of the maps' memory
    if not maps[0]:
        return 1.0, 1.0
    a, b = (np.concatenate(m) for m in maps)
    return mask_agreement(a, b, 0.5), mask_dice(a, b, 0.5)  # already masks: a bool above 0.5 is itself


def _int8_record(meta: dict[str, Any], files: dict[str, dict[str, Any]], directory: Path,
                 place: Any) -> dict[str, Any]:
    """`meta` listing the INT8 `files` ({role: entry}) as a pair in `directory` ships them.

    `place(source, target)` puts each file there (a link, a copy); the record's `sha256` map
    gets their sums and loses those of INT8 files no longer listed.
    """
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


def decide(measured: dict[str, dict[str, Any]], max_drop: float = MAX_DROP) -> str | None:
    """The variant to keep from `measured` ({variant: {"drop", "max_probability_diff",
    "segmenter_mask_agreement", "segmenter_mask_dice"}}), marking each with `kept`: a variant
    passes with a Dice drop <= `max_drop`, classifier probabilities within `PROBABILITY_TOL` of
    float32 and segmenter masks agreeing >= `MASK_AGREEMENT` with a Dice >= `MASK_DICE`; the one
    kept has the most INT8 models among those that pass (None when none does)."""
    for variant in VARIANTS:
        m = measured[variant]
        m["kept"] = (m["drop"] <= max_drop and m["max_probability_diff"] <= PROBABILITY_TOL
                     and m["segmenter_mask_agreement"] >= MASK_AGREEMENT
                     and m.get("segmenter_mask_dice", 1.0) >= MASK_DICE)
    kept = [v for v in VARIANTS if measured[v]["kept"]]
    return max(kept, key=lambda v: len(VARIANTS[v])) if kept else None


def _validation_run(pair: Path, precision: str, out: Path, splits: Path, data_dir: Any,
                    cache_dir: Any) -> tuple[float, np.ndarray]:
    """(mean per-patient end-to-end Dice, classifier probability per slice) of `pair` on the
    validation patients, OpenVINO at `precision`: `evaluate()`, its numbers read from its report."""
    import pandas as pd

    from pipeline.evaluation.evaluate import evaluate

    # In this process: with OpenVINO 2026.4.1, INT8 IRs of an earlier export (UpSampling2D as
    # Tile/Transpose) gave corrupted segmenter maps when several pairs were evaluated in one
    # process (validation segmenter-alone Dice 0.29-0.55 instead of 0.77), so each evaluation ran
    # in its own; not seen with the current export (nearest upsampling as a resize).
    result = evaluate(models=pair, split="val", splits=splits, out_dir=out, n_boot=200, progress=False,
                      backend=OPENVINO, precision=precision, data_dir=data_dir, cache_dir=cache_dir)
    dice = result.report["patient_dice"]["end_to_end"]["mean"]
    probabilities = pd.read_csv(result.files["slices_csv"])["probability"].to_numpy()
    return float(dice), probabilities


def _int8_files(pair: Any, source_sums: dict[str, str], slices: np.ndarray, work: Path,
                preset: str) -> dict[str, dict]:
    """Quantize both models of `pair` on `slices` (NNCF `preset`) into `work/int8/` -> {role: INT8 entry}."""
    import nncf

    from pipeline.inference.backends.ir_cache import cached_ir

    files: dict[str, dict[str, Any]] = {}
    for role, model in (("classifier", pair.classifier), ("segmenter", pair.segmenter)):
        entry, _ = cached_ir(model, source_sums[role])
        out = quantize_ir(entry.xml, slices, work / "int8" / f"{role}.int8.xml", preset)
        files[role] = {"xml": f"{INT8_DIR}/{role}.int8.xml", "bin": f"{INT8_DIR}/{role}.int8.bin",
                       "abs_xml": str(out), "abs_bin": str(out.with_suffix(".bin")),
                       "source_sha256": source_sums[role], "calibration_slices": int(len(slices)),
                       "calibration_patients": "train split", "preset": preset, "nncf": nncf.__version__}
    return files


def _write_decision(pair_dir: Path, meta: dict[str, Any], chosen: dict[str, dict[str, Any]]) -> None:
    """Copy the `chosen` INT8 files into the pair, list them in `pipeline.json` and, for a
    release, in `SHA256SUMS` (INT8 files no longer chosen leave both)."""
    import shutil

    from pipeline.models.pair_artifact import META_FILE, SUMS_FILE, read_sums, write_pair_meta, write_sums

    write_pair_meta(pair_dir, _int8_record(meta, chosen, pair_dir, shutil.copyfile))
    if (pair_dir / SUMS_FILE).is_file():
        listed = [n for n in read_sums(pair_dir / SUMS_FILE)
                  if n != META_FILE and not n.startswith(f"{INT8_DIR}/")]
        listed += [entry[k] for entry in chosen.values() for k in ("xml", "bin")] + [META_FILE]
        write_sums(pair_dir, listed)


def quantize_pair(pair_dir: str | os.PathLike, *, data_dir: Any = None, cache_dir: Any = None,
                  n_calibration: int = DEFAULT_CALIBRATION_SLICES, max_drop: float = MAX_DROP,
                  seed: int = 0, write: bool = True, work_dir: str | os.PathLike | None = None,
                  preset: str = PRESETS[0]) -> dict[str, Any]:
    """Quantize a pair's models, measure each variant on the validation patients, keep the best passing one.

    Variants: the classifier alone in INT8, the segmenter alone, and both. Each is evaluated end
    to end on the validation split against the float32 OpenVINO pipeline (`_validation_run`);
    `decide` keeps one. With `write`, its files go into `<pair>/openvino/` and `pipeline.json`
    (and `SHA256SUMS` when the pair is a release). Returns the measurements and the decision.
    The pair's split file is `pipeline.data.splits.pair_splits_file` (its own, else models/).
    """
    import tempfile

    import nncf  # noqa: F401 - fail before the long steps when NNCF is missing

    from pipeline.data.splits import pair_splits_file
    from pipeline.inference.backends.ir_cache import cached_ir
    from pipeline.models.model_io import load_pair
    from pipeline.models.pair_artifact import model_sums
    from pipeline.paths import SPLITS_FILE, PairSource

    pair_dir = Path(pair_dir)
    pair = load_pair(pair_dir)
    meta = dict(pair.meta)
    source_sums = model_sums(meta["sha256"])
    splits = pair_splits_file(None, PairSource(pair_dir))
    if splits is None:
        raise DataError(f"the pair has no split file ({SPLITS_FILE}) to pick training and validation "
                        "patients", [pair_dir])
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="quantize-"))
    index_df, images = dataset_images(data_dir, cache_dir)  # read once for every step
    slices = _training_slices(index_df, images, splits, n_calibration, seed)
    log.info("calibration: %d slices of the training patients", len(slices))
    files = _int8_files(pair, source_sums, slices, work, preset)

    def run(where: Path, precision: str, name: str) -> tuple[float, np.ndarray]:
        return _validation_run(where, precision, work / f"eval-{name}", splits, data_dir, cache_dir)

    base_dice, base_probs = run(pair_dir, "f32", "f32")
    agree, dice_of_masks = _segmenter_masks(cached_ir(pair.segmenter, source_sums["segmenter"])[0].xml,
                                            Path(files["segmenter"]["abs_xml"]), index_df, images, splits,
                                            float(meta["seg_threshold"]))
    measured: dict[str, Any] = {"float32": {"val_e2e_mean_patient_dice": base_dice}}
    for variant, roles in VARIANTS.items():
        where = _variant_pair(pair_dir, meta, {r: files[r] for r in roles}, work / f"pair-{variant}")
        dice, probs = run(where, CANDIDATE_PRECISION, variant)
        measured[variant] = {"val_e2e_mean_patient_dice": dice, "drop": base_dice - dice,
                             "max_probability_diff": float(np.max(np.abs(probs - base_probs))),
                             "segmenter_mask_agreement": agree if "segmenter" in roles else 1.0,
                             "segmenter_mask_dice": dice_of_masks if "segmenter" in roles else 1.0}
    decision = decide(measured, max_drop)
    report = {"measured": measured, "kept": decision, "max_drop": max_drop, "preset": preset,
              "work_dir": str(work)}
    if decision and write:
        from pipeline.inference.backends.variant_check import check_pair_variants

        _write_decision(pair_dir, meta, {r: {**files[r], "validation": measured[decision]}
                                         for r in VARIANTS[decision]})
        # the pair now ships other INT8 files: record which variants pass on this CPU class
        report["variants"] = check_pair_variants(pair_dir, data_dir=data_dir, cache_dir=cache_dir)
    return report
