"""Throughput benchmarks (not tests): `models` times each stage alone, `end_to_end` the whole pipeline.

Each measurement runs in a fresh Python process, because the Keras dtype policy is global
and sticks once set; the worker prints one marked JSON line that the parent reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

RESULT_MARKER = "BENCH_RESULT "
WORKER_TIMEOUT_S = 3600


def run_worker(module: str, spec: dict[str, Any], label: str) -> dict[str, Any]:
    """Run `python -m <module> --worker <spec as JSON>` and return the row it printed.

    Raises RuntimeError with the worker's last stderr lines (naming `label`) when it gives none.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"benchmark worker {label} failed (exit {proc.returncode}):\n{tail}")


def worker_main(measure: Callable[[dict[str, Any]], dict[str, Any]], description: str) -> int:
    """Entry point of a worker process: parse `--worker SPEC`, run `measure(spec)`, print the marked row."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", required=True, help="JSON spec of one measurement")
    row = measure(json.loads(parser.parse_args().worker))
    print(RESULT_MARKER + json.dumps(row), flush=True)
    return 0
