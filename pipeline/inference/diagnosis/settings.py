"""Which pipeline a diagnosis runs and the settings it records (report.json, the journal's header).

`PipelineSource` says how to get the same pipeline again in another process (a Ray actor on
another machine): the pair's folder and the overrides, or a pipeline object the caller gave.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.inference.outputs import text
from pipeline.paths import resolve_pair, safe_resolve


@dataclass(frozen=True)
class PipelineSource:
    """A pair folder and `TumorPipeline.from_dir`'s options, or (`given`) a ready pipeline."""

    pair_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    given: Any = None

    def load(self) -> Any:
        if self.given is not None:
            return self.given
        from pipeline.inference.tumor_pipeline import TumorPipeline

        return TumorPipeline.from_dir(self.pair_dir, **self.options)


def load_pipeline(
    pipeline: Any, models_dir: str | os.PathLike | None, run_dir: str | os.PathLike | None, *,
    allow_unverified: bool, threshold: float | None, min_component_px: int | None, batch_size: int,
    backend: str, precision: str,
) -> tuple[Any, PipelineSource, str]:
    """(pipeline, how to load it again, the `models` label of the settings): the caller's
    `pipeline` with the overrides applied, else the pair `resolve_pair(models_dir, run_dir)` picks."""
    if pipeline is not None:
        pipeline.point = pipeline.point.replace(threshold=threshold, min_component_px=min_component_px)
        label = text(str(models_dir)) if models_dir else "(pipeline given by the caller)"
        return pipeline, PipelineSource(given=pipeline), label
    source_dir = resolve_pair(models_dir, run_dir).pair_dir
    source = PipelineSource(
        pair_dir=str(source_dir),
        options={"allow_unverified": allow_unverified, "threshold": threshold,
                 "min_component_px": min_component_px, "batch_size": batch_size,
                 "backend": backend, "precision": precision},
    )
    return source.load(), source, text(str(safe_resolve(source_dir)))


def run_settings(pipeline: Any, models_label: str, volumes: bool, explain: bool) -> dict[str, Any]:
    """The settings recorded in report.json and the journal's header (resuming with others is
    refused, `Journal.load`): the pair, the operating point, which variant of each model ran
    (`variants`, e.g. openvino-int8) and the model files' sums."""
    return {
        "models": models_label,
        **pipeline.point.to_json(),  # the operating point applied, whole
        "volumes": bool(volumes) and hasattr(pipeline, "predict_volume"),
        "tile_size": int(pipeline.tile_size),
        "explain": bool(explain),
        "backend": str(pipeline.backend_name),
        "variants": dict(getattr(pipeline, "variants", None) or {}),
        "model_sha256": dict(getattr(pipeline, "model_sha256", None) or {}),
        "volume_domain": "axial PLS, 256x256 padded, uint8 as stored else min..max per channel",
    }
