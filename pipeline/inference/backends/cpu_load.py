"""Other processes that keep this machine's cores busy: the load a variant must also agree under.

Why: an INT8 IR compiled with two streams gave Keras' maps on an idle CPU and wrong ones while
other processes ran (`openvino_runner` module docstring), so a check on an idle machine alone
can pass what fails in use (an evaluation beside a notebook, a batch beside a training).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["busy_cores", "core_count"]

_SPIN = "while True: pass"


def core_count() -> int:
    """The cores this process may run on (its affinity where the OS tells it, else `os.cpu_count`)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def busy_cores(n: int | None = None) -> Iterator[list[Any]]:
    """Run `n` (default `core_count()`) spinning child processes while the block runs; yields
    their `subprocess.Popen`s. They are killed and reaped on the way out, whatever the block raised."""
    n = core_count() if n is None else int(n)
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield spinners
    finally:
        for process in spinners:
            process.kill()
        for process in spinners:
            process.wait()
