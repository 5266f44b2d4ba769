"""Volumes: readers (NIfTI, DICOM series, channel folders, Kaggle slices), the models' domain, bad studies.

Also the builders of small synthetic studies the volume diagnosis tests use
(`tests/test_diagnose_volumes.py`): a study is made in the models' orientation (rows anterior ->
posterior, columns right -> left, slices inferior -> superior) from `tests.synthetic.make_slice`,
then written as a NIfTI or as DICOM series in any orientation.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.data.readers import read_array
from pipeline.errors import DataError
from pipeline.volumes import readers
from pipeline.volumes.domain import MODEL_SIZE, model_grid, to_8bit, to_model_slices
from pipeline.volumes.nifti_out import measure_study, write_mask_nifti
from pipeline.volumes.readers import (
    ChannelFolderReader,
    KaggleFolderReader,
    NiftiReader,
    find_studies,
    read_channel,
    read_trio,
    read_volume,
    volume_reader_for,
)
from pipeline.volumes.volume import Volume
from tests.inference_helpers import TUMOUR_LEVEL
from tests.synthetic import make_slice

SPACING = (0.8, 0.9, 3.0)  # mm: rows (anterior-posterior), columns (right-left), slices
SERIES_UID = "1.2.826.0.1.3680043.2.1125.{}"


# --------------------------------------------------------------------------- builders


def model_study(n_slices: int = 8, size: int = 64, tumour: tuple[int, int] = (2, 5), seed: int = 0):
    """(data uint8 (rows, cols, slices, 3), truth uint8 0/1 (rows, cols, slices)) in model orientation."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for k in range(n_slices):
        image, mask = make_slice(rng, size, tumour[0] <= k <= tumour[1])
        images.append(image)
        masks.append(mask > 0)
    return np.stack(images, axis=2), np.stack(masks, axis=2).astype(np.uint8)


def model_affine(spacing=SPACING, origin=(12.0, -30.0, 5.0)) -> np.ndarray:
    """RAS affine of an array in model orientation: rows -> posterior, columns -> left, slices -> superior."""
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, -spacing[0], 0)
    affine[:3, 1] = (-spacing[1], 0, 0)
    affine[:3, 2] = (0, 0, spacing[2])
    affine[:3, 3] = origin
    affine[3, 3] = 1
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, canonical: bool = False) -> Path:
    """Write `data` with `affine`; `canonical` stores it reoriented to RAS (another voxel order)."""
    image = nib.Nifti1Image(data, affine)
    if canonical:
        image = nib.as_closest_canonical(image)
    nib.save(image, str(path))
    return path


def write_dicom_series(
    folder: Path, data: np.ndarray, spacing=SPACING, uid: str = SERIES_UID.format(1), description: str = "AX"
) -> Path:
    """Write one channel (rows, cols, slices) in model orientation as a DICOM series (int16).

    LPS identity direction is exactly the model orientation (i -> left, j -> posterior, k ->
    superior). Files are named in reverse slice order, so only the geometry sorts them.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 0, 1)).astype(np.int16))
    image.SetSpacing((spacing[1], spacing[0], spacing[2]))  # x = columns, y = rows, z = slices
    image.SetOrigin((-20.0, 15.0, -40.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = image.GetDepth()
    for k in range(n):
        one = image[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0008|103e": description,
            "0020|000d": SERIES_UID.format(999),
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]),
        }
        for tag, value in tags.items():
            one.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{n - k:04d}.dcm"))
        writer.Execute(one)
    return folder


def write_dicom_study(folder: Path, data: np.ndarray, scale: int = 7, offset: int = 13) -> Path:
    """A study folder with pre/, flair/, post/ DICOM series (int16 = uint8 * scale + offset)."""
    for c, name in enumerate(("pre", "flair", "post")):
        channel = data[..., c].astype(np.int16) * scale + offset
        write_dicom_series(folder / name, channel, uid=SERIES_UID.format(c + 1))
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


# --------------------------------------------------------------------------- readers


def test_a_kaggle_folder_reads_its_slices_in_numeric_order(synthetic_root):
    case = synthetic_root / "TCGA_BB_0004_20000404"  # 12 slices: `_10` after `_9`
    reader = volume_reader_for(case)
    assert isinstance(reader, KaggleFolderReader) and not reader.discover
    volume = read_volume(case)
    assert volume.shape == (64, 64, 12) and volume.nominal_geometry and volume.slice_axis == 2
    for k in range(12):
        np.testing.assert_array_equal(volume.data[:, :, k], read_array(case / f"{case.name}_{k + 1}.tif"))
    slices, grid = to_model_slices(volume)
    assert len(slices) == 12 and grid.offset == (0, 0) and grid.scaled == (MODEL_SIZE, MODEL_SIZE)


def test_a_4d_nifti_in_any_orientation_gives_the_same_model_slices(tmp_path):
    data, _ = model_study()
    affine = model_affine(spacing=(1.0, 1.0, 3.0))
    as_model = read_volume(write_nifti(tmp_path / "a.nii.gz", data, affine))
    as_ras = read_volume(write_nifti(tmp_path / "b.nii", data, affine, canonical=True))
    assert isinstance(volume_reader_for(tmp_path / "a.nii.gz"), NiftiReader)
    assert as_ras.data.shape[:3] == (64, 64, 8) and nib.aff2axcodes(as_ras.affine) == ("R", "A", "S")
    assert as_model.data.dtype == np.uint8 and as_model.study_id == "a"
    assert as_model.spacing == (1.0, 1.0, 3.0)
    slices_model, grid_model = to_model_slices(as_model)
    slices_ras, grid_ras = to_model_slices(as_ras)
    for a, b in zip(slices_model, slices_ras, strict=True):
        np.testing.assert_array_equal(a, b)
    # a (X, Y, Z, 1, 3) vector NIfTI reads the same
    vector = read_volume(write_nifti(tmp_path / "c.nii.gz", data[:, :, :, None, :], affine))
    np.testing.assert_array_equal(vector.data, as_model.data)
    # model slice k is input slice k here; the RAS copy has the same slice axis order (S)
    assert [grid_model.input_slice(k) for k in (0, 7)] == [0, 7]
    flip = np.diag([1, 1, -1, 1])
    flipped = read_volume(write_nifti(tmp_path / "d.nii.gz", data[:, :, ::-1], affine @ flip))
    grid = model_grid(flipped)
    assert [grid.input_slice(k) for k in (0, 7)] == [7, 0]  # stored superior first


def test_intensities_uint8_as_stored_anything_else_min_max_per_channel():
    x = np.random.default_rng(3).integers(0, 256, (16, 16, 4)).astype(np.uint8)
    x[0, 0, 0], x[1, 1, 1] = 0, 255
    np.testing.assert_array_equal(to_8bit(x), x)  # identity, not stretched
    np.testing.assert_array_equal(np.rint(to_8bit(x.astype(np.int16) * 7 + 13)), x)
    np.testing.assert_allclose(to_8bit(x.astype(np.float64) / 255.0 * 2.5 - 1.0), x, atol=1e-3)
    assert to_8bit(np.full((3, 3, 3), 42.0)).max() == 0  # a constant channel
    partial = np.array([0, 100, 200], np.uint8)  # uint8 below 255 stays as it is
    np.testing.assert_array_equal(to_8bit(partial), partial)


def test_in_plane_scaling_keeps_the_aspect_in_mm_pads_centred_and_masks_go_back_exactly(tmp_path):
    data = np.zeros((32, 64, 3, 3), np.int16)  # 32 rows of 2 mm, 64 columns of 0.5 mm: 64 x 32 mm
    data[8:12, 20:40, 1, 1] = 100
    volume = Volume(data=data, affine=model_affine(spacing=(2.0, 0.5, 4.0)), study_id="x")
    grid = model_grid(volume)
    assert grid.scaled == (256, 128) and grid.offset == (0, 64)  # rows span 64 mm, columns 32 mm
    slices, _ = to_model_slices(volume)
    assert slices[1][:, :64].max() == 0 and slices[1][:, -64:].max() == 0  # zero padding both sides
    assert slices[1][..., 1].max() > 200  # the bright block survives scaling
    # a mask made by nearest upsampling of an input mask comes back exactly
    truth = np.zeros((32, 64, 3), np.uint8)
    truth[5:20, 10:50, 0] = 1
    truth[0, 0, 2] = 1
    model = np.zeros((3, 256, 256), np.uint8)
    for k in range(3):
        model[k, :, 64:192] = np.kron(truth[:, :, k], np.ones((8, 2), np.uint8))
    np.testing.assert_array_equal(grid.mask_to_input(model), truth)
    everything = np.ones((3, 256, 256), np.uint8)
    everything[:, :, 64:192] = 0  # only the padding
    assert grid.mask_to_input(everything).max() == 0


def test_dicom_series_are_sorted_by_geometry_and_get_the_affine_itk_writes_to_nifti(tmp_path):
    import SimpleITK as sitk

    data, _ = model_study(n_slices=5, size=32)
    study = write_dicom_study(tmp_path / "case1", data)
    assert isinstance(volume_reader_for(study), ChannelFolderReader)
    volume = read_volume(study)
    assert volume.shape == (32, 32, 5) and volume.data.dtype == np.uint8 and volume.study_id == "case1"
    # voxel (i, j, k) = (column, row, slice): the model-orientation data transposed, as stored...
    expected = data[..., 1].transpose(1, 0, 2).astype(np.int16) * 7 + 13
    np.testing.assert_array_equal(read_channel(study / "flair")[0], expected)
    # ...and in the study converted to the models' 8 bits as it was read
    np.testing.assert_array_equal(volume.data[..., 1], np.rint(to_8bit(expected)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study / "flair")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "itk.nii.gz"))
    np.testing.assert_allclose(volume.affine, nib.load(str(tmp_path / "itk.nii.gz")).affine, atol=1e-5)
    assert volume.spacing == pytest.approx((SPACING[1], SPACING[0], SPACING[2]))
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    grid = model_grid(volume)
    assert grid.scaled == (228, 256) and grid.offset == (14, 0)  # rows 32 x 0.8 mm, columns 32 x 0.9 mm
    # the same study stored in model order with the same geometry gives the very same model slices
    same = Volume(data=data.astype(np.int16) * 7 + 13, affine=model_affine(), study_id="same")
    for a, b in zip(to_model_slices(volume)[0], to_model_slices(same)[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_write_mask_nifti_keeps_the_input_grid_and_measures_on_it(tmp_path):
    data, _ = model_study(n_slices=4, size=16)
    volume = Volume(data=data, affine=model_affine(), study_id="m")
    mask = np.zeros(volume.shape, np.uint8)
    mask[3:6, 4:9, 1:3] = 1
    write_mask_nifti(tmp_path / "m.nii.gz", mask, volume)
    image = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(image.affine, volume.affine, atol=1e-6)  # NIfTI stores float32
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask)
    assert image.get_data_dtype() == np.uint8 and int(image.header["sform_code"]) == 1
    measures = measure_study(mask, volume)
    assert measures.voxels == 30 and measures.volume_ml == pytest.approx(30 * 0.8 * 0.9 * 3.0 / 1000)
    assert measures.slice_range == (1, 3) and measures.bbox == (3, 4, 1, 6, 9, 3)
    nominal = Volume(data=data, affine=np.eye(4), study_id="k", nominal_geometry=True)
    assert measure_study(mask, nominal).volume_ml is None


def test_find_studies_takes_volumes_and_leaves_slices_to_the_slice_route(tmp_path, synthetic_root):
    data, _ = model_study(n_slices=3, size=16)
    root = tmp_path / "in"
    (root / "deep").mkdir(parents=True)
    write_nifti(root / "deep" / "s1.nii.gz", data, model_affine())
    trio = root / "trio"
    trio.mkdir()
    for c, name in enumerate(("T1", "flair", "t1ce")):
        write_nifti(trio / f"trio_{name}.nii.gz", data[..., c], model_affine())
    (root / "out").mkdir()
    write_nifti(root / "out" / "old_mask.nii.gz", data, model_affine())  # a previous output: skipped
    case = synthetic_root / "TCGA_CC_0005_20010505"
    studies, rest = find_studies([root, case], exclude=[root / "out"])
    assert studies == [(root / "deep" / "s1.nii.gz").absolute(), trio.absolute()]
    assert rest == [root, case]  # both may still hold slice files
    volume = read_volume(trio)
    np.testing.assert_array_equal(volume.data, data)  # T1 = pre, t1ce = post
    only, rest = find_studies([trio, str(root / "deep" / "*.nii.gz")])
    assert len(only) == 2 and rest == []


# --------------------------------------------------------------------------- bad studies


def _channel_files(folder: Path, data: np.ndarray, affines=None, names=("pre", "flair", "post")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(names):
        affine = model_affine() if affines is None else affines[c]
        channel = data[c] if isinstance(data, list) else data[..., c]
        write_nifti(folder / f"{folder.name}_{name}.nii.gz", channel, affine)
    return folder


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing_channel", "missing channel post-contrast"),
        ("shapes", "different shapes"),
        ("affines", "different affines"),
        ("two_d", "2D"),
        ("nan", "NaN or infinite"),
        ("huge", "too large"),
        ("three_d", "one channel"),
        ("unknown", "unknown volume format"),
        ("truncated", "unreadable or truncated NIfTI"),
        ("dicom_alone", "one DICOM series is one channel"),
    ],
)
def test_every_bad_study_is_a_data_error_naming_it(case, words, tmp_path):
    data, _ = model_study(n_slices=3, size=16)
    path = tmp_path / case
    if case == "missing_channel":
        _channel_files(path, data[..., :2], names=("pre", "flair"))
    elif case == "shapes":
        _channel_files(path, [data[..., 0], data[..., 1], data[:8, :, :, 2]])
    elif case == "affines":
        shifted = model_affine(origin=(12.0, -30.0, 9.0))  # post-contrast 4 mm off: not co-registered
        _channel_files(path, data, affines=[model_affine(), model_affine(), shifted])
    elif case == "two_d":
        path = write_nifti(tmp_path / "flat.nii.gz", data[:, :, 0, 1], np.eye(4))
    elif case == "nan":
        bad = data.astype(np.float32)
        bad[2, 2, 1, 1] = np.nan
        path = write_nifti(tmp_path / "nan.nii.gz", bad, model_affine())
    elif case == "huge":
        header = nib.Nifti1Header()
        header.set_data_shape((2000, 2000, 300, 3))
        header.set_data_dtype(np.uint8)
        path = tmp_path / "huge.nii"
        path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)  # the voxels are never read
    elif case == "three_d":
        path = write_nifti(tmp_path / "flair_only.nii.gz", data[..., 1], model_affine())
    elif case == "unknown":
        path.mkdir()
        (path / "notes.txt").write_text("not a scan")
    elif case == "truncated":
        write_nifti(tmp_path / "full.nii.gz", data, model_affine())
        path = tmp_path / "cut.nii.gz"
        path.write_bytes((tmp_path / "full.nii.gz").read_bytes()[:200])
    elif case == "dicom_alone":
        write_dicom_series(path, data[..., 1])
    with pytest.raises(DataError) as info:
        read_volume(path)
    assert words in str(info.value)
    assert str(path) in str(info.value) or any(str(path) in f for f in info.value.files)


def test_several_dicom_series_in_one_folder_are_listed_and_one_can_be_picked(tmp_path):
    data, _ = model_study(n_slices=3, size=16)
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed, data[..., 1], uid=SERIES_UID.format(1), description="AX FLAIR")
    for k in range(3):  # a second series in the same folder, under other file names
        (mixed / f"IM{3 - k:04d}.dcm").rename(mixed / f"A{k}.dcm")
    write_dicom_series(mixed, data[..., 2], uid=SERIES_UID.format(3), description="AX T1 POST")
    with pytest.raises(DataError) as info:
        read_channel(mixed)
    message = str(info.value)
    assert "2 DICOM series" in message and SERIES_UID.format(1) in message and SERIES_UID.format(3) in message
    assert "AX FLAIR" in message and "@<SeriesInstanceUID>" in message
    array, _, path = read_channel(f"{mixed}@{SERIES_UID.format(3)}")
    assert path == mixed and array.shape == (16, 16, 3)
    np.testing.assert_array_equal(array, data[..., 2].transpose(1, 0, 2))
    with pytest.raises(DataError, match="no DICOM series 9.9"):
        read_channel(f"{mixed}@9.9")
    # a trio picks series of one folder; pre-contrast missing is an error naming the others
    with pytest.raises(DataError, match="missing channel pre-contrast"):
        read_trio(None, f"{mixed}@{SERIES_UID.format(1)}", f"{mixed}@{SERIES_UID.format(3)}")


def test_stub_level_sanity_of_the_builders():
    data, truth = model_study()
    assert ((data[..., 1] > TUMOUR_LEVEL) == truth.astype(bool)).mean() > 0.99


def test_a_new_format_is_one_registered_reader(tmp_path, monkeypatch):
    class NumpyReader(readers.VolumeReader):
        name = "numpy"
        description = "a .npy file (X, Y, Z, 3)"

        def takes(self, path: Path) -> bool:
            return path.suffix == ".npy"

        def read(self, path: Path) -> Volume:
            return Volume(data=np.load(path), affine=np.eye(4), study_id=path.stem, format=self.name)

    data, _ = model_study(n_slices=3, size=16)
    np.save(tmp_path / "s.npy", data)
    with pytest.raises(DataError, match="unknown volume format"):
        read_volume(tmp_path / "s.npy")
    monkeypatch.setattr(readers, "VOLUME_READERS", list(readers.VOLUME_READERS))
    readers.register_volume_reader(NumpyReader())
    assert read_volume(tmp_path / "s.npy").format == "numpy"


def test_the_figure_reads_the_mask_nifti_back_over_its_scan(tmp_path):
    import matplotlib

    from pipeline.volumes.figure import volume_figure

    matplotlib.use("Agg")
    data, truth = model_study(n_slices=6, size=32)
    scan = write_nifti(tmp_path / "scan.nii.gz", data, model_affine(), canonical=True)
    volume = read_volume(scan)
    write_mask_nifti(tmp_path / "mask.nii.gz", np.asarray(nib.load(str(scan)).dataobj)[..., 1] > 150, volume)
    out = volume_figure(scan, tmp_path / "mask.nii.gz", tmp_path / "fig.png")
    assert Image.open(out).size[0] > 600  # three views side by side
    small = Volume(data=data[:8], affine=np.eye(4), study_id="s")
    write_mask_nifti(tmp_path / "small.nii.gz", truth[:8], small)
    with pytest.raises(DataError, match="not the scan's"):
        volume_figure(scan, tmp_path / "small.nii.gz", tmp_path / "bad.png")
