"""DICOM series folders: which files form which series, in which order, and their voxels.

A folder is scanned file by file (`scan_folder`), not handed to GDCM's directory scanner: an
entry that is not a regular file (a FIFO named `.dcm`, a device, a dangling link) would block
a reader or make GDCM drop good files silently, so it is skipped and reported with why (each
becomes its own error row), and so is a file that carries the DICOM marker or a `.dcm` name but
cannot be read. Other files (notes, a DICOMDIR without pixels) are not DICOM slices and are left
alone, as GDCM does.

Each slice's header gives its SeriesInstanceUID (a series is one channel), position and
orientation; `geometry.check_slice_positions` orders the slices along their normal and refuses
uneven stacks before SimpleITK reads the pixels (`read_series`). The LPS geometry becomes a RAS
affine: voxel (i, j, k) is ITK's index (column, row, slice in geometric order), and
`affine = diag(-1, -1, 1, 1) @ [direction * spacing | origin]`, the affine ITK itself writes to
NIfTI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.readers import not_regular
from pipeline.errors import DataError
from pipeline.volumes.geometry import check_affine, check_slice_positions
from pipeline.volumes.volume import MAX_SLICES, check_bytes, check_shape

__all__ = [
    "RAS_FROM_LPS",
    "DicomSeries",
    "FolderScan",
    "SliceHeader",
    "non_regular",
    "read_series",
    "scan_folder",
    "several_series_error",
]

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TAGS = {"uid": "0020|000e", "position": "0020|0032", "orientation": "0020|0037", "description": "0008|103e"}


@dataclass(frozen=True)
class SliceHeader:
    """One DICOM file's header: what places it in its series."""

    path: Path
    uid: str
    description: str
    position: tuple[float, ...] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row, column cosines)
    size: tuple[int, ...]
    pixel_id: int
    components: int


@dataclass
class FolderScan:
    """A folder's DICOM files by SeriesInstanceUID (file-name order), and the entries left out."""

    series: dict[str, list[SliceHeader]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def non_regular(path: Path) -> str | None:
    """Why `path` is skipped without being opened (`pipeline.data.readers.not_regular`), or None."""
    why = not_regular(path)
    return None if why is None else f"{why}; skipped"


def _looks_dicom(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _itk_reason(exc: BaseException) -> str:
    """The last line of an ITK error, without the object's address."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", lines[-1] if lines else str(exc)).strip()


def _numbers(text: str) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None


def _header(path: Path) -> SliceHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()

    def tag(key: str) -> str:
        return reader.GetMetaData(_TAGS[key]).strip() if reader.HasMetaDataKey(_TAGS[key]) else ""

    return SliceHeader(
        path=path, uid=tag("uid"), description=tag("description"), position=_numbers(tag("position")),
        orientation=_numbers(tag("orientation")), size=tuple(reader.GetSize()),
        pixel_id=reader.GetPixelID(), components=reader.GetNumberOfComponents(),
    )


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """The DICOM files directly in `folder`, by series, and what was skipped (module docstring)."""
    scan = FolderScan()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list the DICOM folder ({exc.strerror or exc})", [folder]) from exc
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(".") or (entry.is_dir() and not entry.is_symlink()):
            continue
        why = non_regular(path)
        if why is not None:
            scan.skipped.append((path, why))
            continue
        if not _looks_dicom(path):
            continue
        try:
            header = _header(path)
        except RuntimeError as exc:
            scan.skipped.append((path, f"unreadable DICOM file {path.name} ({_itk_reason(exc)})"))
            continue
        scan.series.setdefault(header.uid, []).append(header)
    return scan


def several_series_error(folder: Path, scan: FolderScan, separator: str) -> DataError:
    """The error for a folder holding several series: each listed with its files and description."""
    listed = []
    for uid, headers in scan.series.items():
        description = headers[0].description
        listed.append(f"{uid} ({len(headers)} files{', ' + repr(description) if description else ''})")
    return DataError(
        f"{len(scan.series)} DICOM series in one folder: {'; '.join(listed)}. Pick one per channel with "
        f"--pre/--flair/--post FOLDER{separator}<SeriesInstanceUID>, or give each series its own folder",
        [folder],
    )


@dataclass
class DicomSeries:
    """One series read: `array` (i, j, k) = (column, row, slice) in its stored dtype (a view into
    `image`, kept alive here), the RAS `affine`, the file of each slice k, the entries skipped."""

    array: np.ndarray
    affine: np.ndarray
    files: list[Path]
    skipped: list[tuple[Path, str]]
    image: Any = field(repr=False, default=None)


def _ordered(folder: Path, headers: list[SliceHeader]) -> list[Path]:
    """The series' files in geometric order, after checking they form one even stack."""
    unplaced = [h.path.name for h in headers if h.position is None or len(h.position) != 3
                or h.orientation is None or len(h.orientation) != 6]
    if unplaced:
        raise DataError(f"DICOM file(s) without ImagePositionPatient/ImageOrientationPatient "
                        f"({', '.join(unplaced[:5])}): cannot place their slices", [folder])
    sizes = {h.size[:2] for h in headers}
    if len(sizes) > 1:
        raise DataError(f"DICOM series with slices of different sizes {sorted(sizes)}", [folder])
    order = check_slice_positions(
        np.array([h.position for h in headers]), np.array([h.orientation for h in headers]),
        [h.path for h in headers],
    )
    return [headers[i].path for i in order]


def _execute(folder: Path, files: list[Path]):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in files])
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # spacing is checked above; no stderr noise
    try:
        return reader.Execute()
    except RuntimeError as exc:
        bad = []
        for f in files:  # which file: a truncated one fails on its own
            try:
                sitk.ReadImage(str(f), imageIO="GDCMImageIO")
            except RuntimeError:
                bad.append(f)
        named = f" in {', '.join(f.name for f in bad[:5])}" if bad else ""
        raise DataError(f"unreadable or truncated DICOM pixel data{named} ({_itk_reason(exc)})",
                        [*bad, folder]) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _itemsize(header: SliceHeader) -> int:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(sitk.Image([1, 1], header.pixel_id)).itemsize


def read_series(folder: Path, uid: str | None, separator: str = "@") -> DicomSeries:
    """One series of `folder` (the only one when `uid` is None); DataError naming the folder
    (and the files at fault) otherwise."""
    import SimpleITK as sitk

    scan = scan_folder(folder)
    if not scan.series:
        raise DataError("no DICOM series found in the folder", [folder])
    if uid is None and len(scan.series) > 1:
        raise several_series_error(folder, scan, separator)
    if uid is not None and uid not in scan.series:
        raise DataError(f"no DICOM series {uid} in the folder (it holds {len(scan.series)}: "
                        f"{', '.join(scan.series)})", [folder])
    headers = scan.series[uid if uid is not None else next(iter(scan.series))]
    if len(headers) > MAX_SLICES:
        raise DataError(f"DICOM series too large ({len(headers)} files; at most {MAX_SLICES} slices)",
                        [folder])
    check_shape((*headers[0].size[:2], len(headers)), [folder], "DICOM series")
    check_bytes((*headers[0].size[:2], len(headers)), _itemsize(headers[0]) * headers[0].components,
                [folder], "DICOM series")
    try:
        files = _ordered(folder, headers)
        image = _execute(folder, files)
    except DataError as exc:
        if not scan.skipped:
            raise
        left_out = "; ".join(f"{path.name}: {why}" for path, why in scan.skipped[:5])
        raise DataError(f"{str(exc).splitlines()[0]} (left out of the folder: {left_out})",
                        [*exc.files, *(path for path, _ in scan.skipped[:5])]) from exc
    if image.GetDimension() != 3:
        raise DataError(f"DICOM series is {image.GetDimension()}D; a study needs three spatial axes",
                        [folder])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError("DICOM series has colour (several components per voxel)", [folder])
    direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), np.float64)[None, :]
    lps[:3, 3] = image.GetOrigin()
    affine = check_affine(RAS_FROM_LPS @ lps, [folder], "DICOM series")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k), a view
    return DicomSeries(array, affine, files, scan.skipped, image)
