"""Patient-level splits: no leakage, stratified, seeded and stable, written once, K-fold by patient."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.index import index_dataset
from pipeline.data.splits import (
    SPLIT_NAMES,
    assert_no_leakage,
    ensure_splits,
    load_splits,
    make_splits,
    positions_for_split,
    save_splits,
    split_table,
)
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def index_df(synthetic_root, tmp_path_factory):
    return index_dataset(synthetic_root, cache_dir=tmp_path_factory.mktemp("cache"))


def fake_index(n_patients: int = 60, seed: int = 0, tumour_free: int = 6) -> pd.DataFrame:
    """A slice frame without files: varying slice counts and tumour fractions per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        n = int(rng.integers(20, 40))
        tumour = 0 if i < tumour_free else int(rng.integers(1, n))
        start = int(rng.integers(0, n - tumour + 1))
        for s in range(n):
            rows.append(
                {"patient_id": f"TCGA_XX_{i:04d}", "slice": s + 1, "has_tumor": start <= s < start + tumour}
            )
    return pd.DataFrame(rows)


def test_every_patient_in_exactly_one_split(index_df):
    splits = make_splits(index_df)
    assert sorted(splits["patient_id"]) == sorted(index_df["patient_id"].unique())
    assert splits["patient_id"].is_unique
    assert set(splits["split"]) <= set(SPLIT_NAMES)
    assert_no_leakage(splits)
    rows = [index_df.iloc[positions_for_split(index_df, splits, n)] for n in SPLIT_NAMES]
    parts = [set(r["patient_id"]) for r in rows]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(r) for r in rows) == len(index_df)


def test_each_split_gets_tumour_patients_and_slices(index_df):
    table = split_table(index_df, make_splits(index_df))
    assert (table.loc[list(SPLIT_NAMES), "tumour_slices"] > 0).all()
    assert (table.loc[list(SPLIT_NAMES), "tumour_patients"] > 0).all()


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.1, 0.1)])
def test_patient_counts_follow_the_fractions(fractions):
    df = fake_index()
    splits = make_splits(df, fractions=fractions, seed=3)
    counts = splits["split"].value_counts()
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        assert abs(counts[name] - fraction * df["patient_id"].nunique()) <= 1


def test_strata_are_spread_over_splits():
    df = fake_index(tumour_free=9)
    splits = make_splits(df, seed=5).set_index("patient_id")["split"]
    tumour_free = [f"TCGA_XX_{i:04d}" for i in range(9)]
    assert set(splits[tumour_free]) == set(SPLIT_NAMES)  # no-tumour patients reach every split
    per_patient = df.groupby("patient_id")["has_tumor"].mean()
    means = per_patient.groupby(splits).mean()
    assert means.max() - means.min() < 0.1  # similar tumour-slice share per split


def test_same_seed_same_split_other_seed_other_split(index_df):
    first = make_splits(index_df, seed=7)
    assert first.equals(make_splits(index_df, seed=7))
    others = {tuple(make_splits(index_df, seed=s)["split"]) for s in range(6)}
    assert len(others) > 1


def test_split_does_not_depend_on_row_order(index_df):
    shuffled = index_df.sample(frac=1.0, random_state=0)
    assert make_splits(shuffled, seed=1).equals(make_splits(index_df, seed=1))


def test_too_few_patients_is_a_clear_error():
    df = fake_index(n_patients=2, tumour_free=0)
    with pytest.raises(DataError, match="cannot make a stratified patient split"):
        make_splits(df)


def test_bad_fractions_are_rejected(index_df):
    with pytest.raises(ValueError, match="summing to 1"):
        make_splits(index_df, fractions=(0.5, 0.2, 0.2))


def test_save_and_load_round_trip(index_df, tmp_path):
    splits = make_splits(index_df)
    path = tmp_path / "splits.csv"
    save_splits(splits, path)
    loaded = load_splits(path).sort_values("patient_id").reset_index(drop=True)
    assert loaded.equals(splits)
    assert [p.name for p in tmp_path.iterdir()] == ["splits.csv"]  # no temp file left behind


def test_leakage_is_detected_and_named(tmp_path):
    with pytest.raises(DataError, match="TCGA_AA_0001 in test, train"):
        assert_no_leakage({"train": ["TCGA_AA_0001", "TCGA_AA_0002"], "test": ["TCGA_AA_0001"]})
    path = tmp_path / "splits.csv"
    path.write_text("patient_id,split\nTCGA_AA_0001,train\nTCGA_AA_0001,val\n")
    with pytest.raises(DataError, match="TCGA_AA_0001") as err:
        load_splits(path)
    assert str(path) in err.value.files


@pytest.mark.parametrize("text", ["patient,fold\nA,1\n", "patient_id,split\nA,holdout\n", ""])
def test_malformed_split_file_names_the_file(tmp_path, text):
    path = tmp_path / "splits.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_splits(path)
    assert str(path) in err.value.files


def test_ensure_splits_writes_once_and_reuses(index_df, tmp_path):
    path = tmp_path / "models" / "splits.csv"
    first = ensure_splits(index_df, path, seed=1)
    assert first.attrs["source"] == "created" and path.is_file()
    written = path.read_bytes()
    again = ensure_splits(index_df, path, seed=2)  # another seed does not re-split silently
    assert again.attrs["source"] == "reused"
    assert path.read_bytes() == written
    assert again.sort_values("patient_id").reset_index(drop=True).equals(first)


def test_ensure_splits_refuses_uncovered_patients_unless_forced(index_df, tmp_path):
    path = tmp_path / "splits.csv"
    ensure_splits(index_df, path)
    grown = pd.concat(
        [index_df, index_df.head(3).assign(patient_id="TCGA_ZZ_9999", case="TCGA_ZZ_9999_2020")]
    )
    with pytest.raises(DataError, match="TCGA_ZZ_9999") as err:
        ensure_splits(grown, path)
    assert "--resplit" in str(err.value)
    forced = ensure_splits(grown, path, force=True)
    assert forced.attrs["source"] == "created"
    assert "TCGA_ZZ_9999" in set(load_splits(path)["patient_id"])


def test_positions_for_split_index_the_rows(index_df):
    splits = make_splits(index_df)
    all_positions = []
    for name in SPLIT_NAMES:
        positions = positions_for_split(index_df, splits, name)
        assert positions.dtype == np.int64
        members = set(splits.loc[splits["split"] == name, "patient_id"])
        assert index_df.iloc[positions].equals(index_df[index_df["patient_id"].isin(members)])
        all_positions.extend(positions.tolist())
    assert sorted(all_positions) == list(range(len(index_df)))
    with pytest.raises(ValueError, match="valid"):
        positions_for_split(index_df, splits, "validation")
