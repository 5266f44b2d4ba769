"""`training.strategy: multi_worker` for real: two worker processes on loopback ports (TF_CONFIG),
the same quick-preset command each, train the tiny models together; only the chief writes the run
(checkpoints, logs, the pair) and the pair it saves loads and evaluates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.paths import PROJECT_ROOT
from tests.training_helpers import quick_args


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_one_pair_and_only_the_chief_writes(synthetic_root, tiny_pair, tmp_path):
    work, run_dir = tmp_path / "work", tmp_path / "run"
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    # the segmenter trains on both workers; the classifier comes from the tiny pair, which keeps the
    # test short (a ResNet50 traced under the collective strategy costs minutes on 2 cores)
    args = quick_args(synthetic_root, work, run_dir, "--set", "training.strategy=multi_worker",
                      "--set", "segmenter.epochs=2", "--stage", "segmenter",
                      "--classifier-from", str(tiny_pair))
    processes = []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(scratch),
               "TF_CONFIG": json.dumps(tf_config)}
        processes.append(subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert "CollectiveAllReduceStrategy with 2 replica(s)" in log
    # the chief wrote the run: checkpoints, histories, the pair
    for name in ("classifier.keras", "segmenter.keras", "pipeline.json", "segmenter/best.keras",
                 "segmenter/history_train.csv"):
        assert (run_dir / name).is_file(), name
    # the other worker wrote into a scratch folder of its own, removed at the end
    assert "writing its copy of the run to" in outputs[1][1]
    assert not list((tmp_path / "tmp1").glob("lgg-worker*"))
    assert "lgg-worker" not in log

    from pipeline.evaluation.evaluate import evaluate
    from pipeline.models.model_io import load_pair

    load_pair(run_dir)
    result = evaluate(models=run_dir, data_dir=synthetic_root, split="test", cache_dir=work / "cache",
                      n_boot=20, progress=False, backend="keras")
    assert 0 <= result.report["classifier"]["accuracy"] <= 1
