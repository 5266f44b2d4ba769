"""`make train` end to end: run directory, both stages, calibration and the saved model pair.

Layout of a run directory (``runs/<YYYYmmdd-HHMMSS>/`` or ``--run-dir``)::

    config.yaml        resolved config (loading it gives the same Config)
    splits.csv         copy of the patient split used
    train.log          the log of every invocation on this run
    classifier/        best.keras, head.keras, history.csv, curves.png, tensorboard/, markers
    segmenter/         best.keras, history.csv, curves.png, tensorboard/, markers
    classifier.keras, segmenter.keras, pipeline.json   the final pair (`pipeline.models.model_io.save_pair`)
    summary.json       minutes per phase, validation numbers, where the pair is

``runs/LATEST`` (a text file with the run folder's name) and the ``runs/latest`` symlink point
at the newest run. Re-running on an existing run directory resumes it: finished phases are
skipped (marker files), an interrupted phase continues from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import keras

from pipeline.data.splits import SPLITS_FILE
from pipeline.io_utils import atomic_write, atomic_write_json
from pipeline.models.backbone_weights import SCRATCH_LABEL, from_scratch
from pipeline.models.model_io import META_FILE, load_pair, save_pair
from pipeline.models.precision import apply_policy
from pipeline.paths import (  # noqa: F401 - latest_run re-exported
    LATEST_FILE,
    LATEST_LINK,
    RUN_CONFIG_FILE,
    latest_run,
    resolve_cache_dir,
    resolve_data_dir,
)
from pipeline.postprocessing import OperatingPoint
from pipeline.training.calibration import calibrate_on_validation
from pipeline.training.classifier_training import StageResult, train_classifier
from pipeline.training.config import (
    Config,
    ConfigError,
    config_to_dict,
    dump_config,
    project_path,
    replace_in,
)
from pipeline.training.data_prep import TrainingData, copy_splits, prepare_data
from pipeline.training.distribute import across_workers, get_strategy, is_chief, worker_dir, worker_settings
from pipeline.training.phase import read_marker
from pipeline.training.policy_probe import training_policy
from pipeline.training.segmenter_training import train_segmenter

log = logging.getLogger(__name__)

STAGES = ("classifier", "segmenter", "all")


def runs_root(config: Config) -> Path:
    """The folder holding all runs (`output.runs_dir`, relative to the project root)."""
    return project_path(config.output.runs_dir)


def new_run_dir(config: Config) -> Path:
    """A fresh ``runs/<YYYYmmdd-HHMMSS>`` path (suffixed when two runs start in the same second)."""
    root = runs_root(config)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def mark_latest(run_dir: Path, runs_dir: Path) -> None:
    """Point ``<runs_dir>/LATEST`` (and, where symlinks work, ``<runs_dir>/latest``) at `run_dir`.

    A run inside `runs_dir` is named by its folder name, one elsewhere (``--run-dir``) by its
    absolute path.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir.name if run_dir.parent == runs_dir.absolute() else str(run_dir)
    with atomic_write(runs_dir / LATEST_FILE, "w", encoding="utf-8") as fh:
        fh.write(target + "\n")
    link, tmp = runs_dir / LATEST_LINK, runs_dir / f".{LATEST_LINK}.tmp{os.getpid()}"
    with contextlib.suppress(OSError):  # no symlinks on some file systems: LATEST is enough
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)


def resolve_paths(config: Config) -> Config:
    """Fill `data.data_dir` and `data.cache_dir` with absolute paths, so the saved config says what ran."""
    config = replace_in(config, "data.data_dir", str(resolve_data_dir(config.data.data_dir).absolute()))
    return replace_in(config, "data.cache_dir", str(resolve_cache_dir(config.data.cache_dir).absolute()))


@contextlib.contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _weights_label(config: Config) -> str:
    spec = config.classifier.weights
    return SCRATCH_LABEL if from_scratch(spec) else str(spec)


def _stage_done(stage_dir: Path, phases: tuple[str, ...]) -> bool:
    return all(read_marker(stage_dir, p) is not None for p in phases)


def _classifier_from_pair(pair_dir: Path) -> StageResult:
    """The classifier of an existing pair (e.g. the release in models/) as this run's stage 1."""
    pair = load_pair(pair_dir)
    best = (pair.meta.get("validation") or {}).get("classifier_best_val_auc")
    log.info("classifier: taken from %s (not trained in this run)", pair_dir)
    return StageResult(pair.classifier, [], best, "val_auc", [], {"from_pair": str(pair_dir)})


def train_run(
    config: Config,
    run_dir: str | os.PathLike,
    stage: str = "all",
    classifier_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train `stage` ("classifier", "segmenter" or "all") in `run_dir`, resuming whatever is there.

    When both stages are trained (now or by an earlier invocation) the classifier threshold
    is calibrated on the validation patients and the pair is saved at the root of `run_dir`.
    `classifier_from` (a pair folder such as ``models``): with ``stage="segmenter"`` and no
    classifier trained in this run, that pair's classifier is stage 1 (hard negatives,
    calibration and the saved pair), so a new segmenter needs no new classifier.
    Returns the run summary (also written to ``summary.json``).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    if config.data.fold == "all" and stage != "segmenter":
        raise ConfigError("data.fold 'all' trains the segmenter only (--stage segmenter): the "
                          "classifier's selection and early stopping need validation patients")
    run_dir = Path(run_dir).absolute()
    # multi_worker: the strategy comes before any other TensorFlow call (collective ops)
    strategy = get_strategy(config.training.strategy)
    with worker_dir(run_dir) as own_dir:
        return _train_in(config, own_dir, stage, classifier_from, strategy)


def _train_in(config: Config, run_dir: Path, stage: str, classifier_from: str | os.PathLike | None,
              strategy: Any) -> dict[str, Any]:
    """`train_run` in `run_dir` (this worker's own folder) under `strategy`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _log_to(run_dir / "train.log"):
        config = resolve_paths(config)
        dump_config(config, run_dir / RUN_CONFIG_FILE)
        if is_chief():
            mark_latest(run_dir, runs_root(config).absolute())
        log.info("run directory: %s", run_dir)
        log.info("distribution: %s with %d replica(s)", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
        training = config.training
        several = across_workers(strategy)  # the rule worker_settings applies below
        policy = training_policy(config, stage, config.data.cache_dir, several_workers=several)
        policy, eager = worker_settings(strategy, policy, training.run_eagerly)
        config = replace_in(config, "training.run_eagerly", eager)
        policy = apply_policy(policy)
        keras.utils.set_random_seed(config.training.seed)
        log.info("dtype policy %s; classifier backbone weights: %s", policy, _weights_label(config))
        data = prepare_data(config.data)
        copy_splits(data, run_dir)

        results: dict[str, StageResult] = {}
        cls_dir, seg_dir = run_dir / "classifier", run_dir / "segmenter"
        if stage in ("classifier", "all") or _stage_done(cls_dir, ("head", "finetune")):
            results["classifier"] = train_classifier(config, data, cls_dir, strategy)
        elif classifier_from is not None:
            results["classifier"] = _classifier_from_pair(project_path(classifier_from))
        if stage in ("segmenter", "all") or _stage_done(seg_dir, ("train",)):
            classifier = results["classifier"].model if "classifier" in results else None
            results["segmenter"] = train_segmenter(config, data, seg_dir, strategy, classifier=classifier)

        calibration = None
        if "classifier" in results and "segmenter" in results:
            calibration = _calibrate_and_save(config, data, results, run_dir, policy)
        else:
            missing = sorted({"classifier", "segmenter"} - set(results))
            log.warning(
                "pair not saved: %s not trained yet in this run (--stage all or --stage %s)",
                ", ".join(missing),
                missing[0],
            )
        summary = _summary(config, data, results, calibration, run_dir, time.monotonic() - started, policy)
        atomic_write_json(run_dir / "summary.json", summary)
        _log_summary(summary)
    return summary


def _operating_point(config: Config, data: TrainingData, results: dict[str, StageResult],
                     run_dir: Path) -> tuple[OperatingPoint, dict[str, Any]]:
    """(operating point, its validation record): `calibration.fixed` as given, else the grid
    searched on the validation patients (`calibrate_on_validation`, grid in calibration_grid.csv)."""
    fixed = config.calibration.fixed
    if fixed is not None:
        point = OperatingPoint(**fixed)
        log.info("operating point fixed by calibration.fixed (not searched): %s", point)
        return point, {**point.to_json(), "fixed": True, "val_patients": len(data.patients(data.val_pos))}
    result = calibrate_on_validation(
        results["classifier"].model, results["segmenter"].model, data, config.calibration,
        run_dir / "calibration_grid.csv", batch_size=config.segmenter.batch_size,
    )
    return result.params, result.to_json()


def _calibrate_and_save(
    config: Config, data: TrainingData, results: dict[str, StageResult], run_dir: Path, policy: str
) -> dict[str, Any]:
    point, validation = _operating_point(config, data, results, run_dir)
    meta = {
        **point.to_json(),
        "classifier_image_size": config.classifier.image_size,
        "tile_size": int(data.arrays.image_size[0]),  # what TumorPipeline.from_dir reads
        "segmenter_tile_size": int(data.arrays.image_size[0]),
        "policy": policy,
        "backbone_weights": _weights_label(config),
        "trained_from_scratch": from_scratch(config.classifier.weights),
        "seed": config.training.seed,
        "validation": {
            **validation,
            "classifier_best_val_auc": results["classifier"].best,
            "segmenter_best": results["segmenter"].best,
            "segmenter_monitor": results["segmenter"].monitor,
        },
        "durations_minutes": _durations(results),
        "data": data.summary(),
        "splits_file": SPLITS_FILE,
        "run_dir": str(run_dir),
        "config": config_to_dict(config),
    }
    if is_chief():
        save_pair(run_dir, results["classifier"].model, results["segmenter"].model, meta)
        log.info("pair saved: %s (classifier.keras, segmenter.keras, %s)", run_dir, META_FILE)
    return validation


def _durations(results: dict[str, StageResult]) -> dict[str, float]:
    out = {f"{name}_{p.name}": round(p.minutes, 2) for name, r in results.items() for p in r.phases}
    out["total_training"] = round(sum(out.values()), 2)
    return out


def _summary(
    config: Config,
    data: TrainingData,
    results: dict[str, StageResult],
    calibration,
    run_dir: Path,
    seconds: float,
    policy: str,
) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "pair_saved": (run_dir / META_FILE).is_file() and calibration is not None,
        "policy": policy,
        "backbone_weights": _weights_label(config),
        "stages": {
            name: {
                "best_" + r.monitor: r.best,
                "minutes": round(r.minutes, 2),
                "phases": [p.to_json() for p in r.phases],
                **r.info,
            }
            for name, r in results.items()
        },
        "calibration": calibration,
        "durations_minutes": {**_durations(results), "this_invocation": round(seconds / 60, 2)},
        "data": {k: v for k, v in data.summary().items() if k not in ("train", "val")}
        | {
            side: {k: v for k, v in data.summary()[side].items() if k != "patient_ids"}
            for side in ("train", "val")
        },
    }


def _log_summary(summary: dict[str, Any]) -> None:
    lines = [f"training summary -- run {summary['run_dir']}"]
    for name, stage in summary["stages"].items():
        best = next(
            (f"{k}={v:.4f}" for k, v in stage.items() if k.startswith("best_") and v is not None), "n/a"
        )
        phases = ", ".join(
            f"{p['name']} {p['epochs_run']} ep {p['minutes']:.1f} min ({p['stopped_by']})"
            for p in stage["phases"]
        )
        lines.append(f"  {name}: {best}; {phases}")
    cal = summary["calibration"]
    if cal and cal.get("fixed"):
        lines.append(f"  operating point fixed by calibration.fixed: threshold {cal['threshold']:.2f}, "
                     f"min_component_px {cal['min_component_px']} (no validation patients scored)")
    elif cal:
        lines.append(
            f"  validation ({cal['val_patients']} patients): threshold {cal['threshold']:.2f}, "
            f"min_component_px {cal['min_component_px']}, end-to-end mean per-patient Dice "
            f"{cal['val_mean_patient_dice']:.4f}, classifier AUC {cal['val_classifier'].get('roc_auc')}"
        )
    lines.append(
        f"  pair: {summary['run_dir'] if summary['pair_saved'] else 'not saved (a stage is missing)'}"
    )
    lines.append(f"  minutes: {summary['durations_minutes']}")
    lines.append(f"  backbone weights: {summary['backbone_weights']}; dtype policy: {summary['policy']}")
    log.info("\n".join(lines))
