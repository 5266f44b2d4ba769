"""Hostile and careless inputs to `diagnose` (issue 21, the input side): no silent wrong answers.

Each test diagnoses one batch in-process with the stub pipeline (`tests.inference_helpers`:
FLAIR > 150 is tumour), so a study whose intensities are mapped wrongly loses or gains tumour
voxels; every bad input must be its own error row naming the file and the problem, or a
diagnosed row with a warning, and the other inputs of the batch must still be diagnosed.
"""

from __future__ import annotations

import html
import os
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.inference.diagnosis import run_diagnosis
from pipeline.volumes.domain import model_volume
from pipeline.volumes.readers import read_volume
from pipeline.volumes.volume import Volume
from tests.inference_helpers import stub_pipeline
from tests.test_volumes import model_affine, model_study, write_dicom_study, write_nifti


def _int16(data: np.ndarray) -> np.ndarray:
    return data.astype(np.int16) * 7 + 13  # a scanner's range, mapped back to the stored uint8 exactly


def _diagnose(inputs, out: Path):
    result = run_diagnosis(inputs, out, pipeline=stub_pipeline(), progress=False)
    studies = {Path(st["source"]).name: st for st in result.studies}
    return result, studies


def _rows(result, name: str) -> list[dict]:
    return [r for r in result.rows if Path(r["path"]).name == name]


def _failed(studies: dict, name: str, *words: str) -> str:
    error = studies[name]["error"]
    assert error and all(w in error for w in words), (name, error)
    return error


def _diagnosed(studies: dict, *names: str) -> None:
    for name in names:
        assert studies[name]["error"] is None and studies[name]["tumour_voxels"] > 0, studies[name]


# --------------------------------------------------------------------------- intensities


def test_outliers_cannot_decide_the_intensity_scale(tmp_path):
    data, _ = model_study(n_slices=6, size=32, tumour=(2, 3))
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "clean.nii.gz", _int16(data), model_affine())
    hot = _int16(data)
    hot[5, 5, 1, 1] = 32767  # one FLAIR spike: the old min..max map emptied the mask
    write_nifti(scans / "hot.nii.gz", hot, model_affine())
    cold = _int16(data)
    cold[4, 4, 3, 0] = -32768  # one pre-contrast voxel at the bottom of int16
    write_nifti(scans / "cold.nii.gz", cold, model_affine())
    write_nifti(scans / "huge.nii.gz", data.astype(np.float64) * 1e300, model_affine())  # float32 overflowed
    noise = write_dicom_study(scans / "noise", data)
    damaged = noise / "flair" / "IM0004.dcm"  # stored slice 2 (files are named in reverse order)
    pixels = 32 * 32 * 2
    raw = damaged.read_bytes()
    damaged.write_bytes(raw[:-pixels] + np.random.default_rng(1).bytes(pixels))

    result, studies = _diagnose([scans], tmp_path / "out")

    assert result.exit_code == 1  # the corrupt DICOM file; everything else is diagnosed
    _diagnosed(studies, "clean.nii.gz", "hot.nii.gz", "cold.nii.gz", "huge.nii.gz")
    clean = studies["clean.nii.gz"]["tumour_voxels"]
    for name in ("hot.nii.gz", "cold.nii.gz", "huge.nii.gz"):
        assert abs(studies[name]["tumour_voxels"] - clean) <= 0.05 * clean, (name, studies[name])
    assert studies["clean.nii.gz"]["warning"] is None and studies["huge.nii.gz"]["warning"] is None
    assert "FLAIR: 1 voxel(s) far above the rest (up to 32767)" in studies["hot.nii.gz"]["warning"]
    assert "left out of the 8-bit scale" in studies["hot.nii.gz"]["warning"]
    assert "pre-contrast: 1 voxel(s) far below the rest (down to -32768)" in studies["cold.nii.gz"]["warning"]
    assert all(r["warning"] == studies["hot.nii.gz"]["warning"] for r in _rows(result, "hot.nii.gz"))
    _failed(studies, "noise", "FLAIR", "stored slice 2 (IM0004.dcm)", "corrupt pixel data")
    # the review page shows it: on the study's card and on each of its rows, and no clean study has one
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    shown = f"warning: {html.escape(studies['hot.nii.gz']['warning'])}"
    assert page.count(f'<p class="warning">{shown}</p>') == 1
    assert page.count(f'<td class="warning">{shown}</td>') == len(_rows(result, "hot.nii.gz"))
    assert page.count('<p class="warning">') == 2  # hot and cold


# --------------------------------------------------------------------------- geometry


def _patched_srow(path: Path, value: float) -> Path:
    """An uncompressed NIfTI whose sform's first element is `value` (nibabel refuses to write NaN)."""
    raw = bytearray(path.read_bytes())
    raw[280:284] = np.float32(value).tobytes()  # srow_x[0]
    path.write_bytes(bytes(raw))
    return path


def _rotated(angle_deg: float) -> np.ndarray:
    """`model_affine()` turned by `angle_deg` about the right-left axis."""
    t = np.radians(angle_deg)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation @ model_affine()


def test_uneven_slices_and_bad_affines_are_error_rows_and_obliquity_a_warning(tmp_path):
    import SimpleITK as sitk

    data, _ = model_study(n_slices=6, size=16, tumour=(2, 3))
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "ok.nii.gz", data, model_affine())
    write_nifti(scans / "tilted.nii.gz", data, _rotated(12.0))
    write_nifti(scans / "steep.nii.gz", data, _rotated(50.0))
    _patched_srow(write_nifti(scans / "nan_affine.nii", data, model_affine()), np.nan)
    singular = model_affine()
    singular[:3, 1] = singular[:3, 0]  # two voxel axes along one world direction
    write_nifti(scans / "singular.nii.gz", data, singular)
    gap = write_dicom_study(scans / "gap", data)
    for channel in ("pre", "flair", "post"):  # the same slice missing in all three channels
        (gap / channel / "IM0003.dcm").unlink()
    dup = write_dicom_study(scans / "dup", data)
    shutil.copy(dup / "flair" / "IM0003.dcm", dup / "flair" / "IM0003b.dcm")
    turned = write_dicom_study(scans / "turned", data)
    image = sitk.ReadImage(str(turned / "flair" / "IM0003.dcm"))
    image.SetMetaData("0020|0037", "-1\\0\\0\\0\\1\\0")  # one slice's rows run the other way
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(turned / "flair" / "IM0003.dcm"))
    writer.Execute(image)

    result, studies = _diagnose([scans], tmp_path / "out")

    assert result.exit_code == 1
    _diagnosed(studies, "ok.nii.gz", "tilted.nii.gz", "steep.nii.gz")
    assert studies["ok.nii.gz"]["warning"] is None
    assert "oblique acquisition: voxel axes up to 12.0 degrees" in studies["tilted.nii.gz"]["warning"]
    steep = studies["steep.nii.gz"]["warning"]  # 50 degrees of tilt: another axis is sliced, and said so
    assert "up to 40.0 degrees" in steep
    assert "along voxel axis 0 (the file stacks its slices along axis 2)" in steep
    _failed(studies, "nan_affine.nii", "affine holds NaN or infinite values")
    _failed(studies, "singular.nii.gz", "affine is singular")
    _failed(studies, "gap", "not evenly spaced", "-34 -> -28 mm (IM0004.dcm, IM0002.dcm)", "missing")
    _failed(studies, "dup", "two slices at one position", "IM0003.dcm, IM0003b.dcm")
    _failed(studies, "turned", "another orientation", "IM0003.dcm", "turned round")


# --------------------------------------------------------------------------- every input gets a row


def test_every_input_gets_a_row(tmp_path):
    data, _ = model_study(n_slices=4, size=16, tumour=(1, 2))
    scans = tmp_path / "scans"
    mixed = scans / "mixed"  # two 4D studies and a channel file without partners
    mixed.mkdir(parents=True)
    write_nifti(mixed / "a.nii.gz", data, model_affine())
    write_nifti(mixed / "b.nii.gz", data, model_affine())
    write_nifti(mixed / "extra_flair.nii.gz", data[..., 1], model_affine())
    fifo = write_dicom_study(scans / "with_fifo", data)
    os.mkfifo(fifo / "flair" / "IM0000.dcm")  # would block a reader, or make GDCM drop files
    cut = write_dicom_study(scans / "cut", data)
    truncated = cut / "flair" / "IM0002.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (scans / "zero.nii.gz").symlink_to("/dev/zero")

    result, studies = _diagnose([scans], tmp_path / "out")

    assert result.exit_code == 1
    _diagnosed(studies, "a.nii.gz", "b.nii.gz", "with_fifo")
    assert len(_rows(result, "a.nii.gz")) == 4 and len(_rows(result, "b.nii.gz")) == 4
    _failed(studies, "extra_flair.nii.gz", "a FLAIR channel file without its partners")
    assert studies["with_fifo"]["slices"] == 4
    (fifo_row,) = _rows(result, "IM0000.dcm")
    assert "not a regular file (a FIFO)" in fifo_row["error"] and fifo_row["decision"] is None
    _failed(studies, "cut", "IM0002.dcm")
    _failed(studies, "zero.nii.gz", "not a regular file (a character device)")
    assert "Empty file" not in studies["zero.nii.gz"]["error"]


# --------------------------------------------------------------------------- memory


def test_a_float64_volume_is_read_one_channel_at_a_time_under_a_byte_cap(tmp_path):
    data, _ = model_study(n_slices=32, size=64)
    path = write_nifti(tmp_path / "f64.nii.gz", data.astype(np.float64) * 3.5, model_affine())
    channel_bytes = 64 * 64 * 32 * 8
    tracemalloc.start()
    try:
        volume = read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert volume.data.dtype == np.uint8  # the same as converting the whole float64 volume at once
    whole = model_volume(Volume(data=data.astype(np.float64) * 3.5, affine=model_affine(), study_id="w"))
    np.testing.assert_array_equal(volume.data, whole.data)
    # the whole float64 volume would be 3 channels; one channel, its sample and the uint8 study fit in 2
    assert peak < 2 * channel_bytes, peak

    header = nib.Nifti1Header()  # within the voxel caps, but 2 GiB a channel once decompressed
    header.set_data_shape((512, 512, 512, 3))
    header.set_data_dtype(np.complex128)
    huge = tmp_path / "complex.nii"
    huge.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
    with pytest.raises(DataError, match=r"too large \(2.00 GiB per channel decompressed"):
        read_volume(huge)
