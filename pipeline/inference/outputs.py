"""What a diagnosis writes and calls things: decision words, output names, work units, the safe writer.

Shared by the diagnosis (`pipeline.inference.diagnosis`) and the review page (`pipeline.inference.review`), so
neither imports the other for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.readers import slice_name
from pipeline.errors import DataError, OutputWriteError
from pipeline.inference.overlays import encode_png
from pipeline.io_utils import atomic_write_bytes
from pipeline.paths import safe_resolve

TUMOUR = "tumour"  # flagged and the final mask is not empty
FLAGGED_EMPTY = "flagged, nothing outlined"  # flagged, but the mask is empty after post-processing
NO_TUMOUR = "no tumour"  # not flagged by the classifier
MIN_VOLUME_SLICES = 3  # fewer slices of a study are diagnosed one by one

_TERMINAL_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def decision(flagged: bool, area_px: int | None) -> str:
    """The decision word of a slice: TUMOUR only where the final mask is not empty."""
    if not flagged:
        return NO_TUMOUR
    return TUMOUR if area_px else FLAGGED_EMPTY


def text(value: str) -> str:
    """`value` made safe for a report: undecodable file-name bytes (surrogates) as `\\xNN`,
    terminal escape sequences removed, other control characters (newlines too) as one space."""
    escaped = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(" ", _TERMINAL_ESCAPE.sub("", escaped)).strip()


def safe_stem(value: str, fallback: str) -> str:
    """`value` as a file-name stem: `text`, runs of other than word characters, `.` and `-` as
    one `_`, no leading or trailing `.`/`_`; `fallback` when nothing is left."""
    return re.sub(r"[^\w.-]+", "_", text(value)).strip("._") or fallback


def output_name(path: Path) -> str:
    """Output base name of an input: `<stem>__<hash of its absolute path>`, the same in every run."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:8]
    return f"{safe_stem(Path(path).stem, 'slice')}__{digest}"


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Input path -> `output_name(path)`: unique per input path, the same in every run."""
    return {p: output_name(p) for p in paths}


def signature(path: Path) -> list[int] | None:
    """(size, mtime_ns) of an input, to notice when a journalled input has changed since."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def within(path: Path, folder: Path) -> bool:
    """True when `path`, resolved, is `folder` or inside it."""
    path = safe_resolve(path)
    return path == folder or path.is_relative_to(folder)


class OutputWriter:
    """Writes output files atomically, only inside OUT and never over an input."""

    def __init__(self, out: Path, inputs: Sequence[Path]):
        self.out = out
        self.root = safe_resolve(out)
        self.protected = {safe_resolve(p) for p in inputs}

    def _target(self, relative: str) -> Path:
        """OUT/`relative`; DataError (the input's row) if that lands outside OUT (e.g. through a
        symlink already there) or on an input."""
        target = self.out / relative
        resolved = safe_resolve(target)
        if not within(resolved, self.root) or resolved in self.protected:
            raise DataError(
                f"refusing to write {text(relative)}: it resolves to {text(str(resolved))}, "
                "outside the output folder or onto an input file",
                [target],
            )
        return target

    def png(self, relative: str, image: np.ndarray) -> str:
        """Write `image` as the PNG OUT/`relative` (checked as `_target`); OutputWriteError when the
        file system refuses (full disk, read-only folder)."""
        target = self._target(relative)
        data = encode_png(image)
        with writing(relative, target):
            atomic_write_bytes(target, data)
        return relative

    def nifti(self, relative: str, mask: np.ndarray, volume: Any) -> str:
        """Write `mask` as the NIfTI OUT/`relative` on `volume`'s grid (checked as `_target`;
        OutputWriteError as `png`)."""
        from pipeline.volumes.nifti_out import write_mask_nifti

        target = self._target(relative)
        with writing(relative, target):
            write_mask_nifti(target, mask, volume)
        return relative


@contextlib.contextmanager
def writing(relative: str, target: Path) -> Iterator[None]:
    """Turn an OSError while writing OUT/`relative` into OutputWriteError (a problem of OUT, not of
    the input: the diagnosis keeps the row's decision and does not journal it, so a re-run retries)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot write {text(relative)}: {exc.strerror or exc}",
                               str(target)) from exc



def group_volumes(paths: Sequence[Path]) -> list[list[Path]]:
    """Split `paths` into work units: studies (same folder and `<study>_<n>` stem, at least
    `MIN_VOLUME_SLICES`, sorted by n) and single slices, each single a unit of its own."""
    studies: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for p in paths:
        name = slice_name(p.stem)
        if name is not None and not name.is_mask:
            studies.setdefault((p.parent, name.study), []).append((name.number, p))
    volume_of: dict[Path, tuple[Path, str]] = {}
    for key, members in studies.items():
        if len(members) >= MIN_VOLUME_SLICES:
            volume_of.update({p: key for _, p in members})
    units: list[list[Path]] = []
    seen: set[tuple[Path, str]] = set()
    for p in paths:
        key = volume_of.get(p)
        if key is None:
            units.append([p])
        elif key not in seen:
            seen.add(key)
            units.append([q for _, q in sorted(studies[key], key=lambda t: t[0])])
    return units
