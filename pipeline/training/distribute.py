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

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Return the `tf.distribute.Strategy` for `name` (one of `STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if name == "multi_worker":  # before any other TensorFlow call: it configures collective ops
        if not os.environ.get("TF_CONFIG"):
            log.warning("multi_worker strategy without TF_CONFIG: running as a single worker")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _patch_keras_multi_worker()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    elif name != "multi_worker":
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


@contextlib.contextmanager
def worker_dir(run_dir: Path) -> Iterator[Path]:
    """Where this process writes its run: `run_dir` for the chief; for any other worker of a
    multi-worker cluster a scratch folder of its own, removed at the end (TensorFlow's
    multi-worker tutorial does the same), so only the chief writes checkpoints, logs and the pair."""
    if is_chief():
        yield run_dir
        return
    index = json.loads(os.environ["TF_CONFIG"]).get("task", {}).get("index", 0)
    with tempfile.TemporaryDirectory(prefix=f"lgg-worker{index}-") as scratch:
        log.info("worker %s: writing its copy of the run to %s (removed at the end)", index, scratch)
        yield Path(scratch)



def across_workers(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_settings(strategy: tf.distribute.Strategy, policy: str, run_eagerly: bool) -> tuple[str, bool]:
    """(dtype policy, run_eagerly) to train with under `strategy`: as given, except across workers,
    where bfloat16 trains in float32 (TensorFlow's collective gather of predictions takes no
    bfloat16) and steps run as graphs (Keras' eager steps return per-replica values it cannot reduce)."""
    if not across_workers(strategy):
        return policy, run_eagerly
    if policy == "mixed_bfloat16":
        log.warning("multi_worker: collective ops take no bfloat16; training in float32")
        policy = "float32"
    if run_eagerly:
        log.info("multi_worker: training.run_eagerly is off (steps run as graphs across workers)")
    return policy, False


def _patch_keras_multi_worker() -> None:
    """Two fixes to Keras 3.15's TensorFlow trainer, without which `fit` fails on a
    MultiWorkerMirroredStrategy of more than one worker ("Attempt to convert a value (PerReplica)"):
    its first-batch build reduces the batch across replicas (it takes this replica's batch here),
    and its mean of the step's logs reduces scalars along axis 0 (scalars here take axis None)."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_lgg_multi_worker_patch", False):
        return
    original_reduce = trainer.reduce_per_replica

    def local(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        for _, _, it in iterator or ():
            data_batch = tree.map_structure(lambda v: local(self.distribute_strategy, v), next(it))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if not (trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean")):
            return original_reduce(values, strategy, reduction)

        def mean(v):
            if not (isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v)):
                return v
            return strategy.reduce("MEAN", v, axis=0 if local(strategy, v).shape.rank else None)

        return tree.map_structure(mean, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer._lgg_multi_worker_patch = True
