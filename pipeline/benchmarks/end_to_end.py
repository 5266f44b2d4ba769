"""Throughput of the whole two-stage pipeline (`python -m pipeline bench pipeline`) against a baseline.

Slices: 256x256 slices with about one third tumour slices, taken from the dataset when it is
present (`--data-dir`, `$LGG_DATA_DIR`, `data/kaggle_3m`, else the shared development copy
`../shared/data/kaggle_3m`), otherwise synthetic ones (a bright FLAIR ellipse in a darker disc).

Models: the trained pair when there is one (`--models`, else `models/`, else the newest run;
`--fresh-models` to skip it), with its calibrated threshold; otherwise freshly built models at
the default sizes (classifier at 128, ResUNet 16 filters / depth 4) with `weights="none"`,
whose untrained gate is set to the probability quantile that flags one third of the slices,
so the segmenter sees a realistic share. The output says which.

Backends (`--backends`, default keras,openvino): Keras runs once per dtype policy of
`--policies`; OpenVINO once per precision hint of `--precisions` (default auto: what diagnose
would use), with its IR from the same cache as diagnose (an export on the first run happens
before timing). Each row runs in a fresh process (the Keras policy is process-wide). There, the
models are built under the policy (a trained pair's weights are copied into models rebuilt
under it, since saved layers keep the policy they were saved with), one untimed pass over the
slices warms up (graph tracing, OpenVINO compilation), then one timed pass measures:

* classifier: `TumorPipeline.classify` on every slice (batched);
* segmenter: `TumorPipeline.segment_probabilities` on the flagged slices (per flagged slice);
* end to end: `TumorPipeline.predict` in chunks of `--batch-size` (gate, segmentation,
  post-processing and measurements, as `diagnose` runs it; file decoding not included);
* stages only: the slices over the two stage times added up, the rate end to end would have
  if nothing but the models took time (the gap to end to end is the time outside the models).

The baseline, in its own float32 process, is the course's way: ResNet50 at 256x256 and the
ResUNet on *every* slice, one slice at a time through `model.predict`. Peak memory is each
process's peak resident set size. Numbers depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time
from pathlib import Path
from typing import Any

from pipeline.benchmarks import run_worker, worker_main
from pipeline.data.synthetic_slices import TUMOUR_SHARE
from pipeline.inference.backends.base import AUTO, KERAS, OPENVINO

SLICE_SIZE = 256
TARGET_SLICES_PER_S = 40.0
DEFAULT_N_SLICES = 96
DEFAULT_BASELINE_SLICES = 24
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "kaggle_3m"
DEFAULT_BACKENDS = (KERAS, OPENVINO)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser) -> None:
    """Flags of the end-to-end benchmark (added to `bench` as an argument group; `bench` adds the
    shared --models/--run and --data-dir)."""
    parser.add_argument(
        "--n-slices",
        type=int,
        default=DEFAULT_N_SLICES,
        help=f"slices per timed pass, about one third with tumour (default {DEFAULT_N_SLICES})",
    )
    parser.add_argument(
        "--baseline-slices",
        type=int,
        default=DEFAULT_BASELINE_SLICES,
        help=f"slices timed for the one-at-a-time baseline; 0 skips it (default {DEFAULT_BASELINE_SLICES})",
    )
    parser.add_argument(
        "--backends", type=_csv, default=DEFAULT_BACKENDS,
        help=f"comma-separated backends to time side by side (default {','.join(DEFAULT_BACKENDS)})",
    )
    parser.add_argument(
        "--precisions", type=_csv, default=("auto",),
        help="comma-separated OpenVINO variants (auto, f32, bf16, int8; default auto)",
    )
    parser.add_argument(
        "--fresh-models",
        action="store_true",
        help="time freshly built untrained models even when a trained pair exists",
    )


# --------------------------------------------------------------------------- slices


def _dataset_root(flag: str | None) -> Path | None:
    from pipeline.paths import resolve_data_dir

    for root in (resolve_data_dir(flag), SHARED_DATA):
        if root.is_dir() and any(root.glob("*/*_mask.tif")):
            return root
        if flag:  # an explicit --data-dir that holds nothing is not silently replaced
            break
    return None


def _dataset_slices(root: Path, n: int, seed: int = 0):
    """n 256x256 slices from the dataset, round(n / 3) of them with tumour, picked at random."""
    import numpy as np

    from pipeline.data.tiff_io import read_image, read_mask

    rng = np.random.default_rng(seed)
    masks = sorted(root.glob("*/*_mask.tif"))
    rng.shuffle(masks)
    want_tumour = round(n * TUMOUR_SHARE)
    tumour, clear = [], []
    for mask_path in masks:
        if len(tumour) >= want_tumour and len(clear) >= n - want_tumour:
            break
        image_path = mask_path.with_name(mask_path.name.replace("_mask.tif", ".tif"))
        try:
            has_tumour = bool(read_mask(mask_path).any())
            bucket, limit = (tumour, want_tumour) if has_tumour else (clear, n - want_tumour)
            if len(bucket) < limit:
                image = read_image(image_path)
                if image.shape[:2] == (SLICE_SIZE, SLICE_SIZE):
                    bucket.append(image)
        except Exception:  # noqa: BLE001 - a damaged file is simply not sampled
            continue
    images = tumour + clear
    order = rng.permutation(len(images))
    return [images[i] for i in order], len(tumour)


def load_slices(data_dir: str | None, n: int) -> tuple[list, int, str]:
    """(slices, number with tumour, where they came from)."""
    root = _dataset_root(data_dir)
    if root is not None:
        images, n_tumour = _dataset_slices(root, n)
        if len(images) >= min(n, 3):
            return images, n_tumour, f"dataset {root}"
    from pipeline.data.synthetic_slices import synthetic_slices

    images, n_tumour = synthetic_slices(n, SLICE_SIZE)
    return images, n_tumour, "synthetic 256x256 slices (no dataset found)"


# --------------------------------------------------------------------------- models


def _find_pair(models: str | None, run: str | None, fresh: bool) -> Path | None:
    """The pair to time (`paths.resolve_pair`), None for fresh models or when there is no pair."""
    if fresh:
        return None
    from pipeline.errors import DataError
    from pipeline.paths import resolve_pair

    try:
        return resolve_pair(models, run).pair_dir
    except DataError:
        if models or run:
            raise
        return None


def _models_under_policy(pair_dir: Path | None):
    """(classifier, segmenter, the loaded `ModelPair` or None, description), the models built under
    the current global policy."""
    from pipeline.models.resnet_classifier import build_classifier
    from pipeline.models.resunet import build_resunet
    from pipeline.training.config import ClassifierConfig, SegmenterConfig

    if pair_dir is None:
        cls_cfg, seg_cfg = ClassifierConfig(), SegmenterConfig()
        classifier = build_classifier(
            cls_cfg.image_size, weights="none", dropout=cls_cfg.dropout, dense_units=cls_cfg.dense_units
        )
        segmenter = build_resunet(seg_cfg.base_filters, seg_cfg.depth)
        return (
            classifier,
            segmenter,
            None,
            (
                f"fresh untrained models (classifier {cls_cfg.image_size}px, "
                f"ResUNet {seg_cfg.base_filters}/{seg_cfg.depth}, weights=none)"
            ),
        )
    import keras

    from pipeline.models.model_io import load_pair
    from pipeline.models.precision import with_policy

    pair = load_pair(pair_dir)
    description = f"trained pair {pair_dir} (saved under {pair.meta.get('policy', '?')})"
    policy = keras.mixed_precision.global_policy().name
    classifier, segmenter = (with_policy(m, policy) for m in (pair.classifier, pair.segmenter))
    description += f"; run under {policy}"
    return classifier, segmenter, pair, description


# --------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed(fn) -> float:
    """Seconds one call of `fn()` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def predict_in_batches(pipe: Any, images: list, batch: int) -> None:
    """The end-to-end call pattern the bench times: `pipe.predict` on chunks of `batch` slices."""
    for start in range(0, len(images), batch):
        pipe.predict(images[start : start + batch])


def measure_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One policy in this process: build/load the models, warm up, time each stage and the whole."""
    import numpy as np

    from pipeline.inference.tumor_pipeline import TumorPipeline
    from pipeline.models.precision import apply_policy
    from pipeline.postprocessing import OperatingPoint

    policy = apply_policy(spec["policy"])
    images, n_tumour, source = load_slices(spec["data_dir"], spec["n_slices"])
    pair_dir = Path(spec["pair_dir"]) if spec["pair_dir"] else None
    classifier, segmenter, pair, models = _models_under_policy(pair_dir)
    batch = spec["batch_size"]
    options = {"batch_size": batch, "backend": spec.get("backend", KERAS),
               "precision": spec.get("precision", AUTO)}
    if pair is None:  # untrained models have no operating point: the default one, its gate set below
        pipe = TumorPipeline(classifier, segmenter, OperatingPoint(), tile_size=SLICE_SIZE, **options)
    else:
        # As diagnose builds it (`from_pair`: the pair's operating point, tile size and INT8 IRs).
        # Float32 rebuilds hold the files' weights exactly, so they share diagnose's IR cache entry
        # and INT8 IRs; rebuilds under another policy are hashed by their weights instead.
        exact = policy == "float32"
        rebuilt = dataclasses.replace(pair, classifier=classifier, segmenter=segmenter)
        if options["precision"] != AUTO:  # a forced variant is timed even where the pair's check failed it
            options["variant_record"] = {}
        pipe = TumorPipeline.from_pair(rebuilt, pair_dir if exact else None,
                                       **options, **({} if exact else {"model_sha256": {}}))

    probabilities = pipe.classify(images)  # warm-up of the classifier
    if pair_dir is None:  # untrained gate: flag the top third, as a trained one would on this mix
        pipe.threshold = float(np.quantile(probabilities, 1 - TUMOUR_SHARE))
    flagged = [im for im, p in zip(images, probabilities, strict=True) if p >= pipe.threshold]

    def end_to_end():
        predict_in_batches(pipe, images, batch)

    if flagged:
        pipe.segment_probabilities(flagged)  # warm-up
    end_to_end()  # warm-up of the exact call pattern
    t_cls = timed(lambda: pipe.classify(images))
    t_seg = timed(lambda: pipe.segment_probabilities(flagged)) if flagged else float("nan")
    t_e2e = timed(end_to_end)
    info = pipe.backend_info
    return {
        "kind": "pipeline",
        "backend": info["backend"],
        "policy": policy if info["backend"] == KERAS else info["segmenter_precision"],
        "precision": {"classifier": info["classifier_precision"], "segmenter": info["segmenter_precision"]},
        "models": models,
        "slices": source,
        "n_slices": len(images),
        "n_tumour": n_tumour,
        "n_flagged": len(flagged),
        "threshold": round(pipe.threshold, 4),
        "batch_size": batch,
        "classifier_slices_per_s": round(len(images) / t_cls, 2),
        "segmenter_slices_per_s": round(len(flagged) / t_seg, 2) if flagged else None,
        "end_to_end_slices_per_s": round(len(images) / t_e2e, 2),
        "stages_only_slices_per_s": round(len(images) / (t_cls + (t_seg if flagged else 0.0)), 2),
        "peak_rss_mb": _peak_rss_mb(),
        "failed_variant_check": _failed_checks(pair, spec.get("precision", AUTO)) if pair else [],
    }


def _failed_checks(pair: Any, precision: str) -> list[str]:
    """The models whose forced `precision` the pair's variant record marks failed on this CPU class."""
    from pipeline.models.pair_artifact import MODEL_ROLES
    from pipeline.models.precision import cpu_class
    from pipeline.models.variant_record import VARIANTS_KEY, applicable

    record, cpu = pair.meta.get(VARIANTS_KEY), cpu_class()
    return [role for role in MODEL_ROLES
            if applicable(record, role, cpu, pair.artifact.sha256).get(precision, {}).get("ok") is False]


def measure_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Course-style baseline in float32: ResNet50 at 256, then the ResUNet, on every slice, one at a time."""
    import numpy as np

    from pipeline.models.precision import apply_policy
    from pipeline.models.resnet_classifier import build_classifier
    from pipeline.models.resunet import build_resunet

    apply_policy("float32")
    images, n_tumour, source = load_slices(spec["data_dir"], spec["n_slices"])
    images = images[: spec["baseline_slices"]]
    classifier = build_classifier(SLICE_SIZE, weights="none")
    segmenter = build_resunet()

    def one_at_a_time():
        for image in images:
            x = image[None].astype(np.float32)
            classifier.predict(x, verbose=0)
            segmenter.predict(x, verbose=0)

    classifier.predict(images[0][None].astype(np.float32), verbose=0)  # build the predict functions
    segmenter.predict(images[0][None].astype(np.float32), verbose=0)
    seconds = timed(one_at_a_time)
    return {
        "kind": "baseline",
        "backend": KERAS,
        "policy": "float32",
        "slices": source,
        "n_slices": len(images),
        "models": "ResNet50 classifier at 256 + ResUNet 16/4, both on every slice, model.predict per slice",
        "classifier_slices_per_s": None,
        "segmenter_slices_per_s": None,
        "end_to_end_slices_per_s": round(len(images) / seconds, 2),
        "stages_only_slices_per_s": None,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --------------------------------------------------------------------------- the command


def format_report(report: dict[str, Any]) -> str:
    """The results as a table, with end-to-end speed-ups over the baseline and over Keras float32."""
    rows = report["results"]
    baseline = next((r for r in rows if r["kind"] == "baseline"), None)
    reference = next((r for r in rows if r["kind"] == "pipeline" and r.get("backend", KERAS) == KERAS
                      and r["policy"] == "float32"), None)
    pipeline_rows = [r for r in rows if r["kind"] == "pipeline"]
    lines = []
    if pipeline_rows:
        first = pipeline_rows[0]
        lines += [
            f"slices: {first['slices']}: {first['n_slices']} at {SLICE_SIZE}x{SLICE_SIZE}, "
            f"{first['n_tumour']} with tumour; batch {first['batch_size']}",
            f"models: {first['models']}",
            "",
        ]
    lines.append(
        f"{'run':<10} {'backend':<9} {'policy':<15} {'classifier/s':>12} {'segmenter/s':>12} "
        f"{'stages/s':>9} {'end-to-end/s':>13} {'flagged':>8} {'peak RSS MB':>12} {'x baseline':>10} "
        f"{'x keras f32':>11}"
    )

    def fmt(value, width):
        return f"{value:>{width}.1f}" if isinstance(value, int | float) else f"{'-':>{width}}"

    for r in rows:
        rate = r["end_to_end_slices_per_s"]
        ratio = rate / baseline["end_to_end_slices_per_s"] if baseline else None
        vs_keras = None
        if reference and r["kind"] == "pipeline":
            vs_keras = rate / reference["end_to_end_slices_per_s"]
        flagged = f"{r['n_flagged']}/{r['n_slices']}" if r["kind"] == "pipeline" else f"all/{r['n_slices']}"
        lines.append(
            f"{r['kind']:<10} {r.get('backend', 'keras'):<9} {r['policy']:<15} "
            f"{fmt(r['classifier_slices_per_s'], 12)} {fmt(r['segmenter_slices_per_s'], 12)} "
            f"{fmt(r.get('stages_only_slices_per_s'), 9)} {fmt(rate, 13)} "
            f"{flagged:>8} {fmt(r['peak_rss_mb'], 12)} {fmt(ratio, 10)} {fmt(vs_keras, 11)}"
            + (f"  (failed the variant check: {', '.join(r['failed_variant_check'])})"
               if r.get("failed_variant_check") else "")
        )
    env = report["environment"]
    lines += [
        "",
        "segmenter/s counts flagged slices only; end-to-end = classify all, segment flagged, measure; "
        "stages/s = the rate if only the two models took time.",
        f"cpu: {env.get('cpu')}; flags: {' '.join(env.get('cpu_flags', [])) or '-'}",
        f"baseline: {baseline['models']}" if baseline else "baseline: skipped",
        f"target: end to end >= {TARGET_SLICES_PER_S:.0f} slices/s and >= 2x the baseline; load average "
        f"{env['load_average_start']} at start, {env.get('load_average_end')} at end (CPU shared)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (from `commands/bench.py`), print the table, exit code 0."""
    from pipeline.benchmarks.models import distinct_policies, environment
    from pipeline.io_utils import atomic_write_json

    batch_size = int(getattr(args, "batch_size", 16))
    n_slices = int(getattr(args, "n_slices", None) or DEFAULT_N_SLICES)
    baseline_slices = int(getattr(args, "baseline_slices", DEFAULT_BASELINE_SLICES))
    if batch_size < 1 or n_slices < 3 or baseline_slices < 0:
        raise SystemExit("--batch-size must be >= 1, --n-slices >= 3, --baseline-slices >= 0")
    pair_dir = _find_pair(getattr(args, "models", None), getattr(args, "run", None),
                          bool(getattr(args, "fresh_models", False)))
    spec = {
        "batch_size": batch_size,
        "n_slices": n_slices,
        "data_dir": getattr(args, "data_dir", None),
        "pair_dir": str(pair_dir) if pair_dir else None,
        "baseline_slices": min(baseline_slices, n_slices),
    }
    env = environment()
    results = []
    backends = tuple(getattr(args, "backends", DEFAULT_BACKENDS))
    unknown = [b for b in backends if b not in DEFAULT_BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; valid: {', '.join(DEFAULT_BACKENDS)}")
    if KERAS in backends:
        for requested, resolved in distinct_policies(tuple(getattr(args, "policies", ("float32", "auto")))):
            print(f"  timing the pipeline on keras under {resolved} (requested {requested}) ...", flush=True)
            results.append(_run_worker({**spec, "kind": "pipeline", "policy": resolved, "backend": KERAS}))
    if OPENVINO in backends:
        for precision in dict.fromkeys(getattr(args, "precisions", ("auto",))):
            print(f"  timing the pipeline on openvino, precision {precision} ...", flush=True)
            results.append(_run_worker({**spec, "kind": "pipeline", "policy": "float32",
                                        "backend": OPENVINO, "precision": precision}))
    if spec["baseline_slices"]:
        print(f"  timing the course baseline on {spec['baseline_slices']} slices ...", flush=True)
        results.append(_run_worker({**spec, "kind": "baseline", "policy": "float32"}))
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {"environment": env, "config": spec, "results": results}
    print()
    print(format_report(report))
    out = getattr(args, "json", None)
    if out:
        atomic_write_json(out, report)
        print(f"\nwrote {out}")
    return 0


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    return measure_baseline(spec) if spec["kind"] == "baseline" else measure_pipeline(spec)


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    label = f"{spec.get('kind')}/{spec.get('backend', 'keras')}/{spec.get('precision') or spec.get('policy')}"
    return run_worker("pipeline.benchmarks.end_to_end", spec, label)


if __name__ == "__main__":
    raise SystemExit(worker_main(_measure, "worker process of `python -m pipeline bench pipeline`"))
