"""Patient-level train/val/test splits: stratified, seeded, written once and reused.

Slices of one patient are strongly correlated, so every split here is by `patient_id`; a slice
split would leak patients between train and test and inflate every score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.io_utils import write_csv
from pipeline.paths import MODELS_DIR, SPLITS_FILE, PairSource

__all__ = [
    "ALL",
    "EVAL_SPLITS",
    "SPLITS_FILE",
    "SPLIT_NAMES",
    "pair_splits_file",
    "require_split_file",
    "select_positions",
    "make_splits",
    "save_splits",
    "load_splits",
    "assert_no_leakage",
    "ensure_splits",
    "positions_for_split",
    "split_table",
    "make_folds",
    "fold_split",
    "all_folds_split",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
ALL = "all"  # every patient under a data root: needs no split file
EVAL_SPLITS = (*reversed(SPLIT_NAMES), ALL)  # `evaluate --split`: test (the default), val, train, all
SPLIT_COLUMNS = ["patient_id", "split"]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLIT_NAMES) or any(f < 0 for f in values) or not np.isclose(sum(values), 1.0):
        raise ValueError(
            f"fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {fractions}"
        )
    if values[0] == 0:
        raise ValueError("the train fraction must be > 0")
    return values  # type: ignore[return-value]


def _patient_table(df: pd.DataFrame) -> pd.DataFrame:
    """Slice index -> one row per patient: slices, tumour slices, tumour fraction (sorted by patient)."""
    table = df.groupby("patient_id", sort=True).agg(slices=("has_tumor", "size"), tumor=("has_tumor", "sum"))
    table["fraction"] = table["tumor"] / table["slices"]
    return table


def _strata(table: pd.DataFrame) -> np.ndarray:
    """Stratum per patient: 0 = no tumour slice, then quantile bins of tumour-slice fraction."""
    strata = np.zeros(len(table), dtype=int)
    has = table["tumor"].to_numpy() > 0
    n_bins = int(np.clip(has.sum() // 8, 1, 4))  # keep ~8+ patients per bin so each split can draw from it
    if n_bins > 1:
        ranks = table["fraction"][has].rank(method="first").to_numpy()
        strata[has] = 1 + np.minimum(((ranks - 1) * n_bins / has.sum()).astype(int), n_bins - 1)
    else:
        strata[has] = 1
    return strata


def make_splits(
    df: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 42
) -> pd.DataFrame:
    """Slice index (needs `patient_id`, `has_tumor`) -> DataFrame[patient_id, split] with one row per patient.

    Patients are stratified by tumour-slice fraction (no-tumour patients form their own
    stratum), shuffled within each stratum with `seed`, and dealt out in stratum order to
    whichever split is furthest below its target fraction. So each split gets its share of
    every stratum, patient counts stay within one of `fraction * n_patients`, and the same
    data and seed always give the same split. Raises DataError when a split with a non-zero
    fraction would get no patient or no tumour slice (too few patients for these fractions).
    """
    fractions = _check_fractions(fractions)
    table = _patient_table(df)
    rng = np.random.default_rng(seed)
    strata = _strata(table)
    # Random order inside each stratum; strata stay contiguous so the dealing below spreads them.
    order = np.lexsort((rng.permutation(len(table)), strata))
    targets = np.asarray(fractions)
    assigned = np.zeros(len(SPLIT_NAMES))
    split_of = np.empty(len(table), dtype=object)
    for step, patient in enumerate(order, start=1):
        k = int(np.argmax(targets * step - assigned))  # largest deficit; ties go to the earlier split
        split_of[patient] = SPLIT_NAMES[k]
        assigned[k] += 1
    splits = pd.DataFrame({"patient_id": table.index.to_numpy(), "split": split_of})
    _verify(splits, table, fractions)
    return splits.sort_values("patient_id", kind="stable").reset_index(drop=True)


def make_folds(index_df: pd.DataFrame, splits: pd.DataFrame, folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """The train and validation patients of `splits` -> DataFrame[patient_id, fold] (fold 0..folds-1).

    Stratified like `make_splits` (tumour-slice fraction strata, dealt in turn), seeded, so
    the same data, split and seed always give the same folds. Test patients are never in a
    fold. Raises DataError when a fold would get no patient with tumour.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    pool = set(splits.loc[splits["split"].isin(("train", "val")), "patient_id"])
    table = _patient_table(index_df[index_df["patient_id"].isin(pool)])
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(table)), _strata(table)))
    fold_of = np.empty(len(table), dtype=int)
    fold_of[order] = np.arange(len(table)) % folds
    out = pd.DataFrame({"patient_id": table.index.to_numpy(), "fold": fold_of})
    tumour = out["patient_id"].map(table["tumor"])
    for k in range(folds):
        if tumour[out["fold"] == k].sum() == 0:
            raise DataError(f"cannot make {folds} folds of {len(table)} patients: "
                            f"fold {k} gets no tumour slice")
    return out


def fold_split(splits: pd.DataFrame, folds_df: pd.DataFrame, fold: int) -> pd.DataFrame:
    """DataFrame[patient_id, split] for cross-validation fold `fold`: that fold validates, the others train.

    The test patients of `splits` stay test; patients in no fold keep their split only if test.
    """
    if fold not in set(folds_df["fold"]):
        raise ValueError(f"fold {fold} not in folds {sorted(set(folds_df['fold']))}")
    val = set(folds_df.loc[folds_df["fold"] == fold, "patient_id"])
    train = set(folds_df["patient_id"]) - val
    test = set(splits.loc[splits["split"] == "test", "patient_id"])
    rows = [(p, "train") for p in train] + [(p, "val") for p in val] + [(p, "test") for p in test]
    out = pd.DataFrame(rows, columns=SPLIT_COLUMNS).sort_values("patient_id", kind="stable")
    assert_no_leakage(out)
    return out.reset_index(drop=True)


def all_folds_split(splits: pd.DataFrame) -> pd.DataFrame:
    """DataFrame[patient_id, split] with every train and validation patient training and none validating.

    For the final model retrained on all folds (``data.fold: all``); the test patients stay test.
    """
    out = splits[["patient_id", "split"]].copy()
    out.loc[out["split"] == "val", "split"] = "train"
    assert_no_leakage(out)
    return out.reset_index(drop=True)


def _verify(splits: pd.DataFrame, table: pd.DataFrame, fractions: Sequence[float]) -> None:
    tumor = splits["patient_id"].map(table["tumor"])
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        if fraction == 0:
            continue
        members = splits["split"] == name
        if not members.any() or tumor[members].sum() == 0:
            raise DataError(
                f"cannot make a stratified patient split: split '{name}' gets no "
                f"{'patient' if not members.any() else 'tumour slice'} "
                f"({len(table)} patients, {int((table['tumor'] > 0).sum())} with tumour, "
                f"fractions {fractions})"
            )


def save_splits(splits: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write DataFrame[patient_id, split] to CSV atomically (sorted by split, then patient)."""
    assert_no_leakage(splits)
    ordered = splits[SPLIT_COLUMNS].copy()
    ordered["_rank"] = ordered["split"].map({n: i for i, n in enumerate(SPLIT_NAMES)})
    ordered = ordered.sort_values(["_rank", "patient_id"], kind="stable")[SPLIT_COLUMNS]
    write_csv(path, ordered)


def load_splits(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split CSV -> DataFrame[patient_id, split]; DataError naming the file if it is malformed."""
    path = Path(path)
    try:
        splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file ({exc})", [path]) from exc
    if list(splits.columns) != SPLIT_COLUMNS:
        raise DataError(f"split file must have columns {SPLIT_COLUMNS}, found {list(splits.columns)}", [path])
    unknown = sorted(set(splits["split"]) - set(SPLIT_NAMES))
    if unknown:
        raise DataError(f"split file has unknown split names {unknown} (valid: {list(SPLIT_NAMES)})", [path])
    try:
        assert_no_leakage(splits)
    except DataError as exc:
        raise DataError(f"{exc}\n(in split file)", [path]) from exc
    return splits.drop_duplicates().reset_index(drop=True)


def assert_no_leakage(splits: pd.DataFrame | Mapping[str, Iterable[str]]) -> None:
    """Raise DataError naming every patient that appears in more than one split.

    Accepts DataFrame[patient_id, split] or a mapping split name -> patient ids.
    """
    if isinstance(splits, Mapping):
        splits = pd.DataFrame(
            [(p, name) for name, patients in splits.items() for p in patients], columns=SPLIT_COLUMNS
        )
    per_patient = splits.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    leaked = per_patient[per_patient.map(len) > 1]
    if len(leaked):
        detail = "; ".join(f"{p} in {', '.join(s)}" for p, s in leaked.items())
        raise DataError(f"patient leakage: {len(leaked)} patient(s) in more than one split: {detail}")


def ensure_splits(
    index_df: pd.DataFrame,
    path: str | os.PathLike,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    force: bool = False,
) -> pd.DataFrame:
    """Return the split for `index_df`: reuse the file at `path`, or make and write it once.

    An existing file is reused as is (fractions/seed are then ignored), so training and
    evaluation always see the same patients. If the data holds patients the file does not
    cover, raises DataError listing them: pass `force=True` (CLI `--resplit`) to re-split.
    `force=True` always makes and writes a fresh split. The result's `attrs["source"]` is
    `"created"` or `"reused"`.
    """
    path = Path(path)
    if path.exists() and not force:
        splits = load_splits(path)
        missing = sorted(set(index_df["patient_id"]) - set(splits["patient_id"]))
        if missing:
            raise DataError(
                f"the split file does not cover {len(missing)} patient(s) in the data: {', '.join(missing)}. "
                "Re-split with force=True (CLI --resplit); note this changes the test set.",
                [path],
            )
        extra = sorted(set(splits["patient_id"]) - set(index_df["patient_id"]))
        if extra:
            log.info("split file %s lists %d patient(s) not in the data (ignored)", path, len(extra))
        splits.attrs["source"] = "reused"
        return splits
    splits = make_splits(index_df, fractions=fractions, seed=seed)
    save_splits(splits, path)
    splits.attrs["source"] = "created"
    return splits


def _split_mask(index_df: pd.DataFrame, splits_df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; valid: {list(SPLIT_NAMES)}")
    assert_no_leakage(splits_df)
    members = set(splits_df.loc[splits_df["split"] == name, "patient_id"])
    return index_df["patient_id"].isin(members).to_numpy()


def positions_for_split(index_df: pd.DataFrame, splits_df: pd.DataFrame, name: str) -> np.ndarray:
    """Row positions (0-based, int64) of split `name` in `index_df`: the `positions` for `make_dataset`."""
    return np.flatnonzero(_split_mask(index_df, splits_df, name)).astype(np.int64)


def split_table(index_df: pd.DataFrame, splits_df: pd.DataFrame) -> pd.DataFrame:
    """Per split (rows train/val/test/total): patients, slices, tumour_slices, tumour_patients."""
    merged = index_df.merge(splits_df[SPLIT_COLUMNS], on="patient_id", how="left")
    rows = {}
    for name in (*SPLIT_NAMES, "total"):
        part = merged if name == "total" else merged[merged["split"] == name]
        rows[name] = {
            "patients": part["patient_id"].nunique(),
            "slices": len(part),
            "tumour_slices": int(part["has_tumor"].sum()),
            "tumour_patients": part.loc[part["has_tumor"], "patient_id"].nunique(),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- a pair's split file


def pair_splits_file(
    splits: str | os.PathLike | None, source: PairSource, default_models: str | os.PathLike = MODELS_DIR
) -> Path | None:
    """The split file of a pair: `splits` if given, else the run's (then the pair's) `SPLITS_FILE`,
    else `<default_models>/splits.csv` (the release's) when it exists, else None."""
    if splits is not None:
        return Path(splits)
    for folder in (source.run_dir, source.pair_dir):
        if folder is not None and (Path(folder) / SPLITS_FILE).is_file():
            return Path(folder) / SPLITS_FILE
    fallback = Path(default_models) / SPLITS_FILE
    return fallback if fallback.is_file() else None


def require_split_file(split: str, splits_path: str | os.PathLike | None) -> None:
    """Raise DataError (with what to do) when `split` needs a split file and there is none."""
    if split != ALL and (splits_path is None or not Path(splits_path).is_file()):
        raise DataError(
            f"no split file for --split {split}: pass --splits FILE, run `make index`/`make train`, "
            f"or evaluate every patient with --split {ALL}",
            [splits_path or MODELS_DIR / SPLITS_FILE],
        )


def select_positions(index_df: pd.DataFrame, split: str, splits_path: str | os.PathLike | None) -> np.ndarray:
    """Row positions of `index_df` for `split`: every row for `split="all"`, else the split's patients.

    `split="all"` needs no split file (patients the models never saw just work). Raises
    DataError when the split file is missing or the split has no patient in this data root.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(EVAL_SPLITS)}")
    if split == ALL:
        return np.arange(len(index_df), dtype=np.int64)
    require_split_file(split, splits_path)
    positions = positions_for_split(index_df, load_splits(splits_path), split)
    if len(positions) == 0:
        raise DataError(
            f"the {split} split of this split file has no patient in the data root "
            f"{index_df.attrs.get('root', '?')}",
            [splits_path],
        )
    return positions
