"""The ten hostile cases of issue 10 that used to crash `diagnose` or `evaluate`, one test each.

Each test asserts the exit code, the message and that the other inputs were still diagnosed
(or, for a refusal before any work, that nothing was written).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.commands import diagnose as command
from pipeline.errors import DataError
from pipeline.inference import diagnosis as diagnose
from pipeline.inference.diagnosis import JOURNAL, output_name, run_diagnosis
from pipeline.inference.image_loading import load_slice
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.models.pair_artifact import SUMS_FILE, read_sums, write_sums
from pipeline.paths import PROJECT_ROOT
from tests.inference_helpers import expected_mask, stub_pipeline

CASE = "TCGA_CC_0005_20010505"  # slices 1-3 with tumour, 4-8 without
TUMOUR_SLICES = (1, 2, 3)


def _slice(root: Path, n: int) -> Path:
    return root / CASE / f"{CASE}_{n}.tif"


def _copy_slices(root: Path, folder: Path, numbers=(1, 2, 4, 5)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(_slice(root, n), folder / _slice(root, n).name)) for n in numbers]


def _report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "report.csv")


def _diagnosed(report: pd.DataFrame) -> pd.DataFrame:
    return report[report["error"].isna() & report["decision"].isin(["tumour", "no tumour"])]


@pytest.fixture
def stub_models(tmp_path, monkeypatch) -> list[str]:
    """CLI arguments naming a stand-in pair whose pipeline is the stub models (no Keras files)."""
    pair = tmp_path / "stub_pair"
    pair.mkdir()
    (pair / "pipeline.json").write_text("{}")
    monkeypatch.setattr(TumorPipeline, "from_dir", classmethod(lambda cls, path, **kw: stub_pipeline()))
    return ["--models", str(pair), "--quiet"]


def _edited_pair(pair: Path, folder: Path, edit) -> Path:
    """A copy of `pair` whose pipeline.json went through `edit(meta)` (which changes it in place)."""
    copy = Path(shutil.copytree(pair, folder))
    meta = json.loads((copy / "pipeline.json").read_text())
    edit(meta)
    (copy / "pipeline.json").write_text(json.dumps(meta))
    # re-vouched in SHA256SUMS, so the check under test is the one that refuses it
    write_sums(copy, list(read_sums(copy / SUMS_FILE)))
    return copy


# --------------------------------------------------------------------------- 1. file names


def test_non_utf8_file_names_are_escaped_and_reported(synthetic_root, tmp_path, stub_models, capsys):
    folder = tmp_path / "in"
    good = _copy_slices(synthetic_root, folder)
    odd = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"scan_\xff\xfe.tif")))
    shutil.copy(_slice(synthetic_root, 3), odd)  # a tumour slice under a name that is not UTF-8
    out = tmp_path / "out"

    assert command.main([str(folder), "--out", str(out), *stub_models]) == 0
    printed = capsys.readouterr().out
    assert "5 slice(s): 3 with tumour, 0 flagged with nothing outlined, 2 without, 0 failed" in printed
    report = _report(out)
    assert len(_diagnosed(report)) == len(good) + 1
    row = report[report["path"].str.contains(r"scan_\xff\xfe", regex=False)].iloc[0]
    assert row["decision"] == "tumour" and (out / row["mask_path"]).is_file()
    assert json.loads((out / "report.json").read_text())["summary"]["inputs"] == 5
    assert command.main([str(folder), "--out", str(out), *stub_models]) == 0  # the re-run resumes
    assert "(5 from an earlier run)" in capsys.readouterr().out


# --------------------------------------------------------------------------- 2. symlink loops


def test_a_symlink_loop_in_an_input_folder_is_an_error_row(synthetic_root, tmp_path, stub_models, capsys):
    folder = tmp_path / "in"
    good = _copy_slices(synthetic_root, folder)
    (folder / "loop.tif").symlink_to("loop.tif")  # a file that points at itself
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")  # two that point at each other
    (folder / "again").symlink_to(".", target_is_directory=True)  # a folder that contains itself
    out = tmp_path / "out"

    assert command.main([str(folder), "--out", str(out), *stub_models]) == 1
    err = capsys.readouterr().err
    assert "loop.tif: cannot open image" in err and "Traceback" not in err
    report = _report(out).set_index(_report(out)["path"].map(lambda p: Path(p).name))
    for name in ("loop.tif", "a.png", "b.png"):
        assert "cannot open image" in report.loc[name, "error"]
    assert len(_diagnosed(report)) == len(good)


# --------------------------------------------------------------------------- 3. symlinks in OUT


def test_a_symlink_in_out_pointing_outside_fails_one_input(synthetic_root, tmp_path, stub_models, capsys):
    folder = tmp_path / "in"
    inputs = _copy_slices(synthetic_root, folder, numbers=(1, 2, 3, 4))
    victim = tmp_path / "elsewhere" / "keep.png"
    victim.parent.mkdir()
    victim.write_bytes(b"not yours")
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / f"{output_name(inputs[1])}_mask.png").symlink_to(victim)

    assert command.main([str(folder), "--out", str(out), *stub_models]) == 1
    err = capsys.readouterr().err
    assert f"{inputs[1]}: refusing to write masks/" in err and "Traceback" not in err
    assert victim.read_bytes() == b"not yours"
    report = _report(out)
    assert "outside the output folder" in report.loc[report["path"] == str(inputs[1]), "error"].iloc[0]
    diagnosed = _diagnosed(report)
    assert set(diagnosed["path"]) == {str(p) for p in inputs} - {str(inputs[1])}
    flagged = diagnosed[diagnosed["decision"] == "tumour"]
    assert len(flagged) == 2 and all((out / m).is_file() for m in flagged["mask_path"])


# --------------------------------------------------------------------------- 4. equal names, one OUT


def test_two_runs_into_one_out_keep_each_rows_own_mask(synthetic_root, tmp_path):
    a, b = tmp_path / "a" / "scan.tif", tmp_path / "b" / "scan.tif"  # equal names, different slices
    for target, n in ((a, 1), (b, 3)):
        target.parent.mkdir()
        shutil.copy(_slice(synthetic_root, n), target)
    out = tmp_path / "out"

    first = run_diagnosis([a.parent], out, pipeline=stub_pipeline(), progress=False)
    second = run_diagnosis([b.parent], out, pipeline=stub_pipeline(), progress=False)
    both = run_diagnosis([a.parent, b.parent], out, pipeline=stub_pipeline(), progress=False)
    assert (first.exit_code, second.exit_code, both.exit_code) == (0, 0, 0)
    assert both.resumed == 2  # both rows come from the journal of the earlier runs
    masks = {row["path"]: row["mask_path"] for row in both.rows}
    assert len(set(masks.values())) == 2
    for path, mask_path in masks.items():
        written = np.asarray(Image.open(out / mask_path)) > 0
        np.testing.assert_array_equal(written, expected_mask(load_slice(path)).astype(bool))
    assert not np.array_equal(*(np.asarray(Image.open(out / m)) for m in masks.values()))


# --------------------------------------------------------------------------- 5. damaged journal


def _random_bytes(journal: Path) -> None:
    journal.write_bytes(np.random.default_rng(0).bytes(512))


def _a_json_list(journal: Path) -> None:
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], "[1, 2, 3]", *lines[2:]]) + "\n")


def _rows_without_keys(journal: Path) -> None:
    lines = journal.read_text().splitlines()
    key = json.loads(lines[2])["key"]
    bad = [json.dumps({"type": "row"}), json.dumps({"type": "row", "key": key, "row": {"path": key}})]
    journal.write_text("\n".join([lines[0], lines[1], *bad, *lines[3:]]) + "\n")


@pytest.mark.parametrize(
    ("damage", "redone", "warning"),
    [(_random_bytes, 4, "damaged journal header"), (_a_json_list, 1, "ignoring damaged line 2"),
     (_rows_without_keys, 1, "ignoring damaged line 3")],
    ids=["random-bytes", "json-list", "row-without-keys"],
)  # fmt: skip
def test_a_damaged_journal_is_read_tolerantly(damage, redone, warning, synthetic_root, tmp_path, caplog):
    folder = tmp_path / "in"
    inputs = _copy_slices(synthetic_root, folder)
    out = tmp_path / "out"
    assert run_diagnosis([folder], out, pipeline=stub_pipeline(), progress=False).exit_code == 0
    damage(out / JOURNAL)

    with caplog.at_level(logging.WARNING, logger="pipeline.inference.diagnosis"):
        again = run_diagnosis([folder], out, pipeline=stub_pipeline(), progress=False)
    assert again.exit_code == 0 and warning in caplog.text
    assert again.resumed == len(inputs) - redone  # the damaged entries are diagnosed again
    assert len(_diagnosed(_report(out))) == len(inputs)
    assert run_diagnosis([folder], out, pipeline=stub_pipeline(), progress=False).resumed == len(inputs)


# --------------------------------------------------------------------------- 6. unusable OUT, bad values


def _not_writable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere a mode allows; /sys refuses new folders even to root
        return Path("/sys/lgg-diagnosis-test")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "out"


@pytest.mark.parametrize("case", ["out-under-a-file", "out-not-writable", "threshold-2.0", "threshold-nan"])
def test_unusable_out_or_pair_values_are_exit_2(case, tiny_pair, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    _copy_slices(synthetic_root, folder)
    out, pair, words = tmp_path / "out", tiny_pair, []
    if case == "out-under-a-file":
        (tmp_path / "a_file").write_text("x")
        out, words = tmp_path / "a_file" / "out", ["cannot create or write to the output folder", "is a file"]
    elif case == "out-not-writable":
        out, words = _not_writable(tmp_path), ["cannot create or write to the output folder"]
    else:
        value = 2.0 if case == "threshold-2.0" else math.nan
        pair = _edited_pair(tiny_pair, tmp_path / "pair", lambda meta: meta.update(threshold=value))
        words = ["'threshold' must be", str(pair / "pipeline.json")]

    assert command.main([str(folder), "--out", str(out), "--models", str(pair), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert "Traceback" not in err
    assert not (out / "report.csv").exists()  # refused before any input was diagnosed


# --------------------------------------------------------------------------- 7. model sums


def test_a_pair_without_sha256_is_refused_unless_allowed(tiny_pair, synthetic_root, tmp_path, capsys, caplog):
    folder = tmp_path / "in"
    inputs = _copy_slices(synthetic_root, folder)
    pair = _edited_pair(tiny_pair, tmp_path / "pair", lambda meta: meta.pop("sha256"))
    args = [str(folder), "--models", str(pair), "--quiet"]

    assert command.main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "records no sha256" in err and "--allow-unverified" in err and "Traceback" not in err
    with pytest.raises(DataError, match="sha256"):
        TumorPipeline.from_dir(pair)

    with caplog.at_level(logging.WARNING, logger="pipeline.models.model_io"):
        assert command.main([*args, "--out", str(tmp_path / "allowed"), "--allow-unverified"]) == 0
    assert "UNVERIFIED MODEL" in caplog.text
    assert len(_diagnosed(_report(tmp_path / "allowed"))) == len(inputs)

    segmenter = pair / "segmenter.keras"
    segmenter.write_bytes(segmenter.read_bytes()[:1000])  # a corrupt zip
    assert command.main([*args, "--out", str(tmp_path / "corrupt"), "--allow-unverified"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the Keras model" in err and str(segmenter) in err and "Traceback" not in err
    verified = Path(shutil.copytree(tiny_pair, tmp_path / "verified"))
    (verified / "segmenter.keras").write_bytes(segmenter.read_bytes())
    assert command.main([*args[:1], "--models", str(verified), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


# --------------------------------------------------------------------------- 8. missing operating point


@pytest.mark.parametrize("key", ["threshold", "min_component_px"])
def test_a_pair_json_without_its_operating_point_names_it(key, tiny_pair, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    _copy_slices(synthetic_root, folder)
    pair = _edited_pair(tiny_pair, tmp_path / "pair", lambda meta: meta.pop(key))

    out = tmp_path / "out"
    assert command.main([str(folder), "--out", str(out), "--models", str(pair), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"required key(s) '{key}' missing" in err and str(pair / "pipeline.json") in err
    assert "Traceback" not in err and not (out / "report.csv").exists()
    with pytest.raises(DataError, match=key):  # no silent 0.5 / 0 from the Python API either
        TumorPipeline.from_dir(pair)


# --------------------------------------------------------------------------- 9. evaluate --skip-bad


@pytest.mark.slow
def test_evaluate_accepts_the_skip_bad_it_advises(tiny_pair, writable_synthetic_root, tmp_path, capsys):
    from pipeline.cli import main

    missing = writable_synthetic_root / CASE / f"{CASE}_2_mask.tif"
    missing.unlink()
    root = writable_synthetic_root
    argv = ["evaluate", "--models", str(tiny_pair), "--split", "all", "--data-dir", str(root),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval"), "--n-boot", "10",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "image without mask" in err and "--skip-bad" in err and "Traceback" not in err

    with pytest.warns(UserWarning, match="skipping 1 bad file"):
        assert main([*argv, "--skip-bad"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["provenance"]["n_slices"] == 49 and report["provenance"]["n_patients"] == 6  # all but one


# --------------------------------------------------------------------------- 10. the minor ones


class _FailsOneSlice:
    """The stub pipeline, except that slices 72 pixels wide fail with a coloured (ANSI) error."""

    def __init__(self):
        self.pipe = stub_pipeline()
        self.point, self.tile_size, self.backend_name = self.pipe.point, self.pipe.tile_size, "keras"

    def predict(self, images):
        if any(image.shape[1] == 72 for image in images):
            raise ValueError("batch failed")
        return self.pipe.predict(images)

    def predict_one(self, image):
        if image.shape[1] == 72:
            raise ValueError("\x1b[1m\x1b[31mtiling failed\x1b[0m on tile 3\x1b]8;;x\x07")
        return self.pipe.predict_one(image)


def test_minor_zero_page_tiff_make_quoting_and_terminal_escapes(synthetic_root, tmp_path):
    folder = tmp_path / "in"
    good = _copy_slices(synthetic_root, folder)
    (folder / "empty_pages.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header, no page
    wide = np.zeros((64, 72, 3), np.uint8)
    Image.fromarray(wide).save(folder / "wide.png")
    out = tmp_path / "out"

    result = run_diagnosis([folder], out, pipeline=_FailsOneSlice(), progress=False, volumes=False)
    assert result.exit_code == 1 and result.n_failed == 2
    text = (out / "report.csv").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\x07" not in text
    report = _report(out).set_index(_report(out)["path"].map(lambda p: Path(p).name))
    assert "0 pages" in report.loc["empty_pages.tif", "error"]
    assert "multi-page" not in report.loc["empty_pages.tif", "error"]
    assert report.loc["wide.png", "error"] == "ValueError: tiling failed on tile 3"
    assert len(_diagnosed(report)) == len(good)
    with pytest.raises(DataError, match=r"no image \(0 pages\)"):
        load_slice(folder / "empty_pages.tif")

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "-C", str(PROJECT_ROOT), "diagnose", "INPUT=scans/ x.png", "OUT=a b"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    line = next(ln for ln in dry.stdout.splitlines() if "pipeline diagnose" in ln)
    assert line.rstrip().endswith('diagnose scans/ x.png --out "a b"')
    assert diagnose.text("a\x1b[0m\nb") == "a b"


def test_an_edited_release_pipeline_json_is_refused(tmp_path):
    """A release lists pipeline.json in SHA256SUMS: editing its operating point is caught at load."""
    from pipeline.models.pair_artifact import read_pair_meta

    release = tmp_path / "release"
    release.mkdir()
    for name in ("pipeline.json", "SHA256SUMS"):
        shutil.copy(PROJECT_ROOT / "models" / name, release / name)
    record = json.loads((release / "pipeline.json").read_text())
    assert read_pair_meta(release).point.threshold == record["threshold"]
    record["threshold"] = 0.05
    (release / "pipeline.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="pipeline.json has .* SHA256SUMS records"):
        read_pair_meta(release)
    assert read_pair_meta(release, allow_unverified=True).point.threshold == 0.05
