"""Issue 21, the output and trust side: shared output folders, the pair's trust root, caches
checked by behaviour, full disks and spreadsheet formulas. One test per case, each asserting the
exit code, the message and that the other inputs of the batch were diagnosed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.commands import diagnose as command
from pipeline.errors import DataError
from pipeline.inference.backends import openvino_available
from pipeline.inference.diagnosis import JOURNAL, reports, schema
from pipeline.inference.diagnosis import journal as journal_module
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.io_utils import csv_cell, exclusive_lock, write_csv
from pipeline.models.pair_artifact import (
    SUMS_FILE,
    read_pair_meta,
    read_pair_record,
    write_pair_meta,
    write_sums,
)
from pipeline.paths import PROJECT_ROOT
from tests.inference_helpers import stub_pipeline

CASE = "TCGA_CC_0005_20010505"  # slices 1-3 with tumour, 4-8 without


def _slices(root: Path, folder: Path, numbers=(1, 2, 4, 5)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(root / CASE / f"{CASE}_{n}.tif", folder / f"{CASE}_{n}.tif")) for n in numbers]


@pytest.fixture
def stub_models(tmp_path, monkeypatch) -> list[str]:
    """CLI arguments naming a stand-in pair whose pipeline is the stub models (no Keras files)."""
    pair = tmp_path / "stub_pair"
    pair.mkdir()
    (pair / "pipeline.json").write_text("{}")
    monkeypatch.setattr(
        TumorPipeline,
        "from_dir",
        classmethod(
            lambda cls, path, threshold=None, **kw: stub_pipeline(
                **({"threshold": threshold} if threshold is not None else {})
            )
        ),
    )
    return ["--models", str(pair), "--quiet", "--no-volumes"]


def _report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "report.csv")


def _journalled(out: Path) -> set[str]:
    lines = (out / JOURNAL).read_text().splitlines()
    return {json.loads(line)["key"] for line in lines[1:]}  # every line parses: none torn


# --------------------------------------------------------------------------- 4. one run per OUT


def test_a_second_run_into_a_locked_out_is_refused_and_the_lock_dies_with_its_process(
    synthetic_root, tmp_path, stub_models, capsys
):
    inputs = _slices(synthetic_root, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(out / schema.LOCK):  # a run in progress (flock: per open file, so this counts)
        assert (
            command.main([str(tmp_path / "in"), "--out", str(out), *stub_models]) == command.EXIT_OUT_IN_USE
        )
    err = capsys.readouterr().err
    assert "another diagnose is writing into this output folder" in err and str(out) in err
    assert not (out / "report.csv").exists() and not (out / JOURNAL).exists()  # nothing mixed in

    holder = subprocess.Popen(  # a run killed with -9 while holding the lock
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(out / schema.LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert command.main([str(tmp_path / "in"), "--out", str(out), *stub_models]) == command.EXIT_OK
    assert len(_report(out)) == len(inputs) and _report(out)["error"].isna().all()
    assert (
        schema.EXIT_OUT_IN_USE == command.EXIT_OUT_IN_USE
        and schema.EXIT_WRITE_FAILED == command.EXIT_WRITE_FAILED
    )


def test_resuming_with_other_settings_is_refused_naming_the_difference(
    synthetic_root, tmp_path, stub_models, capsys
):
    inputs = _slices(synthetic_root, tmp_path / "in")
    out, args = tmp_path / "out", [str(tmp_path / "in"), "--out", str(tmp_path / "out"), *stub_models]
    assert command.main(args) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["variants"] == {"classifier": "keras-float32", "segmenter": "keras-float32"}
    header = json.loads((out / JOURNAL).read_text().splitlines()[0])
    assert (
        header["variants"] == settings["variants"] and "model_sha256" in header and header["threshold"] == 0.6
    )

    assert command.main([*args, "--threshold", "0.99"]) == command.EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        "threshold: 0.6 in the journal, 0.99 now" in err and "--no-resume" in err and "Traceback" not in err
    )
    assert json.loads((out / "report.json").read_text())["settings"]["threshold"] == 0.6  # left as it was

    assert command.main([*args, "--threshold", "0.99", "--no-resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["threshold"] == 0.99 and report["summary"]["inputs"] == len(inputs)
    assert report["summary"]["flagged"] == 0  # every slice judged again under 0.99, none kept from 0.6
    assert "(from an earlier run)" not in capsys.readouterr().out


# --------------------------------------------------------------------------- 5. the trust root


def _pair_copy(tiny_pair: Path, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_pair, folder))


def test_a_pair_without_its_sha256sums_is_refused_unless_allowed(
    tiny_pair, synthetic_root, tmp_path, capsys, caplog
):
    inputs = _slices(synthetic_root, tmp_path / "in", numbers=(1, 4))
    assert (tiny_pair / SUMS_FILE).is_file()  # every saved pair has one (write_pair_meta)
    pair = _pair_copy(tiny_pair, tmp_path / "pair")
    (pair / SUMS_FILE).unlink()
    record = read_pair_record(pair)
    record["threshold"] = 0.01  # the edit a missing SHA256SUMS used to let through
    (pair / "pipeline.json").write_text(json.dumps(record))
    args = [str(tmp_path / "in"), "--models", str(pair), "--quiet"]

    assert command.main([*args, "--out", str(tmp_path / "refused")]) == command.EXIT_USAGE
    err = capsys.readouterr().err
    assert "SHA256SUMS is missing" in err and "--allow-unverified" in err and "Traceback" not in err
    assert not (tmp_path / "refused" / "report.csv").exists()

    with caplog.at_level(logging.WARNING, logger="pipeline.models.pair_artifact"):
        assert command.main([*args, "--out", str(tmp_path / "allowed"), "--allow-unverified"]) == 0
    assert "UNVERIFIED PAIR" in caplog.text and "SHA256SUMS is missing" in caplog.text
    assert (
        len(_report(tmp_path / "allowed")) == len(inputs)
        and _report(tmp_path / "allowed")["error"].isna().all()
    )

    swapped = _pair_copy(tiny_pair, tmp_path / "swapped")  # a model re-hashed in pipeline.json alone
    record = read_pair_record(swapped)
    record["sha256"]["segmenter.keras"] = "0" * 64
    (swapped / "pipeline.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="pipeline.json has .* SHA256SUMS records"):
        read_pair_meta(swapped)
    write_sums(swapped, ["classifier.keras", "segmenter.keras", "pipeline.json"])  # pipeline.json re-vouched
    with pytest.raises(DataError, match="different sha256 for segmenter.keras"):
        read_pair_meta(swapped)


def test_a_shipped_int8_file_failing_its_sum_is_refused_not_run_as_float32(
    tiny_pair, synthetic_root, tmp_path, capsys
):
    _slices(synthetic_root, tmp_path / "in", numbers=(1,))
    pair = _pair_copy(tiny_pair, tmp_path / "pair")
    (pair / "openvino").mkdir()
    for ext in ("xml", "bin"):
        (pair / "openvino" / f"segmenter.int8.{ext}").write_bytes(f"an INT8 {ext}".encode())
    record = read_pair_record(pair)
    record["openvino_int8"] = {
        "segmenter": {
            "xml": "openvino/segmenter.int8.xml",
            "bin": "openvino/segmenter.int8.bin",
            "source_sha256": record["sha256"]["segmenter.keras"],
        }
    }
    from pipeline.io_utils import sha256_of

    record["sha256"].update(
        {
            f"openvino/segmenter.int8.{e}": sha256_of(pair / "openvino" / f"segmenter.int8.{e}")
            for e in ("xml", "bin")
        }
    )
    write_pair_meta(pair, record)  # a consistent pair that ships INT8 files (SHA256SUMS lists them)
    assert "openvino/segmenter.int8.bin" in (pair / SUMS_FILE).read_text()
    (pair / "openvino" / "segmenter.int8.bin").write_bytes(b"a flipped byte")

    out = tmp_path / "out"
    assert (
        command.main(
            [
                str(tmp_path / "in"),
                "--models",
                str(pair),
                "--out",
                str(out),
                "--quiet",
                "--backend",
                "openvino",
            ]
        )
        == command.EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert (
        "INT8 segmenter files" in err and "do not match their sha256" in err and "segmenter.int8.bin" in err
    )
    assert not (out / "report.csv").exists()


# --------------------------------------------------------------------------- 6. caches by behaviour


needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")


def _map_model(seed: int):
    """A one-convolution sigmoid map model (exports in a fraction of a second)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(
        1,
        3,
        padding="same",
        activation="sigmoid",
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.05),
    )(inputs)
    return keras.Model(inputs, outputs)


def _agrees(runner, model) -> bool:
    from pipeline.models.agreement import agreement, model_probe

    x = model_probe(model)[:2]
    return agreement(np.asarray(model(x, training=False)), runner.predict_on_batch(x))["ok"]


@needs_openvino
def test_a_cached_ir_edited_with_its_manifest_is_caught_by_the_probe_and_exported_again(tmp_path, caplog):
    from pipeline.inference.backends import make_runner

    model, sha = _map_model(0), "e" * 64
    runner = make_runner(model, "openvino", sha256=sha, precision="f32", cache_dir=tmp_path)
    entry = runner.entry
    xml = entry.xml.read_text()
    assert 'type="Sigmoid"' in xml
    entry.xml.write_text(xml.replace('type="Sigmoid"', 'type="Relu"'))  # "probabilities" above 1
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    from pipeline.io_utils import sha256_of

    manifest["ir_sha256"]["model.xml"] = sha256_of(entry.xml)  # the manifest updated with it
    (entry.directory / "manifest.json").write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="pipeline.inference.backends.openvino_runner"):
        again = make_runner(model, "openvino", sha256=sha, precision="f32", cache_dir=tmp_path)
    assert "disagrees with the Keras model on the load probe" in caplog.text and "exporting" in caplog.text
    assert 'type="Sigmoid"' in again.entry.xml.read_text() and _agrees(again, model)


@needs_openvino
def test_a_compiled_blob_of_another_model_is_caught_by_its_sum(tmp_path, caplog):
    from pipeline.inference.backends import make_runner

    models = {"a": _map_model(1), "b": _map_model(2)}
    runners = {
        k: make_runner(m, "openvino", sha256=k * 64, precision="f32", cache_dir=tmp_path)
        for k, m in models.items()
    }
    blobs = {}
    for key, runner in runners.items():
        runner.predict_on_batch(np.zeros((2, 32, 32, 3), np.float32))  # compiles: a blob, its sum recorded
        manifest = json.loads((runner.entry.directory / "manifest.json").read_text())
        blobs[key] = sorted(manifest["compiled_sha256"])
        assert blobs[key] and all((runner.entry.compiled_dir / n).is_file() for n in blobs[key])
    target = runners["a"].entry.compiled_dir / blobs["a"][-1]
    shutil.copyfile(runners["b"].entry.compiled_dir / blobs["b"][-1], target)  # b's blob under a's name

    with caplog.at_level(logging.WARNING, logger="pipeline.inference.backends.ir_cache"):
        again = make_runner(models["a"], "openvino", sha256="a" * 64, precision="f32", cache_dir=tmp_path)
    assert "does not match the sum" in caplog.text and "exporting the model again" in caplog.text
    assert _agrees(again, models["a"])


# --------------------------------------------------------------------------- 8. write failures


def _failing_writes(monkeypatch, folder: str) -> None:
    """Every output written under OUT/`folder`/ fails as on a full disk."""
    from pipeline.inference import outputs

    real = outputs.atomic_write_bytes

    def write(path, data):
        if Path(path).parent.name == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(outputs, "atomic_write_bytes", write)


def test_outputs_that_cannot_be_written_keep_their_decision_and_are_retried(
    synthetic_root, tmp_path, stub_models, monkeypatch, capsys
):
    inputs = _slices(synthetic_root, tmp_path / "in", numbers=(1, 2, 4, 5))  # 1, 2 with tumour
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--out", str(out), *stub_models]
    (out / "overlays").mkdir(parents=True)
    leftovers = [
        out / "overlays" / f".{CASE}_1__x_overlay.png.k3j4.tmp",
        out / ".report.csv.abc.tmp",
        out / "volumes" / ".s_mask.tmp123.nii.gz",
    ]  # what kill -9 leaves behind
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    (out / "notes.tmp").write_text("mine")  # not a temporary file of ours: kept
    with monkeypatch.context() as patch:
        _failing_writes(patch, "overlays")
        assert command.main(args) == command.EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err and "Traceback" not in err
    assert not any(p.exists() for p in leftovers) and (out / "notes.tmp").is_file()
    report = _report(out).set_index(_report(out)["path"].map(lambda p: Path(p).name))
    for n in (1, 2):  # flagged: the decision kept, the failure said, the outputs not claimed
        row = report.loc[f"{CASE}_{n}.tif"]
        assert row["decision"] == "tumour" and "outputs not written" in row["error"]
        assert pd.isna(row["overlay_path"]) and pd.isna(row["mask_path"])
    for n in (4, 5):  # the other inputs of the batch: diagnosed as usual
        assert report.loc[f"{CASE}_{n}.tif", "decision"] == "no tumour" and pd.isna(
            report.loc[f"{CASE}_{n}.tif", "error"]
        )
    assert _journalled(out) == {str(inputs[2]), str(inputs[3])}  # failed writes are not journalled as done

    assert command.main(args) == 0  # the folder is fixed: the re-run retries only those
    assert "(2 from an earlier run)" in capsys.readouterr().out
    report = _report(out)
    assert report["error"].isna().all() and report["overlay_path"].notna().sum() == 2
    assert all((out / p).is_file() for p in report["overlay_path"].dropna())


def test_a_full_disk_under_the_journal_stops_cleanly_and_the_rerun_does_the_rest(
    synthetic_root, tmp_path, stub_models, monkeypatch, capsys
):
    inputs = _slices(synthetic_root, tmp_path / "in", numbers=(1, 2, 4, 5, 6, 7))
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--out", str(out), "--batch-size", "2", *stub_models]
    calls = []

    def fsync(fd):  # the journal's second append hits a full disk after its bytes went out
        calls.append(fd)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(
            journal_module, "os", type("os", (), {"SEEK_END": os.SEEK_END, "fsync": staticmethod(fsync)})
        )
        assert command.main(args) == command.EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert "the journal could not be written" in err and "No space left on device" in err
    assert len(_journalled(out)) == 2  # the first unit; no torn line left by the failed append
    report = _report(out)
    assert len(report) == len(inputs)  # every input has a row: done ones, the rest saying why not
    assert report["error"].isna().sum() >= 2
    assert report["error"].dropna().str.contains("the run stopped|outputs not written").all()

    assert command.main(args) == 0
    assert "(2 from an earlier run)" in capsys.readouterr().out
    assert _report(out)["error"].isna().all() and len(_journalled(out)) == len(inputs)


def test_reports_that_cannot_be_written_are_a_write_failure_not_a_traceback(
    synthetic_root, tmp_path, stub_models, monkeypatch, capsys
):
    inputs = _slices(synthetic_root, tmp_path / "in", numbers=(1, 4))
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--out", str(out), *stub_models]

    def full(path, table):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(reports, "write_csv", full)
        assert command.main(args) == command.EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert (
        "the reports (report.csv, report.json, patients.csv) were not written" in err
        and "Traceback" not in err
    )
    assert _journalled(out) == {str(p) for p in inputs}  # what is done stays done
    assert command.main(args) == 0
    assert f"({len(inputs)} from an earlier run)" in capsys.readouterr().out and len(_report(out)) == len(
        inputs
    )


# --------------------------------------------------------------------------- 9. spreadsheet formulas


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised_numbers_are_not(tmp_path):
    assert [csv_cell(v) for v in ("=1+1", "+A1", "-x", "@SUM(A1)", "\tcmd", "\rcmd", "TCGA_A", "", None)] == [
        "'=1+1",
        "'+A1",
        "'-x",
        "'@SUM(A1)",
        "'\tcmd",
        "'\rcmd",
        "TCGA_A",
        "",
        None,
    ]
    assert [csv_cell(v) for v in ("-0.5", "+3", "-1e-3", "-inf", -0.5, 3)] == [
        "-0.5",
        "+3",
        "-1e-3",
        "-inf",
        -0.5,
        3,
    ]
    table = pd.DataFrame(
        {
            "name": ['=HYPERLINK("http://x","y")', "ok"],
            "value": [-0.5, 2.0],
            "count": pd.array([-3, None], dtype="Int64"),
        }
    )
    write_csv(tmp_path / "t.csv", table)
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["name"].tolist() == ['\'=HYPERLINK("http://x","y")', "ok"]
    assert (
        back["value"].tolist() == [-0.5, 2.0] and back["count"].iloc[0] == -3
    )  # numeric columns stay numbers


def test_a_study_named_like_a_formula_is_inert_in_every_csv_and_raw_in_json(synthetic_root, tmp_path):
    from pipeline.inference.diagnosis import run_diagnosis
    from tests.test_volumes import model_affine, model_study, write_nifti

    name = '=HYPERLINK("evil.example","open me")'
    folder = tmp_path / "in"
    slices = _slices(synthetic_root, folder, numbers=(1, 4))
    data, _ = model_study(n_slices=4, size=32)
    write_nifti(folder / f"{name}.nii.gz", data, model_affine())
    out = tmp_path / "out"
    result = run_diagnosis([folder], out, pipeline=stub_pipeline(), progress=False, volumes=False)
    assert result.exit_code == 0 and len(result.studies) == 1
    patients = pd.read_csv(out / "patients.csv")
    assert "'" + name in patients["patient_id"].tolist() and name not in patients["patient_id"].tolist()
    assert not any(str(v).startswith(("=", "+", "@")) for v in _report(out).astype(str).to_numpy().ravel())
    assert (
        json.loads((out / "report.json").read_text())["studies"][0]["study_id"] == name
    )  # JSON keeps it raw
    assert _report(out)["error"].isna().all() and len(_report(out)) == len(slices) + 4  # the rest diagnosed


def test_every_csv_the_project_writes_goes_through_the_one_helper():
    """`io_utils.write_csv` / `csv_cell` are the only ways a CSV is written (the rule of issue 21)."""
    offenders = []
    for path in sorted((PROJECT_ROOT / "pipeline").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name == "io_utils.py":
            continue
        if ".to_csv(" in text or "csv.writer(" in text:
            offenders.append(path.name)
        if "csv.DictWriter(" in text and "csv_cell" not in text:
            offenders.append(path.name)
    assert offenders == []
