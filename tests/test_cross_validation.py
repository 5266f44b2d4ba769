"""Cross-validation: folds by patient (never a test patient), fold training, pooled out-of-fold results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data.index import index_dataset
from pipeline.data.splits import all_folds_split, assert_no_leakage, fold_split, make_folds, make_splits
from pipeline.errors import DataError
from pipeline.evaluation.cross_validation import epoch_curve, pool_folds, summarize_pooled
from tests.training_helpers import quick_args, run_cli


def _index(n_patients: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        n, k = int(rng.integers(10, 30)), int(rng.integers(0, 10)) if p % 5 else 0
        rows += [{"patient_id": f"P{p:02d}", "has_tumor": i < k} for i in range(n)]
    return pd.DataFrame(rows)


def test_folds_partition_the_train_and_validation_patients_and_never_hold_a_test_patient():
    index = _index()
    splits = make_splits(index, seed=1)
    folds = make_folds(index, splits, folds=4, seed=7)
    pool = set(splits.loc[splits["split"] != "test", "patient_id"])
    test = set(splits.loc[splits["split"] == "test", "patient_id"])
    assert set(folds["patient_id"]) == pool and not folds["patient_id"].duplicated().any()
    assert not set(folds["patient_id"]) & test
    sizes = folds["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3] and sizes.max() - sizes.min() <= 1
    pd.testing.assert_frame_equal(folds, make_folds(index, splits, folds=4, seed=7))  # reproducible
    tumour = index.groupby("patient_id")["has_tumor"].sum()
    assert all(tumour[folds.loc[folds["fold"] == k, "patient_id"]].sum() > 0 for k in range(4))


def test_a_fold_split_validates_on_its_fold_trains_on_the_rest_and_keeps_the_test_patients():
    index = _index()
    splits = make_splits(index, seed=1)
    folds = make_folds(index, splits, folds=3)
    seen_val: set[str] = set()
    for k in range(3):
        split = fold_split(splits, folds, k)
        assert_no_leakage(split)
        val = set(split.loc[split["split"] == "val", "patient_id"])
        assert val == set(folds.loc[folds["fold"] == k, "patient_id"])
        assert set(split.loc[split["split"] == "test", "patient_id"]) == set(
            splits.loc[splits["split"] == "test", "patient_id"])
        assert not val & seen_val
        seen_val |= val
    assert seen_val == set(folds["patient_id"])
    with pytest.raises(ValueError, match="fold 5"):
        fold_split(splits, folds, 5)


def test_too_few_tumour_patients_for_the_folds_is_a_clear_error():
    index = pd.DataFrame({"patient_id": ["A", "A", "B", "C"], "has_tumor": [True, False, False, False]})
    splits = pd.DataFrame({"patient_id": ["A", "B", "C"], "split": ["train", "val", "train"]})
    with pytest.raises(DataError, match="no tumour slice"):
        make_folds(index, splits, folds=2)


@pytest.mark.slow
def test_train_fold_writes_the_fold_split_into_the_run_and_saves_a_pair(synthetic_root, tiny_pair, tmp_path):
    run = tmp_path / "cv" / "fold1"  # the segmenter alone, as the cross-validation presets train it
    result = run_cli(quick_args(synthetic_root, tmp_path, run, "--folds", "2", "--fold", "1",
                                "--stage", "segmenter", "--classifier-from", str(tiny_pair)))
    assert result.returncode == 0, result.stderr[-3000:]
    base = pd.read_csv(tmp_path / "splits.csv")
    fold = pd.read_csv(run / "splits.csv")
    index = index_dataset(synthetic_root, cache_dir=tmp_path / "cache")
    expected = fold_split(base, make_folds(index, base, folds=2, seed=42), 1)
    assert fold.sort_values("patient_id").to_dict("records") == expected.to_dict("records")
    assert (run / "segmenter.keras").is_file() and (run / "pipeline.json").is_file()
    meta = json.loads((run / "pipeline.json").read_text())
    assert meta["config"]["data"]["fold"] == 1
    assert meta["data"]["val"]["patient_ids"] == sorted(fold.loc[fold["split"] == "val", "patient_id"])


# ------------------------------------------------------------------ pooling


def _fake_fold(variant: Path, k: int, patients: list[str], dice: list[float], epochs: list[float],
               found: list[bool]) -> None:
    fold = variant / f"fold{k}"
    ev = fold / "evaluation" / "val"
    ev.mkdir(parents=True)
    rows, slices = [], []
    for pid, d, f in zip(patients, dice, found, strict=True):
        tp = 50 if f else 0
        rows.append({"patient_id": pid, "gt_pixels": 100, "e2e_dice": d, "seg_dice": d, "e2e_tp": tp,
                     "seg_tp": tp})
        for prefix_vals in ((True, tp, 10, 100 - tp), (False, 0, 5, 0)):
            has, t, fp, fn = prefix_vals
            slices.append({"patient_id": pid, "has_tumor": has, **{f"{p}_{c}": v for p in ("e2e", "seg")
                           for c, v in (("tp", t), ("fp", fp), ("fn", fn), ("pred_pixels", t + fp))}})
    pd.DataFrame(rows).to_csv(ev / "patients.csv", index=False)
    pd.DataFrame(slices).to_csv(ev / "slices.csv", index=False)
    (fold / "segmenter").mkdir()
    pd.DataFrame({"epoch": range(len(epochs)), "val_patient_dice": epochs}).to_csv(
        fold / "segmenter" / "history.csv", index=False)
    pd.DataFrame({"patient_id": patients, "split": "val"}).to_csv(fold / "splits.csv", index=False)


def test_pooled_out_of_fold_results_concatenate_folds_and_weight_the_epoch_curve_by_patients(tmp_path):
    variant = tmp_path / "variant"
    _fake_fold(variant, 0, ["A", "B", "C"], [0.9, 0.8, 0.0], [0.5, 0.7, 0.6], [True, True, False])
    _fake_fold(variant, 1, ["D"], [0.5], [0.1, 0.9], [True])
    pooled = pool_folds(variant)
    patients = pd.read_csv(pooled / "patients.csv")
    assert sorted(patients["patient_id"]) == ["A", "B", "C", "D"] and list(patients["fold"]) == [0, 0, 0, 1]
    summary = summarize_pooled(pooled, n_boot=200)
    assert summary["n_patients"] == 4 and summary["n_folds"] == 2
    assert summary["e2e"]["mean_patient_dice"] == pytest.approx(0.55)
    assert summary["e2e"]["patients_not_found"] == 1
    assert summary["seg"]["fp_px_on_empty_slices"] == 4 * 5 and summary["seg"]["fn_px"] == 50 + 50 + 100 + 50
    assert summary["e2e"]["ci_low"] <= 0.55 <= summary["e2e"]["ci_high"]
    curve = epoch_curve(variant)
    assert curve["pooled"].iloc[0] == pytest.approx((3 * 0.5 + 1 * 0.1) / 4)
    assert curve["pooled"].iloc[1] == pytest.approx((3 * 0.7 + 1 * 0.9) / 4)
    assert np.isnan(curve["pooled"].iloc[2])  # fold 1 stopped after 2 epochs
    (variant / "fold1" / "segmenter" / "history.csv").unlink()  # e.g. an ensemble of trained runs
    assert epoch_curve(variant).empty


def test_a_patient_in_two_folds_or_a_fold_without_evaluation_is_refused(tmp_path):
    variant = tmp_path / "variant"
    _fake_fold(variant, 0, ["A", "B"], [0.9, 0.8], [0.5], [True, True])
    _fake_fold(variant, 1, ["B"], [0.5], [0.1], [True])
    with pytest.raises(DataError, match="more than one fold: B"):
        pool_folds(variant)
    (variant / "fold2").mkdir()
    with pytest.raises(DataError, match="not evaluated"):
        pool_folds(variant)


def test_cv_command_pairs_each_variant_against_the_baseline(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for variant, dice in ((a, [0.5, 0.6, 0.7]), (b, [0.6, 0.7, 0.7])):
        _fake_fold(variant, 0, ["A", "B"], dice[:2], [0.5], [True, True])
        _fake_fold(variant, 1, ["C"], dice[2:], [0.4], [True])
    out = tmp_path / "cv.json"
    assert main(["cv", str(b), str(a), "--json", str(out), "--n-boot", "100"]) == 0
    text = capsys.readouterr().out
    assert "3 patients in 2 folds" in text and "Paired comparison on 3 patients" in text
    result = json.loads(out.read_text())
    paired = result["paired"][str(b)]["scores"]["e2e_dice"]
    assert paired["mean_diff"] == pytest.approx(0.2 / 3) and (paired["better"], paired["equal"]) == (2, 1)
    assert main(["cv", str(tmp_path / "missing")]) == 2


def test_the_pooled_calibration_grid_weights_each_fold_by_its_patients(tmp_path):
    from pipeline.evaluation.cross_validation import pooled_grid
    from pipeline.training.calibration import choose_point

    variant = tmp_path / "variant"
    _fake_fold(variant, 0, ["A", "B", "C"], [0.9, 0.8, 0.7], [0.5], [True] * 3)
    _fake_fold(variant, 1, ["D"], [0.5], [0.5], [True])
    point = {"neighbour_weight": 0.0, "min_component_px": 0, "fp_px": 10.0, "fn_px": 5.0, "flagged_slices": 2}
    grids = {0: [(np.nan, 0, 0.60), (0.3, 0, 0.80), (0.5, 0, 0.70), (0.5, 100, 0.75)],
             1: [(np.nan, 0, 0.40), (0.3, 0, 0.20), (0.5, 0, 0.90), (0.7, 0, 0.99)]}  # (0.7) only in fold 1
    for k, rows in grids.items():
        table = [{**point, "threshold": t, "min_volume_px": v, "mean_patient_dice": d} for t, v, d in rows]
        pd.DataFrame(table).to_csv(variant / f"fold{k}" / "calibration_grid.csv", index=False)
    pooled = pooled_grid(variant)
    assert len(pooled) == 3 and set(pooled["n_patients"]) == {4}  # the two shared points and segmenter alone
    at = pooled.set_index(pooled["threshold"].fillna(-1))["mean_patient_dice"]
    assert at[0.3] == pytest.approx((3 * 0.8 + 0.2) / 4) and at[0.5] == pytest.approx((3 * 0.7 + 0.9) / 4)
    assert at[-1] == pytest.approx((3 * 0.6 + 0.4) / 4)
    assert pooled["fp_px"].iloc[0] == 20.0
    assert choose_point(pooled)["threshold"] == 0.5  # 0.75 beats 0.65; fold 1's lone 0.99 does not count
    assert set(pooled["seg_threshold"]) == {0.5}  # grids from before the mask threshold was searched


def test_the_pooled_grid_keeps_each_mask_threshold_apart(tmp_path):
    from pipeline.evaluation.cross_validation import pooled_grid
    from pipeline.training.calibration import choose_point

    variant = tmp_path / "variant"
    _fake_fold(variant, 0, ["A", "B"], [0.9, 0.8], [0.5], [True] * 2)
    _fake_fold(variant, 1, ["C"], [0.5], [0.5], [True])
    point = {"threshold": 0.25, "neighbour_weight": 0.0, "min_component_px": 30, "min_volume_px": 800,
             "fp_px": 1.0, "fn_px": 1.0, "flagged_slices": 1}
    for k, dice in ((0, {0.4: 0.80, 0.5: 0.70}), (1, {0.4: 0.50, 0.5: 0.95})):
        rows = [{**point, "seg_threshold": t, "mean_patient_dice": d} for t, d in dice.items()]
        pd.DataFrame(rows).to_csv(variant / f"fold{k}" / "calibration_grid.csv", index=False)
    pooled = pooled_grid(variant).set_index("seg_threshold")["mean_patient_dice"]
    assert pooled[0.4] == pytest.approx((2 * 0.8 + 0.5) / 3)
    assert pooled[0.5] == pytest.approx((2 * 0.7 + 0.95) / 3)
    assert choose_point(pooled_grid(variant))["seg_threshold"] == 0.5


def test_cv_apply_point_writes_the_pooled_best_into_every_fold_pair(tiny_pair, tmp_path, capsys):
    from pipeline.models.pair_artifact import read_pair_meta
    from tests.model_helpers import copy_pair

    variant = tmp_path / "ensemble"
    for k in (0, 1):
        copy_pair(tiny_pair, variant / f"fold{k}")
    _fake_fold(variant, 0, ["A", "B", "C"], [0.9, 0.8, 0.7], [0.5], [True] * 3)
    _fake_fold(variant, 1, ["D"], [0.5], [0.5], [True])
    point = {"threshold": 0.25, "neighbour_weight": 0.0, "min_volume_px": 800,
             "fp_px": 1.0, "fn_px": 1.0, "flagged_slices": 1}
    # fold 1 alone would pick 0.2 / 10 px; pooled over 4 patients 0.5 / 30 px wins (0.75 > 0.7125)
    for k, dice in ((0, {(0.2, 10): 0.70, (0.5, 30): 0.80}), (1, {(0.2, 10): 0.75, (0.5, 30): 0.60})):
        rows = [{**point, "seg_threshold": t, "min_component_px": c, "mean_patient_dice": d}
                for (t, c), d in dice.items()]
        pd.DataFrame(rows).to_csv(variant / f"fold{k}" / "calibration_grid.csv", index=False)
    assert main(["cv", str(variant), "--apply-point"]) == 0
    assert "written into 2 fold pairs" in capsys.readouterr().out
    for k in (0, 1):
        p = read_pair_meta(variant / f"fold{k}").point
        assert (p.threshold, p.seg_threshold, p.min_component_px, p.min_volume_px) == (0.25, 0.5, 30, 800)
    (variant / "fold1" / "classifier.keras").write_bytes(b"tampered")
    assert main(["cv", str(variant), "--apply-point"]) == 2  # never re-signs a tampered pair
    assert "classifier.keras" in capsys.readouterr().err


FIXED_POINT = ("calibration.fixed={threshold: 0.3, seg_threshold: 0.5, min_component_px: 10, "
               "min_volume_px: 50}")


def test_fold_all_needs_a_fixed_operating_point_and_a_valid_one():
    from pipeline.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="calibration.fixed"):
        load_config(overrides=["data.fold=all"])
    with pytest.raises(ConfigError, match="threshold"):
        load_config(overrides=["data.fold=all", "calibration.fixed={threshold: 1.5, seg_threshold: 0.5, "
                               "min_component_px: 0}"])
    with pytest.raises(ConfigError, match="fold"):
        load_config(overrides=["data.fold=every"])
    assert load_config(overrides=["data.fold=all", FIXED_POINT]).data.fold == "all"


def test_all_folds_split_trains_every_train_and_validation_patient_and_keeps_the_test_patients():
    splits = make_splits(_index(), fractions=(0.6, 0.2, 0.2), seed=1)
    final = all_folds_split(splits)
    assert set(final["split"]) == {"train", "test"}
    for side in ("test",):
        assert set(final.loc[final["split"] == side, "patient_id"]) == set(
            splits.loc[splits["split"] == side, "patient_id"])
    assert set(final.loc[final["split"] == "train", "patient_id"]) == set(
        splits.loc[splits["split"].isin(("train", "val")), "patient_id"])


@pytest.mark.slow
def test_train_fold_all_trains_on_every_fold_keeps_the_last_epoch_and_the_fixed_point(
        synthetic_root, tiny_pair, tmp_path):
    run = tmp_path / "final"
    args = quick_args(synthetic_root, tmp_path, run, "--stage", "segmenter", "--fold", "all",
                      "--classifier-from", str(tiny_pair), "--set", FIXED_POINT)
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    final = pd.read_csv(run / "splits.csv")
    assert "val" not in set(final["split"])
    meta = json.loads((run / "pipeline.json").read_text())
    assert (meta["threshold"], meta["min_component_px"], meta["min_volume_px"]) == (0.3, 10, 50)
    assert meta["validation"]["fixed"] is True and meta["validation"]["val_patients"] == 0
    history = pd.read_csv(run / "segmenter" / "history.csv")
    assert len(history) == 3  # the quick preset's epochs, none stopped early
    assert history.filter(like="val_").isna().all().all()  # nothing validated (Keras writes NA columns)


def test_fold_all_refuses_to_train_the_classifier(tmp_path):
    from pipeline.training.config import ConfigError, load_config
    from pipeline.training.runner import train_run

    config = load_config(overrides=["data.fold=all", FIXED_POINT])
    with pytest.raises(ConfigError, match="--stage segmenter"):
        train_run(config, tmp_path / "run", stage="all")
    assert not (tmp_path / "run").exists()
