"""Throughput benchmarks (not tests): `models` times each stage alone, `end_to_end` the whole pipeline.

Each measurement runs in a fresh Python process, because the Keras dtype policy is global
and sticks once set; the worker prints one marked JSON line that the parent reads back.
"""

from __future__ import annotations

from pipeline.workers import RESULT_MARKER, WORKER_TIMEOUT_S, run_worker, worker_main

__all__ = ["RESULT_MARKER", "WORKER_TIMEOUT_S", "run_worker", "worker_main"]
