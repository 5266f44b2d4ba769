"""Throughput of each stage alone: training and inference images/s, float32 vs mixed precision.

For every (stage, policy) pair a fresh Python process builds the model (the global dtype
policy is process-wide and sticks once layers are built), feeds random 0..255 batches at
`image_size` x `image_size`, runs `warmup` untimed steps and then `steps` timed steps of

* inference: `model.predict_on_batch` (compiled predict function);
* training:  `model.train_on_batch` with Adam and binary cross-entropy. The classifier
  trains in the `classifier_mode` strategy (default `all`: fine-tuning, the costlier phase).

and reports images/s and the process's peak resident memory. This is a measurement to quote,
never a test: numbers depend on the machine and on whatever else runs on it (the load
average is printed with the results).

Stages: `classifier` (the ResNet50 classifier), `segmenter` (the course ResUNet) and
`resnet_unet` (the ResNet50-encoder U-Net of `segmenter.encoder: resnet50` with its defaults:
stages 1-4, stage 4 fine-tuned), the ensemble member that costs the most to train.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass

from pipeline.benchmarks import run_worker, worker_main
from pipeline.training.policy_probe import time_train_step as _timed

STAGES = ("classifier", "segmenter", "resnet_unet")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. `policies` are names for `pipeline.models.precision.resolve_policy`."""

    policies: tuple[str, ...] = ("float32", "auto")
    stages: tuple[str, ...] = STAGES
    batch_size: int = 16
    steps: int = 5
    warmup: int = 2
    image_size: int = 256
    classifier_mode: str = "all"


def measure_stage(stage: str, policy: str, *, batch_size: int, steps: int, warmup: int, image_size: int,
                  classifier_mode: str = "all") -> dict:
    """Measure one stage under one policy in this process; returns a result row (dict).

    Sets the global dtype policy, so call it in a fresh process (as `run` does).
    """
    import keras
    import numpy as np

    from pipeline.models.backbone_weights import BackboneWeightsMissing, resolve_backbone_weights
    from pipeline.models.precision import apply_policy
    from pipeline.models.resnet_classifier import build_classifier, set_backbone_trainable
    from pipeline.models.resnet_unet import build_resnet_unet
    from pipeline.models.resunet import build_resunet

    resolved = apply_policy(policy)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(batch_size, image_size, image_size, 3)).astype("float32")
    row: dict = {"stage": stage, "policy_requested": policy, "policy": resolved}
    try:  # ImageNet weights make the graph identical to training (BN in inference mode)
        weights = "imagenet" if resolve_backbone_weights("imagenet") else "none"
    except BackboneWeightsMissing:
        weights = "none"
    if stage == "classifier":
        model = build_classifier(image_size=image_size, weights=weights)
        set_backbone_trainable(model, classifier_mode)
        y = rng.integers(0, 2, size=(batch_size, 1)).astype("float32")
        row.update(backbone_weights=weights, classifier_mode=classifier_mode)
    elif stage in ("segmenter", "resnet_unet"):
        model = build_resunet() if stage == "segmenter" else build_resnet_unet(weights=weights)
        y = (rng.uniform(size=(batch_size, image_size, image_size, 1)) > 0.9).astype("float32")
    else:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.BinaryCrossentropy())

    infer_s = _timed(lambda: model.predict_on_batch(x), steps, warmup)
    train_s = _timed(lambda: model.train_on_batch(x, y), steps, warmup)
    row.update(
        params=int(model.count_params()),
        batch_size=batch_size, steps=steps, warmup=warmup, image_size=image_size,
        infer_images_per_s=round(batch_size / infer_s, 2),
        train_images_per_s=round(batch_size / train_s, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    return row


def run_stage_worker(stage: str, policy: str, config: BenchConfig) -> dict:
    """Run `measure_stage` in a fresh Python process and return its result row."""
    spec = {"stage": stage, "policy": policy, "batch_size": config.batch_size, "steps": config.steps,
            "warmup": config.warmup, "image_size": config.image_size,
            "classifier_mode": config.classifier_mode}
    return run_worker("pipeline.benchmarks.models", spec, f"for {stage}/{policy}")


def distinct_policies(policies: tuple[str, ...]) -> list[tuple[str, str]]:
    """[(requested, resolved)] with duplicates removed (e.g. `auto` resolving to `float32`)."""
    from pipeline.models.precision import resolve_policy

    seen: dict[str, str] = {}
    for name in policies:
        resolved = resolve_policy(name)
        seen.setdefault(resolved, name)
    return [(requested, resolved) for resolved, requested in seen.items()]


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
               "amx_tile", "amx_bf16", "amx_int8")


def environment() -> dict:
    """Machine facts printed with the numbers."""
    import keras
    import tensorflow as tf

    from pipeline.models.precision import (
        cpu_flags,
        cpu_model_name,
        cpu_supports_bfloat16,
        gpu_available,
        resolve_policy,
    )

    return {
        "cpu": cpu_model_name(), "cpu_count": os.cpu_count(), "gpu": gpu_available(),
        "cpu_flags": sorted(cpu_flags() & set(SPEED_FLAGS)),
        "cpu_native_bfloat16": cpu_supports_bfloat16(), "auto_policy": resolve_policy("auto"),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def run(config: BenchConfig, progress=print) -> dict:
    """Measure every stage under every distinct policy; return {"environment", "results"}."""
    env = environment()
    results = []
    for requested, resolved in distinct_policies(config.policies):
        for stage in config.stages:
            progress(f"  measuring {stage} under {resolved} (requested {requested}) ...")
            results.append(run_stage_worker(stage, resolved, config))
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {"environment": env, "config": asdict(config), "results": results}


def format_report(report: dict) -> str:
    """Human-readable table of a `run` report, with speed-ups relative to float32."""
    env, rows = report["environment"], report["results"]
    lines = [
        f"CPU: {env['cpu']} ({env['cpu_count']} logical cores), GPU: {'yes' if env['gpu'] else 'no'}, "
        f"native bfloat16: {'yes' if env['cpu_native_bfloat16'] else 'no'} -> auto = {env['auto_policy']}",
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}; load average "
        f"{env['load_average_start']} at start, {env.get('load_average_end')} at end "
        "(other processes share the CPU: compare rows, not machines)",
        "",
        f"{'stage':<12} {'policy':<15} {'batch':>5} {'size':>5} {'train img/s':>12} {'infer img/s':>12} "
        f"{'peak RSS MB':>12} {'train x':>8} {'infer x':>8}",
    ]
    base = {r["stage"]: r for r in rows if r["policy"] == "float32"}
    for r in rows:
        ref = base.get(r["stage"])
        speed = f"{'':>8} {'':>8}"
        if ref:
            speed = (f"{r['train_images_per_s'] / ref['train_images_per_s']:>8.2f} "
                     f"{r['infer_images_per_s'] / ref['infer_images_per_s']:>8.2f}")
        lines.append(f"{r['stage']:<12} {r['policy']:<15} {r['batch_size']:>5} {r['image_size']:>5} "
                     f"{r['train_images_per_s']:>12.2f} {r['infer_images_per_s']:>12.2f} "
                     f"{r['peak_rss_mb']:>12.0f} {speed}")
    notes = sorted({f"classifier: backbone weights {r['backbone_weights']}, trains {r['classifier_mode']}"
                    for r in rows if r["stage"] == "classifier"})
    if notes:
        lines += ["", *notes, "training = train_on_batch (Adam, BCE); inference = predict_on_batch; "
                  "x = speed relative to float32"]
    return "\n".join(lines)


def _measure(spec: dict) -> dict:
    return measure_stage(spec.pop("stage"), spec.pop("policy"), **spec)


if __name__ == "__main__":
    raise SystemExit(worker_main(_measure, "worker process of `python -m pipeline bench models`"))
