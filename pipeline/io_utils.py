"""Files: atomic writes (a temporary file beside the target, then a rename), file sums, CSV cells
a spreadsheet cannot run (`csv_cell`, `write_csv`: every CSV the project writes goes through them)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temp file next to `path` for writing; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")


def atomic_save(path: str | os.PathLike, save_fn) -> None:
    """Call `save_fn(tmp_path)` to write a file by path (e.g. `model.save`, `fig.savefig`), then rename.

    The temporary name keeps the suffix of `path`, because Keras and matplotlib pick the
    format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        save_fn(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` (created if absent) while the block runs.

    Raises BlockingIOError at once when another process holds it. The kernel drops the lock
    when its process dies (kill -9 too), so a crash never leaves a stale lock behind; the file
    itself stays (an empty marker). Local filesystems and NFSv4 honour it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(exc.errno, "locked by another process", str(path)) from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


_TEMPORARY = re.compile(r"^\..+(\.tmp|\.tmp\d+(\.[^.]+)*)$")


def is_leftover_temporary(name: str) -> bool:
    """True for the names of temporary files `atomic_write` (`.<name>.<random>.tmp`) and
    `atomic_save` (`.<stem>.tmp<pid><suffixes>`) create, which a killed process leaves behind."""
    return bool(_TEMPORARY.match(name))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (`=HYPERLINK(...)` in a file name would be live in patient_id); OWASP's "CSV injection".
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def csv_cell(value: Any) -> Any:
    """`value` as a CSV cell no spreadsheet runs: a string starting with `=`, `+`, `-`, `@`, tab or
    CR gets a leading `'` (shown as text); numbers, None and strings that are plain numbers
    ("-0.5", "-inf") are returned as they are, so numeric columns stay numeric."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def csv_safe(table: Any) -> Any:
    """A copy of the pandas DataFrame `table` with `csv_cell` applied to its text columns."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    table = table.copy()
    for column in table.columns:
        if not (is_numeric_dtype(table[column]) or is_bool_dtype(table[column])):  # text, objects
            table[column] = table[column].map(csv_cell)
    return table


def write_csv(path: str | os.PathLike, table: Any) -> None:
    """Write the DataFrame `table` to `path` atomically, without its index, cells `csv_safe`."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        csv_safe(table).to_csv(fh, index=False)
