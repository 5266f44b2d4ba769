"""Measurements in a fresh Python process: the parent runs `python -m <module> --worker SPEC`, the
worker prints one marked JSON line that the parent reads back.

Why a fresh process: the Keras dtype policy is process-wide and sticks once layers are built, and
TensorFlow's thread pools and memory stay with the process, so two measurements in one process
would not be independent. Used by the benchmarks and by the training-policy probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["RESULT_MARKER", "WORKER_TIMEOUT_S", "run_worker", "worker_main"]

RESULT_MARKER = "BENCH_RESULT "
WORKER_TIMEOUT_S = 3600


def run_worker(module: str, spec: dict[str, Any], label: str,
               timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run `python -m <module> --worker <spec as JSON>` and return the row it printed.

    Raises RuntimeError with the worker's last stderr lines (naming `label`) when it gives none.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"worker {label} failed (exit {proc.returncode}):\n{tail}")


def worker_main(measure: Callable[[dict[str, Any]], dict[str, Any]], description: str) -> int:
    """Entry point of a worker process: parse `--worker SPEC`, run `measure(spec)`, print the marked row."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", required=True, help="JSON spec of one measurement")
    row = measure(json.loads(parser.parse_args().worker))
    print(RESULT_MARKER + json.dumps(row), flush=True)
    return 0
