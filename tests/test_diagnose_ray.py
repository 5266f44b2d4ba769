"""The `ray` executor on a real Ray: a local instance and a two-node cluster on loopback
(`ray.cluster_utils.Cluster`) give the reports and masks of `--executor local`, and a run killed
with SIGKILL resumes to the same complete outputs. Also, without Ray: work units survive the trip
as JSON, a unit that raises in a worker is its error rows, and Ray is imported only when used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.inference.diagnosis import COLUMNS, JOURNAL, WorkUnit, plan, ray_executor, run_diagnosis
from pipeline.inference.diagnosis.planning import StudyInput
from pipeline.inference.diagnosis.settings import PipelineSource
from tests.test_volumes import model_affine, model_study, write_nifti

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("report.csv", "patients.csv")


@pytest.fixture(scope="module")
def ray_inputs(synthetic_root, tmp_path_factory) -> Path:
    """A handful of slices (a Kaggle-layout study of four, three single slices) and one NIfTI study."""
    root = tmp_path_factory.mktemp("ray_inputs")
    case = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    slices = sorted(p for p in case.glob("*.tif") if not p.stem.endswith("_mask"))
    (root / "study").mkdir()
    for p in slices[:4]:
        shutil.copy(p, root / "study" / p.name)
    (root / "singles").mkdir()
    for k, p in enumerate(slices[4:7]):
        shutil.copy(p, root / "singles" / f"single{k}.tif")
    data, _ = model_study(n_slices=6, size=64)
    write_nifti(root / "TCGA_VV_0001.nii.gz", data, model_affine())
    return root


@pytest.fixture(scope="module")
def local_out(ray_inputs, tiny_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    run_diagnosis([ray_inputs], out, models_dir=tiny_pair, backend="keras", batch_size=1, progress=False)
    return out


def _same_outputs(a: Path, b: Path) -> None:
    for name in COMPARED:
        assert (a / name).read_text(encoding="utf-8") == (b / name).read_text(encoding="utf-8"), name
    for folder in ("masks", "volumes"):
        files = sorted(p.name for p in (a / folder).glob("*"))
        assert files == sorted(p.name for p in (b / folder).glob("*")), folder
        for name in files:
            assert (a / folder / name).read_bytes() == (b / folder / name).read_bytes(), name
    rows = [json.loads((o / "report.json").read_text(encoding="utf-8"))["rows"] for o in (a, b)]
    assert rows[0] == rows[1]


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on loopback, one CPU each; this process is connected to it."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_a_local_ray_instance_gives_the_local_executors_outputs(ray_inputs, local_out, tiny_pair, tmp_path):
    ray = pytest.importorskip("ray")
    from pipeline.inference.diagnosis.ray_executor import RayExecutor

    if ray.is_initialized():
        ray.shutdown()
    try:
        result = run_diagnosis([ray_inputs], tmp_path / "out", models_dir=tiny_pair, backend="keras",
                               batch_size=1, progress=False, executor=RayExecutor(num_cpus=2))
        assert result.exit_code == 0 and result.studies and not result.studies[0]["error"]
    finally:
        ray.shutdown()
    _same_outputs(local_out, tmp_path / "out")


@pytest.mark.slow
def test_a_two_node_cluster_gives_the_local_executors_outputs(cluster, ray_inputs, local_out, tiny_pair,
                                                               tmp_path):
    import ray

    from pipeline.inference.diagnosis.ray_executor import RayExecutor

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    executor = RayExecutor(address=cluster.address, concurrency=2, cpus_per_actor=1)
    result = run_diagnosis([ray_inputs], tmp_path / "out", models_dir=tiny_pair, backend="keras",
                           batch_size=1, progress=False, executor=executor)
    assert result.exit_code == 0
    _same_outputs(local_out, tmp_path / "out")


def _journal_records(out: Path) -> int:
    path = out / JOURNAL
    return max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1) if path.is_file() else 0


@pytest.mark.slow
def test_a_ray_run_killed_with_sigkill_resumes_to_the_same_outputs(cluster, ray_inputs, local_out, tiny_pair,
                                                                  tmp_path):
    """One unit per slice, so the driver is killed with units done and units to do."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "diagnose", str(ray_inputs), "--out", str(out),
               "--models", str(tiny_pair), "--backend", "keras", "--batch-size", "1", "--quiet",
               "--executor", "ray", "--ray-address", cluster.address]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while _journal_records(out) < 1 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert driver.poll() is None, driver.stderr.read().decode(errors="replace")[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    driver.stderr.close()
    done = _journal_records(out)
    total = 4 + 3 + 1  # the study's slices journal together; one record each, with the NIfTI study
    assert 1 <= done < total, f"{done} of {total} units journalled when killed"
    assert not (out / "report.csv").exists()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                           errors="replace", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "from an earlier run" in again.stdout
    _same_outputs(local_out, out)


def test_work_units_survive_the_trip_as_json(ray_inputs, tmp_path):
    trio = StudyInput.from_channels(str(tmp_path / "pre.nii"), str(tmp_path / "flair.nii"), None, "X")
    units = plan(sorted((ray_inputs / "singles").glob("*.tif")), [StudyInput(ray_inputs / "a.nii.gz"), trio],
                 batch_size=2, volumes=True)
    assert [u.kind for u in units] == ["slices", "slices", "study", "study"]
    assert [WorkUnit.from_json(json.loads(json.dumps(u.to_json()))) for u in units] == units


def test_a_unit_that_raises_in_a_worker_is_its_error_rows(ray_inputs, tmp_path, monkeypatch):
    from tests.inference_helpers import stub_pipeline

    def boom(unit, ctx):
        raise RuntimeError("worker lost its disk")

    monkeypatch.setattr(ray_executor, "run_unit", boom)
    paths = sorted((ray_inputs / "singles").glob("*.tif"))
    units = plan(paths, [StudyInput(ray_inputs / "TCGA_VV_0001.nii.gz")], batch_size=3, volumes=True)
    worker = ray_executor.UnitWorker(PipelineSource(given=stub_pipeline()), str(tmp_path), [], True, False)
    batch = {"unit": np.array([json.dumps(u.to_json()) for u in units], dtype=object)}
    records = [json.loads(r) for r in worker(batch)["records"]]
    rows = [r["row"] for r in records[0]]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert all(set(COLUMNS) <= set(r) and "worker lost its disk" in r["error"] for r in rows)
    (study,) = records[1]
    assert study["type"] == "study" and "worker lost its disk" in study["study"]["error"]


def test_ray_is_imported_only_by_the_ray_executor():
    code = (
        "import sys, pipeline.inference.diagnosis, pipeline.inference.diagnose, pipeline.commands.diagnose\n"
        "from pipeline.inference.diagnosis.executors import make_executor\n"
        "make_executor('local')\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True, timeout=120)
