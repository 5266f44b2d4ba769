"""Which OpenVINO variants of a pair's models give Keras' answers on real slices, on this CPU.

`check_pair_variants` runs each model of a pair (classifier, segmenter) as each variant this
machine has - `f32`, `bf16` where the CPU runs bfloat16 natively, `int8` where the pair ships an
INT8 IR that belongs to the model file (`pair_artifact.int8_irs`) - and Keras on the same slices:
the release's deterministic probe (`synthetic_slices.probe_batch`) and the pair's validation
patients (its `splits.csv`, read through the index and array caches,
`array_cache.dataset_images`). A variant passes with the tolerances of `pipeline.models.agreement`
(probabilities within `PROBABILITY_TOL`; masks, taken at the pair's mask threshold, equal on >=
`MASK_AGREEMENT` of the pixels and their Dice against Keras' masks >= `MASK_DICE`); for the classifier the
result also counts the gate decisions that differ at the pair's threshold (`gate_flips`; the
probability tolerance lets only slices within it of the threshold flip,
`gate_flips_beyond_tolerance` counts the others and must be 0). Each variant runs twice: on this
machine as it is, then compiled again while other processes keep every core busy
(`cpu_load.busy_cores`; `under_load` in the result, which passes only when both runs do), as an
INT8 IR that agreed on an idle CPU gave wrong maps under load. The results are filed in the
pair's `pipeline.json` under this CPU's class (`pair_artifact.record_variants`), where `auto`
reads them (`openvino_runner.choose_variant`).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.models.agreement import MASK_DICE, MASK_PROBABILITY, PROBABILITY_TOL, agreement, mask_dice

log = logging.getLogger(__name__)

__all__ = ["check_pair_variants", "gate_flips", "validation_slices", "variant_result"]

CHECK_BATCH = 16
PROBE_SLICES = 8  # `probe_batch` slices in front of the validation slices


def validation_slices(splits: str | os.PathLike, data_dir: Any = None, cache_dir: Any = None,
                      max_slices: int | None = None) -> np.ndarray:
    """float32 (N, H, W, 3): `probe_batch` (PROBE_SLICES slices at the data's size), then the
    validation patients' slices of `splits` (every one, or `max_slices` evenly spaced).
    DataError when the split file or the data root does not serve them."""
    from pipeline.data.array_cache import dataset_images
    from pipeline.data.splits import select_positions
    from pipeline.data.synthetic_slices import probe_batch

    index_df, images = dataset_images(data_dir, cache_dir)
    positions = select_positions(index_df, "val", splits)
    if max_slices is not None and len(positions) > max_slices:
        positions = positions[np.linspace(0, len(positions) - 1, max_slices).round().astype(int)]
    probe = probe_batch(PROBE_SLICES, int(images.shape[1]))[:, :, : images.shape[2]]
    return np.concatenate([probe, np.asarray(images[positions])]).astype(np.float32)


def _predict(predict: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(predict(x[i : i + CHECK_BATCH]), np.float32)
                           for i in range(0, len(x), CHECK_BATCH)])


def gate_flips(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> dict[str, int]:
    """Gate decisions (probability >= `threshold`) that differ between two classifier outputs:
    {"gate_flips", "gate_flips_beyond_tolerance"} (the latter: where Keras' probability is more
    than PROBABILITY_TOL from the threshold, which a passing variant cannot flip)."""
    reference, candidate = np.ravel(reference), np.ravel(candidate)
    flips = (reference >= threshold) != (candidate >= threshold)
    far = np.abs(reference - threshold) > PROBABILITY_TOL
    return {"gate_flips": int(flips.sum()), "gate_flips_beyond_tolerance": int((flips & far).sum())}


def variant_result(reference: np.ndarray, candidate: np.ndarray, cpu: str, files_sha256: dict[str, str],
                   threshold: float | None = None) -> dict[str, Any]:
    """The record of one variant (`pipeline.models.variant_record`): `agreement` of its outputs
    with Keras', the slices, the CPU class, the files it ran. `threshold`: the pair's threshold on
    this output, recorded - for a classifier the gate (`gate_flips` counted there), for a
    segmenter the mask threshold (the masks compared there; default `MASK_PROBABILITY`)."""
    is_map = np.ndim(reference) > 2
    cut = MASK_PROBABILITY if threshold is None or not is_map else float(threshold)
    result = agreement(reference, candidate, cut)
    if is_map:  # and the tumour itself, not only the pixels (`agreement.MASK_DICE`)
        result["mask_dice"] = mask_dice(reference, candidate, cut)
        result["ok"] = bool(result["ok"] and result["mask_dice"] >= MASK_DICE)
    result.update(n_slices=int(len(reference)), cpu=cpu, files_sha256=dict(files_sha256))
    if threshold is not None:
        result["threshold"] = float(threshold)
        if not is_map:
            result.update(gate_flips(reference, candidate, threshold))
    return result


def _runners(role: str, model: Any, sums: dict[str, str], int8: dict[str, Path], meta: dict[str, Any],
             cache_dir: Any) -> dict[str, tuple[Any, dict[str, str]]]:
    """{variant: (make_runner, files_sha256)} of `model` on this machine; each `make_runner()`
    compiles a new runner (the check compiles one idle and one under load)."""
    from functools import partial

    from pipeline.inference.backends.openvino_runner import _cached, native_bf16, variant_runner
    from pipeline.models.pair_artifact import INT8_KEY, MODEL_ROLES

    name = MODEL_ROLES[role]
    entry, _ = _cached(model, sums[name], cache_dir)
    files = {name: sums[name]}
    runners = {"f32": (partial(variant_runner, entry, "f32"), files)}
    if native_bf16():
        runners["bf16"] = (partial(variant_runner, entry, "bf16"), files)
    if role in int8:
        shipped = meta[INT8_KEY][role]
        runners["int8"] = (partial(variant_runner, entry, "int8", int8[role]),
                           {**files, **{shipped[k]: sums[shipped[k]] for k in ("xml", "bin")}})
    return runners


def _under_load(result: dict[str, Any], loaded: dict[str, Any], busy: int) -> dict[str, Any]:
    """`result` (the idle run) with the run under load filed in: `under_load` (its own result and
    `busy_processes`), `ok_idle` (the idle run's verdict), `ok` only when both passed."""
    return {**result, "ok_idle": result["ok"], "ok": bool(result["ok"] and loaded["ok"]),
            "under_load": {**loaded, "busy_processes": int(busy)}}


def _check_model(role: str, model: Any, x: np.ndarray, runners: dict[str, Any], cpu: str,
                 threshold: float | None) -> dict[str, dict[str, Any]]:
    """{variant: result} of one model (`variant_result` against Keras on `x`)."""
    import openvino

    from pipeline.inference.backends.cpu_load import busy_cores

    reference = _predict(model.predict_on_batch, x)
    checked = datetime.now(UTC).isoformat(timespec="seconds")
    results = {}
    for variant, (make_runner, files) in runners.items():
        result = variant_result(reference, _predict(make_runner().predict_on_batch, x), cpu, files, threshold)
        with busy_cores() as busy:
            loaded = variant_result(reference, _predict(make_runner().predict_on_batch, x), cpu, files,
                                    threshold)
        result = _under_load(result, loaded, len(busy))
        result.update(openvino=openvino.__version__, checked=checked,
                      slices=f"probe_batch({PROBE_SLICES}) + {len(x) - PROBE_SLICES} validation slices")
        results[variant] = result
        log.info("%s %s on %s: %s", role, variant, cpu, result)
    return results


def check_pair_variants(pair_dir: str | os.PathLike, *, data_dir: Any = None, cache_dir: Any = None,
                        openvino_cache: Any = None, max_slices: int | None = None,
                        write: bool = True) -> dict[str, Any]:
    """Check every variant of both models of the pair in `pair_dir` on this CPU (module docstring)
    and, with `write`, file the results in its `pipeline.json` (`pair_artifact.record_variants`).

    `data_dir`, `cache_dir`: the data root and its index/array cache; `openvino_cache`: the IR
    cache root; `max_slices`: validation slices to use (default every one). Returns {"cpu",
    "results": {role: {variant: result}}, "written"}. DataError when the pair, its split file or
    the data cannot be read.
    """
    from pipeline.data.splits import pair_splits_file
    from pipeline.models.model_io import load_pair
    from pipeline.models.pair_artifact import int8_irs, model_sums, record_variants
    from pipeline.models.precision import cpu_class
    from pipeline.paths import SPLITS_FILE, PairSource

    pair_dir = Path(pair_dir)
    pair = load_pair(pair_dir)
    meta = dict(pair.meta)
    splits = pair_splits_file(None, PairSource(pair_dir))
    if splits is None:
        raise DataError(f"the pair has no split file ({SPLITS_FILE}) naming its validation patients",
                        [pair_dir])
    x = validation_slices(splits, data_dir, cache_dir, max_slices)
    int8 = int8_irs(pair_dir, meta, model_sums(meta["sha256"]))
    cpu = cpu_class()
    results = {}
    point = pair.artifact.point
    for role, model, threshold in (("classifier", pair.classifier, point.threshold),
                                   ("segmenter", pair.segmenter, point.seg_threshold)):
        runners = _runners(role, model, meta["sha256"], int8, meta, openvino_cache)
        results[role] = _check_model(role, model, x, runners, cpu, threshold)
    if write:
        record_variants(pair_dir, results)
    return {"cpu": cpu, "results": results, "written": bool(write)}
