"""What an executor is handed (`Job`) and how it hands back a finished unit (`Record`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.inference.diagnosis.planning import WorkUnit
from pipeline.inference.diagnosis.settings import PipelineSource
from pipeline.inference.diagnosis.units import UnitContext
from pipeline.inference.outputs import OutputWriter

Record = Callable[[WorkUnit, list[dict[str, Any]]], None]  # a finished unit and its journal records


@dataclass
class Job:
    """Everything an executor needs to diagnose `units` into `out`."""

    units: list[WorkUnit]
    out: Path
    protected: list[Path]  # inputs: never written over
    volumes: bool
    explain: bool
    pipeline: Any  # loaded here (the local executor runs it)
    source: PipelineSource  # how another process loads the same pipeline

    def context(self) -> UnitContext:
        """A unit context with the pipeline loaded here and a writer into OUT."""
        return UnitContext(self.pipeline, OutputWriter(self.out, self.protected), self.volumes, self.explain)
