"""`training.policy: auto` where the CPU's flags do not settle it: time both policies, keep the faster.

Whether mixed_bfloat16 trains faster than float32 depends on the CPU *and* on the model. Measured
with `bench models` at 128 px crops, batch 16 (train images/s, float32 -> mixed_bfloat16):

* 2-core AMD EPYC, AVX512-BF16, no AMX (TensorFlow 2.21): the ResNet50-encoder U-Net 12.3 -> 18.6
  (1.52x), the ResUNet 35.0 -> 31.2 (0.89x);
* 2-core Intel Xeon, AVX512-BF16, no AMX: the ResUNet 20.2 -> 14.3 (0.71x);
* with AMX, bf16 wins (the ResNet50-encoder U-Net 8.0 -> 13.5); without native bfloat16 it is emulated.

So `pipeline.models.precision.resolve_policy` keeps its flag rule (GPU: mixed_float16, AMX:
mixed_bfloat16, no native bfloat16: float32) and where it cannot tell (`needs_timing`: AVX512-BF16
without AMX) a training run times a few `train_on_batch` steps of each model it trains, under each
policy, each in a fresh process (`pipeline.workers`; the policy is process-wide), and keeps
mixed_bfloat16 only when the summed seconds per image of its models are `BF16_MARGIN` lower. The
result is cached per CPU, TensorFlow version and model shapes in `<cache>/training_policy.json`,
so the probe (about a minute) is paid once per machine and design.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.io_utils import atomic_write_json
from pipeline.models.precision import AUTO, cpu_flags, cpu_model_name, needs_timing, resolve_policy
from pipeline.workers import run_worker, worker_main

log = logging.getLogger(__name__)

__all__ = ["BF16_MARGIN", "CACHE_FILE", "CANDIDATES", "choose", "model_specs", "time_train_step",
           "training_policy"]

CANDIDATES = ("float32", "mixed_bfloat16")
BF16_MARGIN = 1.10  # bf16 must be this much faster: float32 rounds less, so a tie goes to it
CACHE_FILE = "training_policy.json"
SLICE_SIZE = 256  # the classifier trains on whole slices (resized inside the model)
PROBE_STEPS, PROBE_WARMUP = 4, 2
PROBE_TIMEOUT_S = 900


def model_specs(config: Any, stage: str) -> list[dict[str, Any]]:
    """What to time for a run of `stage` (`classifier`, `segmenter` or `all`): one spec per model,
    its design, training input side and batch, as `_build` reads them."""
    specs = []
    if stage in ("classifier", "all"):
        c = config.classifier
        specs.append({"stage": "classifier", "image_size": c.image_size, "dense_units": c.dense_units,
                      "finetune_mode": c.finetune_mode, "size": SLICE_SIZE, "batch": c.batch_size})
    if stage in ("segmenter", "all"):
        s = config.segmenter
        design = ({"encoder_stages": s.encoder_stages, "encoder_trainable": s.encoder_trainable,
                   "decoder_filters": list(s.decoder_filters)} if s.encoder == "resnet50"
                  else {"base_filters": s.base_filters, "depth": s.depth})
        specs.append({"stage": "segmenter", "encoder": s.encoder, **design,
                      "size": s.crop_size or SLICE_SIZE, "batch": s.batch_size})
    return specs


def choose(rates: dict[str, list[float]], margin: float = BF16_MARGIN) -> str:
    """The policy to train under, from {policy: [train images/s of each model]}: mixed_bfloat16
    only when its summed seconds per image are at least `margin` times lower than float32's."""
    seconds = {p: sum(1.0 / r for r in rs) for p, rs in rates.items()}
    return "mixed_bfloat16" if seconds["float32"] >= margin * seconds["mixed_bfloat16"] else "float32"


def _cache_key(specs: list[dict[str, Any]]) -> str:
    import tensorflow as tf

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    return (f"{cpu_model_name()} [{' '.join(flags)}] x{os.cpu_count()} tf{tf.__version__} "
            f"{json.dumps(specs, sort_keys=True)}")


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or malformed file counts as empty (it only saves time)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _measure(spec: dict[str, Any], policy: str) -> float:
    row = run_worker(__name__, {**spec, "policy": policy}, f"timing {spec['stage']} under {policy}",
                     timeout_s=PROBE_TIMEOUT_S)
    return float(row["train_images_per_s"])


def training_policy(config: Any, stage: str, cache_dir: str | os.PathLike, *, several_workers: bool = False,
                    measure: Callable[[dict[str, Any], str], float] = _measure) -> str:
    """The concrete dtype policy a run of `stage` trains under: `training.policy` as given unless
    it is `auto`; `auto` by the flag rule (`resolve_policy`) unless `needs_timing()`, and then the
    faster of `CANDIDATES` for this run's models (module docstring), cached in `cache_dir`.
    Nothing is timed for a multi-worker run (`several_workers`: it trains in float32 whatever is
    chosen, `distribute.worker_settings`) nor an eager one (`training.run_eagerly`: smoke runs,
    whose steps say nothing about graph-mode speed and cost less than the probe)."""
    if (str(config.training.policy).strip().lower() != AUTO or several_workers or config.training.run_eagerly
            or not needs_timing()):
        return resolve_policy(config.training.policy)
    specs = model_specs(config, stage)
    path = Path(cache_dir) / CACHE_FILE
    cache = _read_cache(path)
    key = _cache_key(specs)
    known = cache.get(key)
    if isinstance(known, dict) and known.get("policy") in CANDIDATES:
        log.info("dtype policy %s: timed on this CPU before (%s)", known["policy"], path)
        return known["policy"]
    log.info("auto dtype policy: AVX512-BF16 without AMX, timing %s under %s", ", ".join(
        s["stage"] for s in specs), " and ".join(CANDIDATES))
    try:
        rates = {p: [measure(s, p) for s in specs] for p in CANDIDATES}
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # a failed probe must not stop the run
        policy = resolve_policy(AUTO)
        log.warning("timing the dtype policies failed, training under the flag rule's %s: %s", policy, exc)
        return policy
    policy = choose(rates)
    log.info("dtype policy %s (train images/s per model: %s)", policy, rates)
    cache[key] = {"policy": policy, "train_images_per_s": rates,
                  "measured": datetime.now(UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cache)
    return policy


# --------------------------------------------------------------------------- the worker


def time_train_step(fn: Callable[[], Any], steps: int, warmup: int) -> float:
    """Seconds per call of `fn` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def _build(spec: dict[str, Any]) -> Any:
    """The model of one spec (no pretrained weights: they do not change the compute)."""
    if spec["stage"] == "classifier":
        from pipeline.models.resnet_classifier import build_classifier, set_backbone_trainable

        model = build_classifier(image_size=spec["image_size"], weights="none",
                                 dense_units=spec["dense_units"])
        set_backbone_trainable(model, spec["finetune_mode"])
        return model
    if spec["encoder"] == "resnet50":
        from pipeline.models.resnet_unet import build_resnet_unet

        return build_resnet_unet(spec["encoder_stages"], spec["decoder_filters"], spec["encoder_trainable"],
                                 weights="none")
    from pipeline.models.resunet import build_resunet

    return build_resunet(base_filters=spec["base_filters"], depth=spec["depth"])


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import numpy as np

    from pipeline.models.precision import apply_policy

    apply_policy(spec["policy"])
    rng = np.random.default_rng(0)
    n, size = int(spec["batch"]), int(spec["size"])
    x = rng.uniform(0, 255, size=(n, size, size, 3)).astype("float32")
    y_shape = (n, 1) if spec["stage"] == "classifier" else (n, size, size, 1)
    y = (rng.uniform(size=y_shape) > 0.9).astype("float32")
    model = _build(spec)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.BinaryCrossentropy())
    seconds = time_train_step(lambda: model.train_on_batch(x, y), PROBE_STEPS, PROBE_WARMUP)
    return {"train_images_per_s": round(n / seconds, 3)}


if __name__ == "__main__":
    raise SystemExit(worker_main(_worker, "worker process of the training-policy probe"))
