"""The resume journal OUT/.progress.jsonl: a config line, then one line per finished input.

A re-run with the same settings drops what the journal already has (`resumed`), unless the input
changed (size and mtime) or one of its outputs is gone. A journal made with other settings or
models is refused (`Journal.load`); rows whose outputs could not be written are not journalled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.inference.diagnosis.schema import (
    COLUMNS,
    JOURNAL,
    JOURNAL_VERSION,
    OUTPUT_COLUMNS,
    RETRY,
    STUDY_KEYS,
    current_words,
)
from pipeline.inference.outputs import signature, writing
from pipeline.io_utils import atomic_write

log = logging.getLogger(__name__)

Rows = dict[str, dict[str, Any]]
Studies = dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]


class Journal:
    """Append-only JSON-lines record of finished inputs: a config line (the settings and models the
    run was made with), then one line per input."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = {"type": "config", "version": JOURNAL_VERSION, **config}

    def load(self) -> dict[str, dict[str, Any]]:
        """Entries of a journal written with the same config, keyed by input path ({} when there is
        no journal, or one of an older version or with a damaged header: starting afresh).

        Raises DataError naming the differences when the journal was made with other settings or
        models: resuming would mix two runs' results (`resume=False`, `--no-resume`, starts over).
        Tolerant otherwise: unreadable bytes, lines that are not JSON objects (a torn last line)
        and rows missing their keys are skipped with a warning (those inputs are diagnosed again).
        """
        if not self.path.is_file():
            return {}
        try:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        except OSError as exc:
            log.warning("%s: cannot read the journal (%s); starting afresh", self.path, exc)
            return {}
        header = json_line(lines[0]) if lines else None
        if header != self.config:
            self._refuse_or_restart(header)
            return {}
        entries: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines[1:], start=2):
            record = json_line(line)
            if not (is_row_record(record) or is_study_record(record)):  # e.g. cut short: redone
                log.warning("%s: ignoring damaged line %d", self.path, number)
                continue
            entries[record["key"]] = record
        return entries

    def _refuse_or_restart(self, header: Any) -> None:
        """A header unlike ours: DataError when it is this version's with other settings, else a
        warning (an older journal or a damaged header: starting afresh)."""
        if not (isinstance(header, dict) and header.get("type") == "config"):
            log.warning("%s: damaged journal header; starting afresh", self.path)
        elif header.get("version") != JOURNAL_VERSION:
            log.warning("%s was written by another version of diagnose (journal %s, this is %s); "
                        "starting afresh", self.path, header.get("version"), JOURNAL_VERSION)
        else:
            raise DataError(
                f"the output folder holds the results of a run with other settings or models "
                f"({settings_difference(header, self.config)}); resuming would mix the two. Pass "
                "--no-resume (resume=False) to diagnose everything again with these settings, or "
                "choose another --out",
                [self.path],
            )

    def reset(self) -> None:
        """Start the journal afresh: the config line alone (OutputWriteError when it cannot be written)."""
        with writing(JOURNAL, self.path), atomic_write(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.config) + "\n")

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append `records` (those marked `retry` left out) and fsync, so a finished unit survives a
        crash. All or nothing: a failed write (a full disk) is cut back to where it began, so no
        torn line remains, and raised as OutputWriteError."""
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records if not r.get("retry"))
        if not lines:
            return
        with writing(JOURNAL, self.path), open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            start = fh.tell()
            try:
                if start:
                    fh.seek(start - 1)
                    if fh.read(1) != b"\n":  # an earlier append was cut short (kill -9)
                        lines = "\n" + lines
                fh.write(lines.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    fh.truncate(start)
                raise


def settings_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`key: old -> new` for every setting that differs between two journal headers."""
    def shown(value: Any) -> str:
        value = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
        return value if len(value) <= 80 else value[:77] + "..."

    keys = sorted({*old, *new} - {"type"}, key=lambda k: (k not in new, k))
    return "; ".join(f"{k}: {shown(old.get(k, _ABSENT))} in the journal, {shown(new.get(k, _ABSENT))} now"
                     for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT))


_ABSENT = object()


def json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def is_row_record(record: Any) -> bool:
    """A journal row of this version: its key, the input's signature and a complete row."""
    return (
        isinstance(record, dict)
        and record.get("type") == "row"
        and isinstance(record.get("key"), str)
        and isinstance(record.get("row"), dict)
        and set(COLUMNS) <= set(record["row"])
        and (record.get("signature") is None or isinstance(record.get("signature"), list))
    )


def is_study_record(record: Any) -> bool:
    """A journalled volume study: its key, signature, complete rows and study record."""
    return (
        isinstance(record, dict)
        and record.get("type") == "study"
        and isinstance(record.get("key"), str)
        and isinstance(record.get("rows"), list)
        and bool(record["rows"])
        and all(isinstance(r, dict) and set(COLUMNS) <= set(r) for r in record["rows"])
        and isinstance(record.get("study"), dict)
        and set(STUDY_KEYS) <= set(record["study"])
        and (record.get("signature") is None or isinstance(record.get("signature"), list))
    )


def outputs_present(out: Path, row: dict[str, Any]) -> bool:
    """True when every output file a journalled row names is still in OUT."""
    return all(not row.get(key) or (out / row[key]).is_file() for key in OUTPUT_COLUMNS)


def study_outputs_present(out: Path, entry: dict[str, Any]) -> bool:
    mask = entry["study"].get("mask_nifti")
    return (not mask or (out / mask).is_file()) and all(outputs_present(out, r) for r in entry["rows"])


def resumed(done: dict[str, dict[str, Any]], out: Path, paths: Sequence[Path],
            studies: Sequence[Any]) -> tuple[Rows, Studies]:
    """What the journal entries `done` already hold of `paths` and `studies` (StudyInput): the
    rows by path and the (record, rows) by study key, each unchanged and with its outputs in OUT."""
    rows: Rows = {}
    for p in paths:
        entry = done.get(str(p))
        if entry is None or entry.get("type") != "row" or not outputs_present(out, entry["row"]):
            continue
        if entry.get("signature") == signature(p):
            rows[str(p)] = current_words(entry["row"])
    study_results: Studies = {}
    for study in studies:
        entry = done.get(study.key)
        if entry is None or entry.get("type") != "study" or not study_outputs_present(out, entry):
            continue
        if entry.get("signature") == study.signature():
            study_results[study.key] = (entry["study"], [current_words(r) for r in entry["rows"]])
    return rows, study_results


def slice_records(paths: Sequence[Path], rows: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """Journal records of a finished unit of slices, in input order; a row whose outputs could not
    be written (`RETRY`) gives a record marked `retry`, which `Journal.append` leaves out."""
    records = []
    for p in paths:
        row = rows[p]
        record = {"type": "row", "key": str(p), "signature": signature(p), "row": row}
        if row.pop(RETRY, False):
            record["retry"] = True
        records.append(record)
    return records


def study_record(study: Any, record: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The journal record of a finished volume study (marked `retry` as `slice_records`)."""
    entry = {"type": "study", "key": study.key, "signature": study.signature(), "rows": rows, "study": record}
    if any([row.pop(RETRY, False) for row in rows]):  # a list: every mark popped
        entry["retry"] = True
    return entry


def take(records: Sequence[dict[str, Any]], rows: Rows, studies: Studies) -> None:
    """Put the journal `records` of a finished unit into `rows` and `studies`."""
    for r in records:
        if r["type"] == "row":
            rows[r["key"]] = r["row"]
        else:
            studies[r["key"]] = (r["study"], r["rows"])


def retry_messages(records: Sequence[dict[str, Any]]) -> list[str]:
    """`<input>: <error>` for each record of a finished unit marked `retry` (not journalled)."""
    messages = []
    for r in records:
        if r.get("retry"):
            errors = [r["row"]["error"]] if r["type"] == "row" else [x["error"] for x in r["rows"]]
            messages += [f"{r['key']}: {e}" for e in errors if e]
    return messages
