"""Which `tf.distribute` strategy training runs under; one code path for CPU, one GPU and many.

Models are always built and compiled inside ``strategy.scope()``; with the default strategy
that scope changes nothing, so single-device training is not a special case.

Options (``training.strategy`` in the config):

- ``auto`` (default): `tf.distribute.MirroredStrategy` when more than one GPU is visible,
  otherwise the default strategy (CPU or one GPU).
- ``default``: always the default strategy.
- ``mirrored``: `MirroredStrategy` over every visible GPU (synchronous data parallelism on one
  machine; the configured batch sizes are *global* batches, split across the replicas).
- ``multi_worker``: `tf.distribute.MultiWorkerMirroredStrategy` for users who outgrow one
  machine. Every worker runs the same command with the same config; the cluster comes from
  the ``TF_CONFIG`` environment variable, e.g. on worker 0 of two::

      export TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                         "task": {"type": "worker", "index": 0}}'
      python -m pipeline train --set training.strategy=multi_worker --run-dir /shared/runs/exp1

  (``"index": 1`` on the second host). Point ``--run-dir`` at storage all workers see; the
  chief (index 0) writes the final models. Batch sizes are global across all workers.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Return the `tf.distribute.Strategy` for `name` (one of `STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            log.warning("multi_worker strategy without TF_CONFIG: running as a single worker")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "mirrored" or (name == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    log.info(
        "distribution: %s with %d replica(s) (%d GPU visible)",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        len(gpus),
    )
    return strategy


def is_chief() -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster (from TF_CONFIG).

    With an explicit "chief" task the chief is that task; otherwise worker 0 acts as chief.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    spec = json.loads(raw)
    task = spec.get("task", {})
    if "chief" in spec.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0
