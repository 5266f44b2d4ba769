"""Diagnosing volume studies end to end: NIfTI and DICOM in, mask NIfTI on the input grid out.

The stub pipeline (`tests.inference_helpers`) segments FLAIR > 150, so on the synthetic studies
its mask is the ground truth up to the resampling to the models' 256x256 grid and back. The
round trip at the end uses the committed release on a real patient of the shared development copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.commands import diagnose as command
from pipeline.inference.diagnosis import PATIENT_COLUMNS, STUDY_KEYS, run_diagnosis
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.volumes.readers import read_volume
from tests.inference_helpers import stub_pipeline
from tests.test_volumes import (
    SERIES_UID,
    SPACING,
    dice,
    model_affine,
    model_study,
    write_dicom_series,
    write_dicom_study,
    write_nifti,
)

ROOT = Path(__file__).resolve().parents[1]


def _ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`array` in model orientation stored as the RAS copy `write_nifti(canonical=True)` makes."""
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def _bbox(mask: np.ndarray) -> list[int]:
    index = np.argwhere(mask)
    return [*index.min(axis=0).tolist(), *(index.max(axis=0) + 1).tolist()]


def _batch(tmp_path: Path):
    """A folder of studies: a 4D int16 NIfTI stored RAS, a DICOM study, and three bad studies."""
    data, truth = model_study(n_slices=8, size=64)
    scans = tmp_path / "scans"
    scans.mkdir()
    int16 = data.astype(np.int16) * 7 + 13
    nii = write_nifti(scans / "TCGA_VV_0001.nii.gz", int16, model_affine(), canonical=True)
    dcm = write_dicom_study(scans / "TCGA_VV_0002_19990101", data)
    missing = scans / "no_post"
    missing.mkdir()
    for c, name in enumerate(("pre", "flair")):
        write_nifti(missing / f"no_post_{name}.nii.gz", data[..., c], model_affine())
    write_nifti(scans / "flat.nii.gz", data[:, :, 0, 1], np.eye(4))
    nan = data.astype(np.float32)
    nan[3, 3, 3, 0] = np.inf
    write_nifti(scans / "nan.nii.gz", nan, model_affine())
    return scans, data, truth, nii, dcm


def test_nifti_and_dicom_studies_are_diagnosed_next_to_slices_and_bad_studies_get_their_row(
    synthetic_root, tmp_path
):
    scans, data, truth, nii, dcm = _batch(tmp_path)
    case = synthetic_root / "TCGA_CC_0005_20010505"  # Kaggle slices: today's slice route
    pipe = stub_pipeline()
    out = tmp_path / "out"
    result = run_diagnosis([scans, case], out, pipeline=pipe, progress=False)

    assert result.exit_code == 1
    studies = {Path(st["source"]).name: st for st in result.studies}
    assert set(studies) == {nii.name, dcm.name, "no_post", "flat.nii.gz", "nan.nii.gz"}
    assert all(set(st) == set(STUDY_KEYS) for st in result.studies)
    for name, words in {"no_post": "missing channel post-contrast", "flat.nii.gz": "2D",
                        "nan.nii.gz": "NaN or infinite"}.items():
        assert words in studies[name]["error"], studies[name]
        rows = [r for r in result.rows if Path(r["path"]).name == name]
        assert len(rows) == 1 and words in rows[0]["error"] and rows[0]["decision"] is None

    # the slice files went the way they always did
    alone = run_diagnosis([case], tmp_path / "alone", pipeline=stub_pipeline(), progress=False)
    slice_rows = [r for r in result.rows if r["slice"] is None and Path(r["path"]).parent == case]
    assert [(r["path"], r["probability"], r["area_px"]) for r in slice_rows] == [
        (r["path"], r["probability"], r["area_px"]) for r in alone.rows
    ]

    # the NIfTI study: mask on the input's grid with the input's affine, measured there
    record = studies[nii.name]
    assert record["error"] is None and record["study_id"] == "TCGA_VV_0001" and record["format"] == "NIfTI"
    mask_image = nib.load(str(out / record["mask_nifti"]))
    source = nib.load(str(nii))
    np.testing.assert_array_equal(mask_image.affine, source.affine)
    assert mask_image.shape == source.shape[:3] and mask_image.get_data_dtype() == np.uint8
    mask = np.asarray(mask_image.dataobj)
    expected = _ras(truth, model_affine())
    assert dice(mask, expected) > 0.9 and set(np.unique(mask)) == {0, 1}
    assert record["tumour_voxels"] == int(mask.sum())
    assert record["tumour_volume_ml"] == pytest.approx(mask.sum() * np.prod(SPACING) / 1000, rel=1e-3)
    assert record["slice_axis"] == 2 and record["slice_range"] == [2, 6] and record["slices"] == 8
    assert record["bbox_3d"] == _bbox(mask) and record["spacing_mm"] == pytest.approx([0.9, 0.8, 3.0])
    rows = [r for r in result.rows if r["path"] == str(nii)]
    assert [r["slice"] for r in rows] == list(range(8))
    assert {r["patient_id"] for r in rows} == {"TCGA_VV_0001"}
    assert [r["decision"] == "tumour" for r in rows] == [2 <= k <= 5 for k in range(8)]
    for row in rows:
        assert row["error"] is None and (row["height"], row["width"]) == (256, 256)
        if row["decision"] == "tumour":  # slices and PNG overlays stay available
            assert np.asarray(Image.open(out / row["overlay_path"])).shape == (256, 256, 3)
            assert (out / row["mask_path"]).is_file()

    # the DICOM study: its affine is the one derived from the series' geometry
    record = studies[dcm.name]
    assert record["error"] is None and record["study_id"] == "TCGA_VV_0002"
    assert record["format"] == "channel folder"
    mask_image = nib.load(str(out / record["mask_nifti"]))
    np.testing.assert_allclose(mask_image.affine, read_volume(dcm).affine, atol=1e-5)
    mask = np.asarray(mask_image.dataobj)
    assert mask.shape == (64, 64, 8) and dice(mask, truth.transpose(1, 0, 2)) > 0.9
    assert record["slice_range"] == [2, 6] and record["spacing_mm"] == pytest.approx([0.9, 0.8, 3.0])

    # patients.csv and report.json
    patients = pd.read_csv(out / "patients.csv")
    assert list(patients.columns) == list(PATIENT_COLUMNS)
    by_id = patients.set_index("patient_id")
    assert by_id.loc["TCGA_CC_0005", "slices"] == 8 and pd.isna(by_id.loc["TCGA_CC_0005", "mask_nifti"])
    assert by_id.loc["TCGA_VV_0001", "tumour_volume_ml"] == pytest.approx(
        studies[nii.name]["tumour_volume_ml"]
    )
    assert json.loads(by_id.loc["TCGA_VV_0001", "bbox_3d"]) == studies[nii.name]["bbox_3d"]
    assert "missing channel" in by_id.loc["no_post", "error"]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["studies"] == 5 and report["summary"]["studies_failed"] == 3
    assert len(report["rows"]) == 8 + 8 + 8 + 3 and len(report["studies"]) == 5
    assert len(pd.read_csv(out / "report.csv")) == len(report["rows"])

    # a re-run resumes every study and slice from the journal, predicting nothing
    seen = pipe.classifier.n_seen
    again = run_diagnosis([scans, case], out, pipeline=pipe, progress=False)
    assert again.resumed == 8 + 5 and pipe.classifier.n_seen == seen
    assert again.studies == result.studies
    # a changed study is diagnosed again
    write_nifti(nii, (data.astype(np.int16) * 7 + 13)[:, :, :6], model_affine(), canonical=True)
    third = run_diagnosis([scans, case], out, pipeline=pipe, progress=False)
    assert third.resumed == 8 + 4
    assert next(st for st in third.studies if st["source"] == str(nii))["slices"] == 6


def test_the_command_takes_a_study_channel_by_channel(tmp_path, monkeypatch, capsys):
    data, truth = model_study(n_slices=6, size=48, tumour=(1, 3))
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "pipeline.json").write_text("{}")
    monkeypatch.setattr(TumorPipeline, "from_dir", classmethod(lambda cls, path, **kw: stub_pipeline()))
    args = ["--models", str(pair), "--quiet"]
    pre = write_nifti(tmp_path / "pre.nii.gz", data[..., 0], model_affine())
    flair = write_nifti(tmp_path / "flair.nii", data[..., 1].astype(np.float32), model_affine())
    series = tmp_path / "series"  # post-contrast as one of two DICOM series in one folder
    write_dicom_series(series, data[..., 2], uid=SERIES_UID.format(5))
    for k in range(6):
        (series / f"IM{6 - k:04d}.dcm").rename(series / f"B{k}.dcm")
    write_dicom_series(series, data[..., 0], uid=SERIES_UID.format(6))
    dicom_affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS identity direction, voxel (col, row, slice)
    dicom_affine[:3, :3] = dicom_affine[:3, :3] @ np.diag([SPACING[1], SPACING[0], SPACING[2]])

    out = tmp_path / "out"
    code = command.main([
        "--pre", str(pre), "--flair", str(flair), "--post", f"{series}@{SERIES_UID.format(5)}",
        "--study-id", "TCGA_WW_0003", "--out", str(out), *args,
    ])
    err = capsys.readouterr()
    assert code == 1 and "not co-registered" in err.err  # the DICOM voxel order differs from the NIfTIs'
    assert "1 volume study: 0 diagnosed, 1 failed" in err.out

    # co-registered channels: all three as NIfTI on the DICOM's grid
    post = write_nifti(tmp_path / "post.nii.gz", data[..., 2].transpose(1, 0, 2), dicom_affine)
    pre = write_nifti(tmp_path / "pre.nii.gz", data[..., 0].transpose(1, 0, 2), dicom_affine)
    flair = write_nifti(tmp_path / "flair.nii", data[..., 1].transpose(1, 0, 2), dicom_affine)
    code = command.main(["--pre", str(pre), "--flair", str(flair), "--post", str(post), "--study-id",
                         "TCGA_WW_0003", "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "1 volume study: 1 diagnosed, 0 failed" in printed and "TCGA_WW_0003: tumour" in printed
    record = json.loads((out / "report.json").read_text())["studies"][0]
    assert record["format"] == "trio" and record["slice_range"] == [1, 4]
    mask = nib.load(str(out / record["mask_nifti"]))
    np.testing.assert_allclose(mask.affine, dicom_affine, atol=1e-6)
    assert dice(np.asarray(mask.dataobj), truth.transpose(1, 0, 2)) > 0.9

    # a missing channel is the study's error row; nothing at all is a usage error
    code = command.main(["--flair", str(flair), "--out", str(tmp_path / "two"), *args])
    assert code == 1 and "missing channel pre-contrast, post-contrast" in capsys.readouterr().err
    assert command.main(["--out", str(tmp_path / "none"), *args]) == 2
    assert "--pre/--flair/--post" in capsys.readouterr().err
    # the several series of a folder are named when none is picked
    code = command.main(["--pre", str(pre), "--flair", str(flair), "--post", str(series),
                         "--out", str(tmp_path / "several"), *args])
    err = capsys.readouterr().err
    assert code == 1 and "2 DICOM series" in err and SERIES_UID.format(6) in err


def test_volumes_off_still_writes_the_mask_nifti(tmp_path):
    data, truth = model_study(n_slices=4, size=32, tumour=(1, 2))
    nii = write_nifti(tmp_path / "s.nii.gz", data, model_affine())
    pipe = stub_pipeline(min_volume_px=10**6)  # a 3D filter larger than any tumour: the 2D route keeps it
    flat = run_diagnosis([nii], tmp_path / "2d", pipeline=pipe, progress=False, volumes=False)
    whole = run_diagnosis([nii], tmp_path / "3d", pipeline=pipe, progress=False)
    assert flat.studies[0]["tumour_voxels"] > 0 and whole.studies[0]["tumour_voxels"] == 0
    assert (tmp_path / "3d" / whole.studies[0]["mask_nifti"]).is_file()


# --------------------------------------------------------------------------- the real round trip


@pytest.mark.slow
def test_a_kaggle_patient_stacked_into_a_nifti_gets_the_same_masks_as_its_slices(shared_root, tmp_path):
    """The release on TCGA_CS_4941 (23 slices): slices, the same slices as a uint8 NIfTI, and as an
    int16 NIfTI (x * 7 + 13, stored RAS) must give identical masks and probabilities."""
    from pipeline.data.readers import read_array

    case = shared_root / "TCGA_CS_4941_19960909"
    volume = read_volume(case)  # the Kaggle folder reader
    assert volume.shape[2] == 23 and volume.data.min() == 0 and (volume.data.max(axis=(0, 1, 2)) == 255).all()
    slices = tmp_path / "slices" / case.name
    slices.mkdir(parents=True)
    for path in volume.files:
        shutil.copy(path, slices / path.name)
    affine = model_affine(spacing=(0.94, 0.94, 5.0))  # square pixels: the slices are the model grid
    as_uint8 = write_nifti(tmp_path / "TCGA_CS_4941_u8.nii.gz", volume.data, affine)
    as_int16 = write_nifti(tmp_path / "TCGA_CS_4941_i16.nii.gz", volume.data.astype(np.int16) * 7 + 13,
                           affine, canonical=True)

    pipe = TumorPipeline.from_dir(ROOT / "models", backend="keras")
    by_slices = run_diagnosis([slices], tmp_path / "a", pipeline=pipe, progress=False)
    by_nifti = run_diagnosis([as_uint8, as_int16], tmp_path / "b", pipeline=pipe, progress=False)
    assert by_slices.exit_code == 0 and by_nifti.exit_code == 0

    def slice_number(row):
        return int(Path(row["path"]).stem.rsplit("_", 1)[1])

    truth_masks = np.zeros(volume.shape, np.uint8)  # the slice route's PNG masks, stacked
    for row in by_slices.rows:
        if row["mask_path"]:
            png = np.asarray(Image.open(tmp_path / "a" / row["mask_path"]))
            truth_masks[:, :, slice_number(row) - 1] = png > 0
    probabilities = {slice_number(r) - 1: r["probability"] for r in by_slices.rows}
    assert truth_masks.sum() > 0  # the release finds this patient's tumour
    for record, stored in zip(by_nifti.studies, (as_uint8, as_int16), strict=True):
        mask = nib.load(str(tmp_path / "b" / record["mask_nifti"]))
        np.testing.assert_array_equal(mask.affine, nib.load(str(stored)).affine)
        expected = truth_masks if stored == as_uint8 else _ras(truth_masks, affine)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
        rows = [r for r in by_nifti.rows if r["path"] == str(stored)]
        assert {r["slice"]: r["probability"] for r in rows} == pytest.approx(probabilities, abs=1e-6)
    assert read_array(volume.files[0]).shape == (256, 256, 3)
