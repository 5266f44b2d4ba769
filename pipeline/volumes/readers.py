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

One channel (`read_channel`, as stored) is a 3D NIfTI file or a DICOM series folder
(`pipeline.volumes.dicom`); a folder holding several series takes the series as
`FOLDER@<SeriesInstanceUID>` (`SERIES_SEPARATOR`). Studies are read channel by channel and each
channel is converted to the models' 8 bits as soon as it is read (`read_channel_8bit`,
`pipeline.volumes.intensity`), so at most one channel is held in its stored dtype; the
header-declared size of a channel is checked first (`check_shape`, `check_bytes`), and its affine
(`geometry.check_affine`).

Every input gets a row: a folder with channel files and other studies (two 4D NIfTIs next to
`extra_flair.nii.gz`) is searched, not read as one study, so each study and each channel file
without partners is its own row; entries of a DICOM folder that are not regular files or not
readable are skipped each with its own error row (`Volume.skipped`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data.readers import is_mask_file, not_regular, read_array, reader_for, slice_name
from pipeline.errors import DataError
from pipeline.preprocessing import CHANNELS
from pipeline.volumes.dicom import read_series, scan_folder, several_series_error
from pipeline.volumes.geometry import check_affine
from pipeline.volumes.intensity import intensity_scale, to_uint8
from pipeline.volumes.volume import (
    MAX_SLICES,
    Volume,
    check_bytes,
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
    "Channel8",
    "channel_entries",
    "dicom_series",
    "find_studies",
    "is_dicom_folder",
    "is_nifti",
    "is_study",
    "other_studies",
    "read_channel",
    "read_channel_8bit",
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


def other_studies(folder: str | os.PathLike) -> list[Path]:
    """What in `folder` is a study but not a channel entry: NIfTI files not named after a channel
    (any kind of file: a bad one gets its error row) and study folders."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith(".") or _channel_of(entry.name) is not None:
            continue
        if (is_nifti(entry) and not entry.is_dir()) or (entry.is_dir() and is_study(entry)):
            found.append(entry)
    return found


# --------------------------------------------------------------------------- one channel


def _load_nifti(path: Path):
    import nibabel as nib

    why = not_regular(path)
    if why is not None:  # /dev/zero or a FIFO: nibabel would call it an empty file, or block
        raise DataError(f"cannot read NIfTI: {why}", [path])
    try:
        return nib.load(str(path))
    except FileNotFoundError as exc:
        raise DataError("cannot open NIfTI (no such file)", [path]) from exc
    except Exception as exc:  # nibabel raises ImageFileError, gzip/zlib errors, EOFError, ...
        raise DataError(f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})", [path]) from exc


def _nifti_array(image, path: Path, index: tuple = ()) -> np.ndarray:
    """The voxels of `image[index]` (all of them by default) as stored, read from the file."""
    try:
        # dataobj keeps the stored dtype when the header has no scaling (uint8 stays uint8), and
        # reads only the bytes of `index` (one channel), not the whole file
        return np.asanyarray(image.dataobj[index] if index else image.dataobj)
    except Exception as exc:
        raise DataError(f"unreadable or truncated NIfTI data ({type(exc).__name__}: {exc})", [path]) from exc


def _nifti_itemsize(image) -> int:
    """Bytes a voxel takes once read: the stored dtype's, or float64's when the header scales it."""
    slope, inter = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
    scaled = not (slope in (1.0, None) or np.isnan(slope)) or not (inter in (0.0, None) or np.isnan(inter))
    return max(image.get_data_dtype().itemsize, 8 if scaled else 0)


def _nifti_geometry(image, path: Path, what: str) -> np.ndarray:
    """The NIfTI's affine, checked finite and invertible, and its shape checked against the caps."""
    affine = check_affine(image.affine, [path], f"{what} NIfTI")
    check_shape(image.shape[:3], [path], f"{what} NIfTI", slice_axis_of(affine, [path]))
    check_bytes(image.shape[:3], _nifti_itemsize(image), [path], f"{what} NIfTI")
    return affine


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """The SeriesInstanceUIDs of the DICOM series in `folder`, in file-name order of their first file."""
    return list(scan_folder(folder).series)


def _split_series(source: str | os.PathLike) -> tuple[Path, str | None]:
    """`FOLDER@UID` -> (FOLDER, UID); a path that exists as given is never split."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or SERIES_SEPARATOR not in path.name:
        return path, None
    folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
    return Path(folder).expanduser(), uid.strip() or None


@dataclass
class RawChannel:
    """One channel as read: `array` (X, Y, Z) in its stored dtype, its RAS `affine`, its `path`;
    for DICOM the file of each stored slice and the folder's entries skipped (`dicom.scan_folder`)."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    slice_files: list[Path] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    keep: Any = field(repr=False, default=None)  # what `array` is a view into


def _read_raw_channel(source: str | os.PathLike, what: str) -> RawChannel:
    path, uid = _split_series(source)
    if is_nifti(path) and not path.is_dir() and (path.exists() or path.is_symlink()):
        image = _load_nifti(path)
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise DataError(
                f"{what} NIfTI has {len(shape)} axes {tuple(image.shape)}; one channel is 3D", [path]
            )
        affine = _nifti_geometry(image, path, what)
        channel = RawChannel(_nifti_array(image, path).reshape(shape), affine, path)
    elif path.is_dir():
        series = read_series(path, uid, SERIES_SEPARATOR)
        channel = RawChannel(series.array, series.affine, path, series.files, series.skipped, series.image)
    elif not path.exists():
        raise DataError(f"{what} not found (no such file or folder)", [path])
    else:
        raise DataError(
            f"unknown {what} format: expected a .nii/.nii.gz file or a folder of DICOM files", [path]
        )
    check_finite(channel.array, [path], what)
    return channel


def read_channel(source: str | os.PathLike, what: str = "channel") -> tuple[np.ndarray, np.ndarray, Path]:
    """One channel as stored: a 3D NIfTI file or a DICOM series folder (`FOLDER@UID` picks a series).

    Returns (array (X, Y, Z) in its stored dtype, RAS affine, path). DataError naming the path otherwise.
    """
    channel = _read_raw_channel(source, what)
    return np.array(channel.array), channel.affine, channel.path


@dataclass
class Channel8:
    """One channel in the models' 8 bits (`intensity`): uint8 (X, Y, Z), affine, path, what the rows say."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def to_8bit_channel(raw: np.ndarray, files: Sequence[Path], what: str,
                    slice_files: Sequence[Path] | None = None, out: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, list[str]]:
    """A raw channel (X, Y, Z) -> (uint8 in the models' range, row warnings), by `intensity`."""
    scale = intensity_scale(raw, files, what, slice_files)
    warning = scale.warning(what)
    return to_uint8(raw, scale, out), [warning] if warning else []


def read_channel_8bit(source: str | os.PathLike, what: str = "channel") -> Channel8:
    """One channel read (`read_channel`) and converted to uint8 at once, so that only one channel
    is ever held in its stored dtype."""
    raw = _read_raw_channel(source, what)
    array, notes = to_8bit_channel(raw.array, [raw.path], what, raw.slice_files)
    return Channel8(array, raw.affine, raw.path, notes, raw.skipped)


def _from_8bit_channels(channels: dict[str, Channel8], study_id: str, format: str) -> Volume:
    volume = from_channels({n: (c.array, c.affine, c.path) for n, c in channels.items()}, study_id, format)
    return replace(volume, notes=tuple(n for c in channels.values() for n in c.notes),
                   skipped=tuple(s for c in channels.values() for s in c.skipped))


def read_trio(
    pre: str | os.PathLike | None,
    flair: str | os.PathLike | None,
    post: str | os.PathLike | None,
    study_id: str | None = None,
) -> Volume:
    """The three channels from three sources (each `read_channel_8bit`), checked to be co-registered."""
    sources = dict(zip(CHANNELS, (pre, flair, post), strict=True))
    given = {name: src for name, src in sources.items() if src is not None}
    missing = [name for name in CHANNELS if name not in given]
    if missing:
        raise DataError(
            f"missing channel {', '.join(missing)}: a study needs {', '.join(CHANNELS)}",
            [str(s) for s in given.values()],
        )
    channels = {name: read_channel_8bit(src, name) for name, src in given.items()}
    name = study_id or study_name(_split_series(sources["FLAIR"])[0])
    return _from_8bit_channels(channels, name, "trio")


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

    @staticmethod
    def _check_layout(image, path: Path) -> tuple[int, ...]:
        shape = tuple(image.shape)
        if len(shape) == 5 and shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
            shape = (*shape[:3], shape[4])
        if len(shape) < 3:
            raise DataError(f"NIfTI is 2D (shape {shape}); a study needs three spatial axes", [path])
        _nifti_geometry(image, path, "")
        if len(shape) == 3:
            channel = _channel_of(path.name)
            alone = f"a {channel} channel file without its partners" if channel else "one channel"
            raise DataError(
                f"NIfTI is 3D (shape {shape}), {alone}; a study needs {', '.join(CHANNELS)}: "
                "give a 4D NIfTI (X, Y, Z, 3), a folder of pre/flair/post files, or --pre/--flair/--post",
                [path],
            )
        if len(shape) != 4 or shape[3] != len(CHANNELS):
            raise DataError(
                f"NIfTI has shape {tuple(image.shape)}; expected (X, Y, Z, 3) with the channels "
                f"{', '.join(CHANNELS)}",
                [path],
            )
        return shape

    def read(self, path: Path) -> Volume:
        image = _load_nifti(path)
        shape = self._check_layout(image, path)
        vector = len(image.shape) == 5
        data = np.empty(shape, np.uint8)
        notes: list[str] = []
        for c, name in enumerate(CHANNELS):  # one channel at a time in its stored dtype
            raw = _nifti_array(image, path, (slice(None),) * 3 + ((0, c) if vector else (c,)))
            check_finite(raw, [path], "NIfTI")
            notes += to_8bit_channel(raw, [path], name, out=data[..., c])[1]
            del raw
        return Volume(
            data=data, affine=image.affine, study_id=study_name(path), files=(path,), format=self.name,
            notes=tuple(notes),
        )


class ChannelFolderReader(VolumeReader):
    """A folder of channel-named NIfTI files or DICOM series folders (module docstring).

    It takes a folder whose channel entries are complete (each of `CHANNELS`), or that holds
    nothing else a study could be read from; a folder with some channel files and other studies
    is searched instead (`find_studies`: each study and each channel file on its own row).
    """

    name = "channel folder"
    description = "a folder of NIfTI files or DICOM folders named ..._pre, ..._flair, ..._post"

    def takes(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        entries = channel_entries(path)
        if not entries:
            return False
        return set(entries) == set(CHANNELS) or not other_studies(path)

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
        channels = {name: read_channel_8bit(entries[name][0], name) for name in CHANNELS}
        volume = _from_8bit_channels(channels, study_name(path), self.name)
        return replace(volume, files=(path, *volume.files))


class DicomFolderReader(VolumeReader):
    """A folder of DICOM files. One series is one channel, so a study needs three: refused with how."""

    name = "DICOM"
    description = "a DICOM series folder (one channel: give it with --pre/--flair/--post)"

    def takes(self, path: Path) -> bool:
        return is_dicom_folder(path)

    def read(self, path: Path) -> Volume:
        scan = scan_folder(path)
        if not scan.series:
            raise DataError("no readable DICOM series in the folder", [path])
        if len(scan.series) > 1:
            raise several_series_error(path, scan, SERIES_SEPARATOR)
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

    def add(study: Path) -> None:
        """Record a study; a study folder's other studies too (`other_studies`: nothing is dropped)."""
        found.setdefault(safe_resolve(study), study.absolute())
        if study.is_dir():
            for other in other_studies(study):
                if outside(other) and safe_resolve(other) not in found:
                    add(other)

    def search(folder: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            keep = []
            for name in dirnames:
                sub = Path(dirpath) / name
                if name.startswith(".") or not outside(sub):
                    continue
                if is_study(sub):
                    add(sub)
                else:
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                candidate = Path(dirpath) / name
                if not name.startswith(".") and is_nifti(name) and outside(candidate):
                    add(candidate)

    def visit(path: Path) -> bool:
        """Record `path` (or what is under it) -> True when `path` itself is a study."""
        if not outside(path):
            return False
        if (is_nifti(path) and not path.is_dir()) or (path.is_dir() and is_study(path)):
            add(path)
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
