"""A pair whose segmenter is the ensemble of several runs' segmenters (`pipeline.models.ensemble`).

The classifier, the operating point, the split and the config come from the first run, so an
ensemble of fold-K runs validates on fold K (`calibrate --run OUT`, `evaluate --run OUT
--split val`) exactly as its members did; `pipeline.json` records the member runs, their sums
and their training minutes.

A source whose segmenter is itself an ensemble gives its members, each one vote (not one vote
for the whole nested ensemble); ``DIR#K`` takes only its member K, so one member of a release
can be replaced: ``ensemble runs/new-resnet50 models#1 --out OUT``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.data.splits import SPLITS_FILE
from pipeline.models.ensemble import build_ensemble, ensemble_members
from pipeline.models.model_io import ModelPair, load_pair, save_pair
from pipeline.paths import RUN_CONFIG_FILE

__all__ = ["save_ensemble_pair", "parse_source"]

_MEMBER = re.compile(r"^(?P<dir>.+)#(?P<index>\d+)$")


@dataclass(frozen=True)
class Source:
    """A run or pair folder, and which member of its ensemble segmenter to take (None: all)."""

    directory: Path
    member: int | None = None

    def __str__(self) -> str:
        return str(self.directory) if self.member is None else f"{self.directory}#{self.member}"


def parse_source(spec: str | os.PathLike) -> Source:
    """``DIR`` or ``DIR#K`` (member K, 0-based, of DIR's ensemble segmenter) -> a Source.

    An existing folder whose own name ends in ``#K`` is taken whole.
    """
    text = str(spec)
    match = _MEMBER.match(text)
    if match is None or Path(text).exists():
        return Source(Path(text))
    return Source(Path(match["dir"]), int(match["index"]))


def _segmenters(source: Source, pair: ModelPair) -> list[keras.Model]:
    members = ensemble_members(pair.segmenter)
    if source.member is None:
        return members or [pair.segmenter]
    if not members:
        raise ValueError(f"{source}: the segmenter of {source.directory} is not an ensemble, "
                         "so it has no members to pick from (drop '#K' to take it whole)")
    if source.member >= len(members):
        raise ValueError(f"{source}: {source.directory}'s ensemble has {len(members)} members "
                         f"(0..{len(members) - 1})")
    return [members[source.member]]


def save_ensemble_pair(runs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Pairs in `runs` -> a pair in `out_dir` segmenting with the mean of their segmenters.

    Each entry is a run or pair folder, or ``DIR#K`` for member K of that folder's ensemble
    segmenter; an ensemble taken whole contributes each of its members. At least two
    segmenters must result. Each run's files are checked against their sums when loaded.
    `out_dir` gets the first run's classifier, operating point, `splits.csv` and `config.yaml`
    (when present). Returns `out_dir`. Raises ValueError for fewer than two segmenters or a
    member that does not exist, DataError for a run that is not a valid pair.
    """
    sources = [parse_source(run) for run in runs]
    pairs = [load_pair(source.directory) for source in sources]
    segmenters = [m for source, pair in zip(sources, pairs, strict=True) for m in _segmenters(source, pair)]
    if len(segmenters) < 2:
        raise ValueError(f"an ensemble needs at least 2 segmenters, got {len(segmenters)} from "
                         f"{', '.join(map(str, sources))}")
    first, out_dir = sources[0].directory, Path(out_dir)
    meta = {k: v for k, v in pairs[0].meta.items() if k not in ("sha256", "created", "versions", "ensemble")}
    minutes = [p.meta.get("durations_minutes") or {} for p in pairs]
    meta["ensemble"] = {"members": [str(source) for source in sources],
                        "member_sha256": [p.meta["sha256"]["segmenter.keras"] for p in pairs],
                        "member_minutes": minutes,
                        "networks": len(segmenters)}
    # the ensemble's training time is its members' (the first run's alone would understate it)
    total = sum(m.get("segmenter_train", 0.0) for m in minutes)
    meta["durations_minutes"] = {"segmenter_train": round(total, 2)}
    save_pair(out_dir, pairs[0].classifier, build_ensemble(segmenters), meta)
    for name in (SPLITS_FILE, RUN_CONFIG_FILE):
        if (first / name).is_file():
            shutil.copyfile(first / name, out_dir / name)
    return out_dir
