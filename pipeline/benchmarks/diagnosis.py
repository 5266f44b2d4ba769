"""`python -m pipeline bench diagnosis`: a whole `diagnose` run per executor, on the same inputs.

Each executor runs in a fresh process (`run_worker`): `run_diagnosis` over the same slice files
into a fresh OUT, twice. The first run ("cold") counts everything a user waits for: the models
loaded, for `ray` the local instance started, the actors started and their models loaded; the
second ("warm") runs in the same process, so with `ray` the instance is up already (as on a
cluster made with `ray start`), but the job's actors still start and load their models. The
rate is input slices per second of the whole run (decoding, models, PNGs, reports, page).
Ray's overhead is its time minus the local executor's on the same inputs.

The local executor also gets a third run with the pair loaded beforehand
(`run_diagnosis(pipeline=)`, as a caller diagnosing batch after batch holds it; timed after one
such run, since a study's batch lengths compile shapes of their own), against the models alone on
the same decoded slices (`TumorPipeline.predict` in batches, as `bench pipeline` times end to
end): their ratio is the share of a run's rate left once the models are loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.benchmarks import run_worker, worker_main

EXECUTORS = ("local", "ray")
DEFAULT_N_SLICES = 96


def _slice_files(data_dir: str | None, n: int) -> list[str]:
    """The first `n` image slices of the dataset's cases (whole cases first, so studies form)."""
    from pipeline.benchmarks.end_to_end import _dataset_root
    from pipeline.data.readers import is_mask_file

    root = _dataset_root(data_dir)
    if root is None:
        raise SystemExit("bench diagnosis needs the dataset (--data-dir or $LGG_DATA_DIR)")
    files: list[str] = []
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        files += sorted(str(p) for p in case.glob("*.tif") if not is_mask_file(p))
        if len(files) >= n:
            break
    return files[:n]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Two timed `run_diagnosis` runs of `spec["executor"]` on `spec["inputs"]` (worker process)."""
    from pipeline.inference.diagnosis import make_executor

    options = {} if spec["executor"] == "local" else {
        "address": spec.get("ray_address"), "concurrency": spec["concurrency"],
        "num_cpus": spec.get("ray_cpus")}
    executor = make_executor(spec["executor"], **options)
    pair = {"models_dir": spec["pair_dir"], "backend": spec["backend"]}
    runs = [_timed_run(spec, executor, **pair) for _ in range(2)]
    times, result = [seconds for seconds, _ in runs], runs[-1][1]
    n = len(spec["inputs"])
    row = {"executor": spec["executor"], "concurrency": spec["concurrency"], "slices": n,
           "failed": result.n_failed, "cold_s": round(times[0], 2), "warm_s": round(times[1], 2),
           "cold_slices_per_s": round(n / times[0], 1), "warm_slices_per_s": round(n / times[1], 1),
           "backend": result.settings["backend"]}
    if spec["executor"] == "local":
        row.update(_loaded_once(spec, executor))
    return row


def _timed_run(spec: dict[str, Any], executor: Any, **options: Any) -> tuple[float, Any]:
    """One `run_diagnosis` of `spec["inputs"]` into a fresh OUT, removed after -> (seconds, result)."""
    from pipeline.inference.diagnosis import run_diagnosis

    out = Path(tempfile.mkdtemp(prefix="bench-diagnosis-"))
    try:
        started = time.perf_counter()
        result = run_diagnosis(spec["inputs"], out / "out", batch_size=spec["batch_size"], resume=False,
                               progress=False, executor=executor, **options)
        return time.perf_counter() - started, result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _loaded_once(spec: dict[str, Any], executor: Any) -> dict[str, Any]:
    """The pair loaded once, then the models alone and a whole run with files on the same slices
    -> {load_s, models_slices_per_s, files_slices_per_s, files_to_models}."""
    from pipeline.benchmarks.end_to_end import predict_in_batches, timed
    from pipeline.inference.diagnosis.settings import load_pipeline
    from pipeline.inference.image_loading import load_slice

    started = time.perf_counter()
    pipe, _, _ = load_pipeline(None, spec["pair_dir"], None, allow_unverified=False, threshold=None,
                               min_component_px=None, batch_size=spec["batch_size"], backend=spec["backend"],
                               precision="auto")
    load_s = time.perf_counter() - started
    images = [load_slice(p) for p in spec["inputs"]]
    predict_in_batches(pipe, images, spec["batch_size"])  # warm-up: the first call compiles
    models_s = timed(lambda: predict_in_batches(pipe, images, spec["batch_size"]))
    _timed_run(spec, executor, pipeline=pipe)  # a warm-up too: a study's batch lengths compile their shapes
    files_s, _ = _timed_run(spec, executor, pipeline=pipe)
    n = len(images)
    return {"load_s": round(load_s, 2), "models_slices_per_s": round(n / models_s, 1),
            "files_slices_per_s": round(n / files_s, 1), "files_to_models": round(models_s / files_s, 3)}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'executor':<10}{'actors':>7}{'slices':>8}{'cold s':>9}{'slices/s':>10}{'warm s':>9}"
             f"{'slices/s':>10}"]
    for r in report["results"]:
        lines.append(f"{r['executor']:<10}{r['concurrency'] if r['executor'] == 'ray' else '-':>7}"
                     f"{r['slices']:>8}{r['cold_s']:>9.2f}{r['cold_slices_per_s']:>10.1f}{r['warm_s']:>9.2f}"
                     f"{r['warm_slices_per_s']:>10.1f}")
    local = next((r for r in report["results"] if r["executor"] == "local"), None)
    if local is not None and "load_s" in local:
        lines.append(f"local, the pair loaded once ({local['load_s']:.2f} s): models alone "
                     f"{local['models_slices_per_s']:.1f} slices/s, the whole run with files "
                     f"{local['files_slices_per_s']:.1f} slices/s "
                     f"({local['files_to_models']:.0%} of the models' rate)")
    for r in report["results"]:
        if local is not None and r["executor"] == "ray":
            lines.append(f"Ray's overhead against local: {r['cold_s'] - local['cold_s']:+.2f} s cold, "
                         f"{r['warm_s'] - local['warm_s']:+.2f} s warm ({r['concurrency']} actor(s))")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`bench diagnosis`: each executor of `--executors` on the same `--n-slices` slice files."""
    from pipeline.benchmarks.models import environment
    from pipeline.io_utils import atomic_write_json
    from pipeline.paths import resolve_pair

    executors = tuple(getattr(args, "executors", EXECUTORS))
    unknown = [e for e in executors if e not in EXECUTORS]
    if unknown:
        raise SystemExit(f"unknown executor(s) {unknown}; valid: {', '.join(EXECUTORS)}")
    inputs = _slice_files(getattr(args, "data_dir", None), int(args.n_slices or DEFAULT_N_SLICES))
    pair = resolve_pair(getattr(args, "models", None), getattr(args, "run", None)).pair_dir
    spec = {"inputs": inputs, "batch_size": int(args.batch_size), "backend": getattr(args, "backend", "auto"),
            "pair_dir": str(pair), "concurrency": int(getattr(args, "concurrency", 1)),
            "ray_address": getattr(args, "ray_address", None), "ray_cpus": getattr(args, "ray_cpus", None)}
    results = []
    for name in executors:
        print(f"  diagnosing {len(inputs)} slices with the {name} executor (cold, then warm) ...", flush=True)
        results.append(run_worker("pipeline.benchmarks.diagnosis", {**spec, "executor": name}, name))
    env = environment()
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    config = {k: v for k, v in spec.items() if k != "inputs"}
    report = {"environment": env, "config": config, "results": results}
    print()
    print(format_report(report))
    if getattr(args, "json", None):
        atomic_write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(measure, "worker process of `python -m pipeline bench diagnosis`"))
