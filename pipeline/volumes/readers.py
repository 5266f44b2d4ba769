"""Reading studies into a `Volume`: a registry of volume reader classes, chosen by what the path is.

Each reader is a `VolumeReader` subclass that says which paths it takes (`takes(path)`) and
returns a `Volume` (`read(path)`); `volume_reader_for(path)` asks them in registry order and
`read_volume(path)` reads with the first that takes the path. An unknown format is a
`DataError` naming the path and the formats that are understood. Registered, in order:

* `NiftiReader`: a `.nii` / `.nii.gz` file holding the three channels on its 4th axis
  (X, Y, Z, 3) (also (X, Y, Z, 1, 3), the NIfTI vector layout), with nibabel. A 3D NIfTI is one
  channel: give three of them as a trio (a channel folder, or `--pre/--flair/--post`).
* `ChannelFolderReader`: a folder whose entries are named after the channels - NIfTI files or
  DICOM series folders whose name ends in `pre`, `flair` or `post` (`CHANNEL_ALIASES`: also
  `t1` for pre-contrast and `t1ce`, `t1c`, `t1gd` for post-contrast; `_`, `-`, `.` or a space
  before it), e.g. `case7/case7_flair.nii.gz` or `case7/flair/*.dcm`.
* `DicomFolderReader`: a folder of DICOM files (one series is one channel, so on its own it is
  refused with what to do instead; several series are listed with their SeriesInstanceUIDs).
* `KaggleFolderReader`: a Kaggle-layout folder of `<study>_<n>.tif` slices (uint8, 3 channels),
  read with `pipeline.data.readers.read_array` in `SLICE_PATTERN` numeric order.

`find_studies` splits `diagnose`'s inputs into studies (what a reader with `discover` takes:
NIfTI files, channel folders, DICOM folders, also found inside folders given) and the rest,
which keeps today's slice route (Kaggle folders, TIFF/PNG/JPEG files).

One channel (`read_channel`) is a 3D NIfTI file or a DICOM series folder; a folder holding several
series takes the series as `FOLDER@<SeriesInstanceUID>` (`SERIES_SEPARATOR`).

DICOM series are read with SimpleITK (`ImageSeriesReader`; GDCM sorts the files by their
position along the slice normal and finds every series in a folder). Its LPS geometry becomes a
RAS affine: voxel (i, j, k) is ITK's index (column, row, slice in geometric order), and
`affine = diag(-1, -1, 1, 1) @ [direction * spacing | origin]`, the affine ITK itself writes to
NIfTI; every voxel's world position equals dcm2niix's (which may store the rows flipped, with
its affine flipped to match).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.data.readers import is_mask_file, read_array, reader_for, slice_name
from pipeline.errors import DataError
from pipeline.preprocessing import CHANNELS
from pipeline.volumes.volume import (
    MAX_SLICES,
    Volume,
    check_finite,
    check_shape,
    from_channels,
    slice_axis_of,
)

__all__ = [
    "CHANNEL_ALIASES",
    "NIFTI_SUFFIXES",
    "SERIES_SEPARATOR",
    "VOLUME_READERS",
    "ChannelFolderReader",
    "DicomFolderReader",
    "KaggleFolderReader",
    "NiftiReader",
    "VolumeReader",
    "channel_entries",
    "dicom_series",
    "find_studies",
    "is_dicom_folder",
    "is_nifti",
    "is_study",
    "read_channel",
    "read_trio",
    "read_volume",
    "register_volume_reader",
    "study_name",
    "volume_reader_for",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SERIES_SEPARATOR = "@"
# channel -> the name endings that mean it (lower case), checked after a separator or as the whole name
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "pre-contrast": ("pre", "t1"),
    "FLAIR": ("flair",),
    "post-contrast": ("post", "t1ce", "t1c", "t1gd"),
}
_DICOM_PROBE = 8  # files looked at to decide whether a folder holds DICOM
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------- what a path is


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a `.nii` or `.nii.gz` name (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def study_name(path: str | os.PathLike) -> str:
    """The name of a study's file or folder without `.nii` / `.nii.gz` (`case7.nii.gz` -> `case7`)."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding DICOM files directly (the `DICM` marker, or a `.dcm` name)."""
    path = Path(path)
    if not path.is_dir():
        return False
    probed = 0
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return False
    for entry in entries:
        try:
            regular = entry.is_file()
        except OSError:  # a symlink loop and the like: not a DICOM file
            regular = False
        if entry.name.startswith(".") or not regular:
            continue
        if entry.name.lower().endswith(".dcm") or _is_dicom_file(Path(entry.path)):
            return True
        probed += 1
        if probed >= _DICOM_PROBE:
            break
    return False


def _channel_of(name: str) -> str | None:
    stem = study_name(name).lower()
    for channel, aliases in CHANNEL_ALIASES.items():
        for alias in aliases:
            if stem == alias or re.search(rf"[_\-. ]{re.escape(alias)}$", stem):
                return channel
    return None


def channel_entries(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Entries of `folder` named after a channel (`CHANNEL_ALIASES`): NIfTI files and DICOM folders."""
    found: dict[str, list[Path]] = {}
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not ((entry.is_file() and is_nifti(entry)) or is_dicom_folder(entry)):
            continue
        channel = _channel_of(entry.name)
        if channel is not None:
            found.setdefault(channel, []).append(entry)
    return found


# --------------------------------------------------------------------------- one channel


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except FileNotFoundError as exc:
        raise DataError("cannot open NIfTI (no such file)", [path]) from exc
    except Exception as exc:  # nibabel raises ImageFileError, gzip/zlib errors, EOFError, ...
        raise DataError(f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})", [path]) from exc


def _nifti_array(image, path: Path) -> np.ndarray:
    try:
        # dataobj keeps the stored dtype when the header has no scaling (uint8 stays uint8)
        return np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DataError(f"unreadable or truncated NIfTI data ({type(exc).__name__}: {exc})", [path]) from exc


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """The SeriesInstanceUIDs of the DICOM series in `folder` (GDCM), in GDCM's order."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _series_description(files: list[str]) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""


def _several_series_error(folder: Path, ids: list[str]) -> DataError:
    import SimpleITK as sitk

    listed = []
    for uid in ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        description = _series_description(list(files)) if files else ""
        listed.append(f"{uid} ({len(files)} files{', ' + repr(description) if description else ''})")
    return DataError(
        f"{len(ids)} DICOM series in one folder: {'; '.join(listed)}. Pick one per channel with "
        f"--pre/--flair/--post FOLDER{SERIES_SEPARATOR}<SeriesInstanceUID>, or give each series "
        "its own folder",
        [folder],
    )


def _read_dicom_series(folder: Path, uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series -> (array (i, j, k) = (column, row, slice), RAS affine)."""
    import SimpleITK as sitk

    if not folder.is_dir():
        raise DataError("not a folder of DICOM files", [folder])
    ids = dicom_series(folder)
    if not ids:
        raise DataError("no DICOM series found in the folder", [folder])
    if uid is None:
        if len(ids) > 1:
            raise _several_series_error(folder, ids)
        uid = ids[0]
    elif uid not in ids:
        raise DataError(
            f"no DICOM series {uid} in the folder (it holds {len(ids)}: {', '.join(ids)})", [folder]
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    if len(files) > MAX_SLICES:
        raise DataError(f"DICOM series too large ({len(files)} files; at most {MAX_SLICES} slices)", [folder])
    info = sitk.ImageFileReader()
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"unreadable DICOM file ({str(exc).strip().splitlines()[-1]})", [files[0]]) from exc
    check_shape((*info.GetSize()[:2], len(files)), [folder], "DICOM series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise DataError(f"unreadable DICOM series ({lines[-1] if lines else exc})", [folder]) from exc
    if image.GetDimension() != 3:
        raise DataError(
            f"DICOM series is {image.GetDimension()}D; a study needs three spatial axes", [folder]
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError("DICOM series has colour (several components per voxel)", [folder])
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))  # (z,y,x) -> (i,j,k)
    direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), np.float64)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return array, RAS_FROM_LPS @ lps


def _split_series(source: str | os.PathLike) -> tuple[Path, str | None]:
    """`FOLDER@UID` -> (FOLDER, UID); a path that exists as given is never split."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or SERIES_SEPARATOR not in path.name:
        return path, None
    folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
    return Path(folder).expanduser(), uid.strip() or None


def read_channel(source: str | os.PathLike, what: str = "channel") -> tuple[np.ndarray, np.ndarray, Path]:
    """One channel: a 3D NIfTI file or a DICOM series folder (`FOLDER@UID` picks a series).

    Returns (array (X, Y, Z), RAS affine, path). DataError naming the path otherwise.
    """
    path, uid = _split_series(source)
    if path.is_file() and is_nifti(path):
        image = _load_nifti(path)
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise DataError(
                f"{what} NIfTI has {len(shape)} axes {tuple(image.shape)}; one channel is 3D", [path]
            )
        check_shape(shape, [path], f"{what} NIfTI", slice_axis_of(image.affine))
        array = _nifti_array(image, path).reshape(shape)
        affine = np.asarray(image.affine, np.float64)
    elif path.is_dir():
        array, affine = _read_dicom_series(path, uid)
    elif not path.exists():
        raise DataError(f"{what} not found (no such file or folder)", [path])
    else:
        raise DataError(
            f"unknown {what} format: expected a .nii/.nii.gz file or a folder of DICOM files", [path]
        )
    check_finite(array, [path], what)
    return array, affine, path


def read_trio(
    pre: str | os.PathLike | None,
    flair: str | os.PathLike | None,
    post: str | os.PathLike | None,
    study_id: str | None = None,
) -> Volume:
    """The three channels from three sources (each `read_channel`), checked to be co-registered."""
    sources = dict(zip(CHANNELS, (pre, flair, post), strict=True))
    given = {name: src for name, src in sources.items() if src is not None}
    missing = [name for name in CHANNELS if name not in given]
    if missing:
        raise DataError(
            f"missing channel {', '.join(missing)}: a study needs {', '.join(CHANNELS)}",
            [str(s) for s in given.values()],
        )
    channels = {name: read_channel(src, name) for name, src in given.items()}
    name = study_id or study_name(_split_series(sources["FLAIR"])[0])
    return from_channels(channels, name, "trio")


# --------------------------------------------------------------------------- the registry


class VolumeReader:
    """A reader of one kind of study path. Subclasses set `name`, implement `takes` and `read`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    discover: ClassVar[bool] = True  # `find_studies` treats what it takes as a study (module docstring)

    def takes(self, path: Path) -> bool:
        """True when this reader takes `path` (from what the path is: file name, folder contents)."""
        raise NotImplementedError

    def read(self, path: Path) -> Volume:
        """The study at `path` as a Volume; DataError naming `path` otherwise."""
        raise NotImplementedError


class NiftiReader(VolumeReader):
    """A 4D NIfTI file (X, Y, Z, 3): pre-contrast, FLAIR, post-contrast on the last axis."""

    name = "NIfTI"
    description = "a .nii/.nii.gz file with the three channels on its 4th axis"

    def takes(self, path: Path) -> bool:
        return is_nifti(path) and not path.is_dir()

    def read(self, path: Path) -> Volume:
        image = _load_nifti(path)
        shape = tuple(image.shape)
        if len(shape) == 5 and shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
            shape = (*shape[:3], shape[4])
        if len(shape) < 3:
            raise DataError(f"NIfTI is 2D (shape {shape}); a study needs three spatial axes", [path])
        check_shape(shape[:3], [path], "NIfTI", slice_axis_of(image.affine))
        if len(shape) == 3:
            raise DataError(
                f"NIfTI is 3D (shape {shape}), one channel; a study needs {', '.join(CHANNELS)}: "
                "give a 4D NIfTI (X, Y, Z, 3), a folder of pre/flair/post files, or --pre/--flair/--post",
                [path],
            )
        if len(shape) != 4 or shape[3] != len(CHANNELS):
            raise DataError(
                f"NIfTI has shape {tuple(image.shape)}; expected (X, Y, Z, 3) with the channels "
                f"{', '.join(CHANNELS)}",
                [path],
            )
        data = _nifti_array(image, path).reshape(shape)
        check_finite(data, [path], "NIfTI")
        return Volume(
            data=data, affine=image.affine, study_id=study_name(path), files=(path,), format=self.name
        )


class ChannelFolderReader(VolumeReader):
    """A folder of channel-named NIfTI files or DICOM series folders (module docstring)."""

    name = "channel folder"
    description = "a folder of NIfTI files or DICOM folders named ..._pre, ..._flair, ..._post"

    def takes(self, path: Path) -> bool:
        return path.is_dir() and bool(channel_entries(path))

    def read(self, path: Path) -> Volume:
        entries = channel_entries(path)
        doubled = {name: found for name, found in entries.items() if len(found) > 1}
        if doubled:
            name, found = next(iter(doubled.items()))
            raise DataError(f"{len(found)} entries for the {name} channel; keep one", found)
        missing = [name for name in CHANNELS if name not in entries]
        if missing:
            raise DataError(
                f"missing channel {', '.join(missing)}: a study needs {', '.join(CHANNELS)} "
                f"(found {', '.join(p.name for found in entries.values() for p in found)})",
                [path],
            )
        channels = {name: read_channel(entries[name][0], name) for name in CHANNELS}
        volume = from_channels(channels, study_name(path), self.name)
        return Volume(
            data=volume.data, affine=volume.affine, study_id=volume.study_id, files=(path, *volume.files),
            format=self.name,
        )


class DicomFolderReader(VolumeReader):
    """A folder of DICOM files. One series is one channel, so a study needs three: refused with how."""

    name = "DICOM"
    description = "a DICOM series folder (one channel: give it with --pre/--flair/--post)"

    def takes(self, path: Path) -> bool:
        return is_dicom_folder(path)

    def read(self, path: Path) -> Volume:
        ids = dicom_series(path)
        if not ids:
            raise DataError("no readable DICOM series in the folder", [path])
        if len(ids) > 1:
            raise _several_series_error(path, ids)
        raise DataError(
            "one DICOM series is one channel; a study needs pre-contrast, FLAIR and post-contrast: "
            "give the three series with --pre/--flair/--post, or as subfolders pre/, flair/, post/ "
            "of one study folder",
            [path],
        )


class KaggleFolderReader(VolumeReader):
    """A Kaggle-layout folder `<study>_<n>.tif` (one study): slices stacked in numeric order.

    The slices carry no geometry, so the affine is a 1 mm stand-in in the models' orientation
    (`nominal_geometry`): rows run anterior -> posterior and slice 1 is the most inferior, as the
    dataset's slices show; columns are taken to run patient right -> left (the radiological view
    DICOM displays; the dataset does not say).
    """

    name = "Kaggle slices"
    description = "a folder of one study's <study>_<n>.tif slices"
    discover = False  # diagnose keeps its own route for slice files (group_volumes)

    @staticmethod
    def slices(path: Path) -> dict[str, list[tuple[int, Path]]]:
        studies: dict[str, list[tuple[int, Path]]] = {}
        try:
            entries = sorted(path.iterdir())
        except OSError:
            return studies
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file() or is_mask_file(entry):
                continue
            try:
                reader_for(entry)
            except DataError:
                continue
            name = slice_name(entry.stem)
            if name is not None:
                studies.setdefault(name.study, []).append((name.number, entry))
        return studies

    def takes(self, path: Path) -> bool:
        return path.is_dir() and bool(self.slices(path))

    def read(self, path: Path) -> Volume:
        studies = self.slices(path)
        if len(studies) != 1:
            raise DataError(f"{len(studies)} studies of slices in one folder ({', '.join(studies)})", [path])
        study, members = next(iter(studies.items()))
        members.sort(key=lambda t: t[0])
        if len(members) > MAX_SLICES:
            raise DataError(f"Kaggle study too large ({len(members)} slices; at most {MAX_SLICES})", [path])
        arrays = [read_array(p) for _, p in members]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1 or any(a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
            raise DataError(
                f"slices must all be uint8 (H, W, 3) of one size; found {sorted(shapes)}", [path]
            )
        data = np.stack(arrays, axis=2)  # (rows, cols, slices, 3)
        affine = np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
        return Volume(
            data=data, affine=affine, study_id=study, files=tuple(p for _, p in members), format=self.name,
            nominal_geometry=True,
        )


VOLUME_READERS: list[VolumeReader] = [
    NiftiReader(),
    ChannelFolderReader(),
    DicomFolderReader(),
    KaggleFolderReader(),
]


def register_volume_reader(reader: VolumeReader) -> None:
    """Add `reader` ahead of the built-in ones (so it may take over a kind of path)."""
    VOLUME_READERS.insert(0, reader)


def volume_reader_for(path: str | os.PathLike) -> VolumeReader:
    """The registered reader that takes `path`; DataError naming `path` and the known formats otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError("study not found (no such file or folder)", [path])
    for reader in VOLUME_READERS:
        if reader.takes(path):
            return reader
    known = "; ".join(r.description for r in VOLUME_READERS)
    raise DataError(f"unknown volume format; expected {known}", [path])


def read_volume(path: str | os.PathLike) -> Volume:
    """Read the study at `path` with its registered reader (`volume_reader_for`)."""
    path = Path(path).expanduser()
    return volume_reader_for(path).read(path)


def is_study(path: str | os.PathLike) -> bool:
    """True when a registered reader with `discover` takes `path` (a study to diagnose whole)."""
    path = Path(path)
    return any(reader.discover and reader.takes(path) for reader in VOLUME_READERS)


def find_studies(
    items: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
) -> tuple[list[Path], list[str | os.PathLike]]:
    """Split command-line inputs into studies and the items left for the slice search.

    A NIfTI file, or a folder a discovering reader takes (a channel folder, a DICOM folder), is a
    study; folders (recursively, hidden ones and `exclude` skipped, studies not descended into)
    and glob matches are searched for more. Returns (study paths in input order, each once; the
    items that may still hold slice files: every folder that is not itself a study, every glob
    matching something that is not a study, every other item as given).
    """
    from pipeline.paths import safe_resolve

    excluded = [safe_resolve(e) for e in exclude]
    found: dict[Path, Path] = {}

    def outside(path: Path) -> bool:
        resolved = safe_resolve(path)
        return not any(resolved == e or resolved.is_relative_to(e) for e in excluded)

    def search(folder: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            keep = []
            for name in dirnames:
                sub = Path(dirpath) / name
                if name.startswith(".") or not outside(sub):
                    continue
                if is_study(sub):
                    found.setdefault(safe_resolve(sub), sub.absolute())
                else:
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                candidate = Path(dirpath) / name
                if not name.startswith(".") and is_nifti(name) and outside(candidate):
                    found.setdefault(safe_resolve(candidate), candidate.absolute())

    def visit(path: Path) -> bool:
        """Record `path` (or what is under it) -> True when `path` itself is a study."""
        if not outside(path):
            return False
        if (path.is_file() and is_nifti(path)) or (path.is_dir() and is_study(path)):
            found.setdefault(safe_resolve(path), path.absolute())
            return True
        if path.is_dir():
            search(path)
        return False

    rest: list[str | os.PathLike] = []
    ordered: list[Path] = []
    for item in items:
        before = set(found)
        path = Path(item).expanduser()
        if path.exists():
            if not visit(path):
                rest.append(item)
        elif _GLOB_CHARS.search(str(item)):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(str(item)), recursive=True))]
            studies = [visit(m) for m in matches]
            if not matches or not all(studies):
                rest.append(item)
        else:
            rest.append(item)
        ordered += sorted((found[key] for key in found if key not in before), key=lambda p: str(p))
    return ordered, rest
