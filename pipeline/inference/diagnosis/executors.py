"""Executors: who runs the work units. The seam between planning and reporting.

An executor takes a `Job` (the units, OUT, the inputs never to write over, the settings that
change outputs, the pipeline and how to load it again) and calls `record(unit, records)` once per
finished unit with its journal records; the caller journals them and builds the reports, so
every executor resumes the same way. `local` runs here, overlapping I/O with the models;
`ray` (`pipeline.inference.diagnosis.ray_executor`) spreads the units over a Ray cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from pipeline.inference.diagnosis.job import Job, Record
from pipeline.inference.diagnosis.journal import slice_records
from pipeline.inference.diagnosis.planning import SLICE_STUDY, STUDY, WorkUnit
from pipeline.inference.diagnosis.units import (
    UnitContext,
    finish_unit,
    load_unit,
    predict_unit,
    run_study,
)

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    name: str

    def run(self, job: Job, record: Record) -> None: ...


class LocalExecutor:
    """This process: a helper thread decodes the next unit and writes the last unit's outputs
    while the models run (decoding and writing PNGs are ~10 % of a diagnosis on OpenVINO); a
    unit is recorded once its outputs are written, so an interruption loses none. Grad-CAM runs
    the Keras classifier, so with `explain` outputs are written in line. Studies come last."""

    name = "local"

    def run(self, job: Job, record: Record) -> None:
        ctx = job.context()
        _overlapped([u for u in job.units if u.kind != STUDY], ctx, record)
        for unit in job.units:
            if unit.kind == STUDY:
                record(unit, run_study(unit, ctx))


def _finish(io: ThreadPoolExecutor, ctx: UnitContext, loaded: Any, results: list[Any], failed: Any) -> Future:
    """Write a predicted unit's outputs: in the helper thread, or in line with `explain`."""
    if not ctx.explain:
        return io.submit(finish_unit, ctx.writer, loaded, results, failed, ctx.pipeline, False)
    rows, impossible = finish_unit(ctx.writer, loaded, results, failed, ctx.pipeline, ctx.explaining)
    ctx.explain_failed = ctx.explain_failed or impossible
    done: Future = Future()
    done.set_result((rows, impossible))
    return done


def _record(pending: tuple[WorkUnit, Future], record: Record) -> None:
    unit, done = pending
    rows, _ = done.result()
    record(unit, slice_records(unit.paths, rows))


def _overlapped(units: Sequence[WorkUnit], ctx: UnitContext, record: Record) -> None:
    """Diagnose units of slice files in order, reading ahead and writing behind in a helper thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diagnose-io") as io:
        ahead = io.submit(load_unit, units[0].paths) if units else None
        pending: tuple[WorkUnit, Future] | None = None
        try:
            for number, unit in enumerate(units):
                loaded, failed = ahead.result()
                following = number + 1 < len(units)
                ahead = io.submit(load_unit, units[number + 1].paths) if following else None
                results = predict_unit(ctx.pipeline, loaded, unit.kind == SLICE_STUDY)
                done = _finish(io, ctx, loaded, results, failed)
                if pending is not None:
                    _record(pending, record)
                pending = (unit, done)
        except BaseException:  # an interruption: keep the unit whose outputs are being written
            if pending is not None:
                with contextlib.suppress(Exception):
                    _record(pending, record)
            raise
        if pending is not None:
            _record(pending, record)


def make_executor(name: str = "local", **options: Any) -> Executor:
    """The executor called `name` (EXECUTORS); `options` go to the Ray executor
    (`address`, `concurrency`, `cpus_per_actor`, `gpus_per_actor`, `num_cpus`)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from pipeline.inference.diagnosis.ray_executor import RayExecutor

        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
