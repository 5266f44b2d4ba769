"""Planning a diagnosis: what the inputs are (slices, volume studies) and the work units they
form, each diagnosed whole and journalled whole by an executor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.inference.diagnosis.outputs import check_locations
from pipeline.inference.image_loading import expand_inputs
from pipeline.inference.outputs import group_volumes, output_name, safe_stem, signature

SLICES, SLICE_STUDY, STUDY = "slices", "slice study", "study"  # the kinds of work unit


@dataclass(frozen=True)
class StudyInput:
    """One volume study to diagnose: a path a volume reader takes (`pipeline.volumes.readers`),
    or, with `channels`, the (pre-contrast, FLAIR, post-contrast) sources of one study (3D NIfTI
    files or DICOM series folders, `FOLDER@<SeriesInstanceUID>`; None for a missing one)."""

    path: Path  # the rows' `path`: the study, or its FLAIR source (else the first given)
    channels: tuple[str | None, str | None, str | None] | None = None
    study_id: str | None = None

    @classmethod
    def from_channels(
        cls, pre: str | None, flair: str | None, post: str | None, study_id: str | None = None
    ) -> StudyInput:
        first = next(src for src in (flair, pre, post) if src is not None)
        channels = tuple(None if s is None else str(s) for s in (pre, flair, post))
        return cls(path=source_root(first).absolute(), channels=channels, study_id=study_id)

    @property
    def key(self) -> str:
        """The journal key: the study's path, or its channel sources."""
        if self.channels is None:
            return str(self.path)
        return "channels:" + "|".join(
            "" if c is None else str(Path(c).expanduser().absolute()) for c in self.channels
        )

    def name(self) -> str:
        """Study id before reading: `study_id`, else the path's name without `.nii[.gz]`."""
        from pipeline.volumes.readers import study_name

        return self.study_id or study_name(self.path)

    def output_name(self) -> str:
        """`<study name>__<hash>`: as `output_name`, without `.nii[.gz]` in the stem."""
        from pipeline.volumes.readers import study_name

        digest = output_name(self.path if self.channels is None else Path(self.key)).rsplit("__", 1)[1]
        return f"{safe_stem(study_name(self.path), 'study')}__{digest}"

    def load(self) -> Any:
        from pipeline.volumes.readers import read_trio, read_volume

        if self.channels is None:
            return read_volume(self.path)
        return read_trio(*self.channels, study_id=self.study_id)

    def files(self) -> list[Path]:
        """Every file the study is read from (for its journal signature)."""
        roots = [self.path] if self.channels is None else [source_root(c) for c in self.channels if c]
        files: list[Path] = []
        for root in roots:
            if root.is_dir():
                files += sorted(p for p in root.rglob("*") if p.is_file())
            else:
                files.append(root)
        return files

    def signature(self) -> list[int] | None:
        """[files, total size, newest mtime_ns] of the study's files, to notice a changed study."""
        stats = [signature(p) for p in self.files()]
        if not stats or any(st is None for st in stats):
            return None
        return [len(stats), sum(st[0] for st in stats), max(st[1] for st in stats)]


def source_root(source: str | os.PathLike) -> Path:
    """The file or folder of a channel source (`FOLDER@<SeriesInstanceUID>` -> FOLDER)."""
    from pipeline.volumes.readers import SERIES_SEPARATOR

    path = Path(source).expanduser()
    if not path.exists() and SERIES_SEPARATOR in path.name:
        path = Path(str(path).rsplit(SERIES_SEPARATOR, 1)[0])
    return path

@dataclass(frozen=True)
class WorkUnit:
    """What an executor diagnoses and journals at once: a batch of single slices (SLICES), the
    slices of one Kaggle-layout study (SLICE_STUDY, `predict_volume`), or a volume study (STUDY)."""

    kind: str
    paths: tuple[Path, ...] = ()
    study: StudyInput | None = None

    @property
    def size(self) -> int:
        """Inputs the unit stands for in the progress bar."""
        return 1 if self.kind == STUDY else len(self.paths)

    def to_json(self) -> dict[str, Any]:
        study = self.study
        return {"kind": self.kind, "paths": [str(p) for p in self.paths],
                "study": None if study is None else
                {"path": str(study.path), "channels": study.channels, "study_id": study.study_id}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkUnit:
        study = data.get("study")
        return cls(
            kind=data["kind"],
            paths=tuple(Path(p) for p in data["paths"]),
            study=None if study is None else StudyInput(
                Path(study["path"]), None if study["channels"] is None else tuple(study["channels"]),
                study["study_id"]),
        )


def work_units(paths: Sequence[Path], batch_size: int, volumes: bool) -> list[WorkUnit]:
    """The slice files' units in the order they are diagnosed and journalled: each study whole
    (`group_volumes`, when `volumes`), single slices in batches of `batch_size`."""
    units = group_volumes(paths) if volumes else [[p] for p in paths]
    work: list[WorkUnit] = []
    singles: list[Path] = []
    for unit in units:
        if len(unit) > 1:
            work.append(WorkUnit(SLICE_STUDY, tuple(unit)))
        else:
            singles += unit
            if len(singles) == batch_size:
                work.append(WorkUnit(SLICES, tuple(singles)))
                singles = []
    if singles:
        work.append(WorkUnit(SLICES, tuple(singles)))
    return work


@dataclass
class Inputs:
    """What a diagnosis was given: slice files and volume studies, in report order."""

    paths: list[Path]
    studies: list[StudyInput]
    skipped_masks: int = 0

    @property
    def protected(self) -> list[Path]:
        """Every input file and study: never written over."""
        return [*self.paths, *(s.path for s in self.studies)]


def find_inputs(inputs: Sequence[str | os.PathLike], out: Path, *, include_masks: bool = False,
                channels: tuple[Any, Any, Any] = (None, None, None), study_id: str | None = None) -> Inputs:
    """The slice files and volume studies in `inputs` (files, folders, globs) and the study given
    by `channels` (pre, flair, post); DataError when there is none, or an input lies inside OUT."""
    from pipeline.volumes.readers import find_studies

    inputs = list(inputs)
    studies: list[StudyInput] = []
    if any(src is not None for src in channels):
        studies.append(StudyInput.from_channels(
            *(None if s is None else str(s) for s in channels), study_id=study_id
        ))
    check_locations([*inputs, *(s.path for s in studies)], out)
    found, slice_items = find_studies(inputs, exclude=[out])
    studies = [StudyInput(p) for p in found] + studies
    paths = expand_inputs(slice_items, include_masks=include_masks, exclude=[out]) if slice_items else []
    skipped_masks = 0
    if not include_masks and slice_items:
        skipped_masks = len(expand_inputs(slice_items, include_masks=True, exclude=[out])) - len(paths)
    if not paths and not studies:
        raise DataError(
            "no input images (TIFF, PNG or JPEG) or volume studies (NIfTI, DICOM) found",
            [str(i) for i in inputs],
        )
    return Inputs(paths, studies, skipped_masks)


def plan(paths: Sequence[Path], studies: Sequence[StudyInput], batch_size: int,
         volumes: bool) -> list[WorkUnit]:
    """Every work unit of `paths` (slice files) and `studies`: the slices' units, then one per study."""
    return [*work_units(paths, batch_size, volumes), *(WorkUnit(STUDY, study=s) for s in studies)]
