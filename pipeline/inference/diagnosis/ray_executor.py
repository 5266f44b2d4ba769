"""The `ray` executor: the work units as a Ray Data dataset, diagnosed by actors that load the
models once each (`map_batches` with a callable class, as Ray's batch-inference guide does).

Workers write masks, overlays and mask NIfTIs into OUT themselves, so OUT must be a folder every
node sees at the same path (NFS, a shared disk), and so must the inputs. Each unit's journal
records come back to the driver, which journals them as they arrive and writes the reports: an
interrupted run resumes like a local one. A unit that raises is its error rows, never a failed job.
Ray is imported here only, when this executor is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference.diagnosis.job import Job, Record
from pipeline.inference.diagnosis.planning import WorkUnit
from pipeline.inference.diagnosis.settings import PipelineSource
from pipeline.inference.diagnosis.units import UnitContext, failed_unit, run_unit
from pipeline.inference.outputs import OutputWriter

log = logging.getLogger(__name__)


class UnitWorker:
    """A Ray Data actor: loads the pipeline once, then diagnoses one batch of units per call."""

    def __init__(self, source: PipelineSource, out: str, protected: list[str], volumes: bool, explain: bool):
        writer = OutputWriter(Path(out), [Path(p) for p in protected])
        self.ctx = UnitContext(source.load(), writer, volumes, explain)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for text in batch["unit"]:
            unit = WorkUnit.from_json(json.loads(text))
            try:
                unit_records = run_unit(unit, self.ctx)
            except Exception as exc:  # noqa: BLE001 - the unit's error rows, never a failed job
                log.warning("unit of %d input(s) failed", unit.size, exc_info=True)
                unit_records = failed_unit(unit, exc)
            records.append(json.dumps(unit_records, default=str))
        return {"unit": batch["unit"], "records": np.array(records, dtype=object)}


class RayExecutor:
    """Runs the units on Ray: the cluster at `address` (`auto`: the one `ray start` made on this
    machine), else a local instance of `num_cpus` CPUs (default: all). `concurrency` actors, each
    reserving `cpus_per_actor` CPUs and `gpus_per_actor` GPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, concurrency: int = 1, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0, num_cpus: int | None = None, progress: bool = False):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.address = address
        self.concurrency = concurrency
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.num_cpus = num_cpus
        self.progress = progress

    def _connect(self) -> Any:
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = self.progress
        return ray

    def run(self, job: Job, record: Record) -> None:
        if not job.units:
            return
        ray = self._connect()
        items = [{"unit": json.dumps(unit.to_json())} for unit in job.units]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            UnitWorker,
            fn_constructor_kwargs={
                "source": job.source, "out": str(job.out), "protected": [str(p) for p in job.protected],
                "volumes": job.volumes, "explain": job.explain,
            },
            batch_size=1,
            concurrency=self.concurrency,
            num_cpus=self.cpus_per_actor,
            num_gpus=self.gpus_per_actor,
        )
        for row in results.iter_rows():  # as they finish: each is journalled on arrival
            record(WorkUnit.from_json(json.loads(row["unit"])), json.loads(row["records"]))
