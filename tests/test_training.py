"""`make train` on the synthetic fixture (quick preset): run directory, resume, calibration, leakage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.training.callbacks import INTERRUPT_ENV, INTERRUPT_EXIT_CODE
from tests.training_helpers import history_epochs, quick_args, run_cli

SEGMENTER_EPOCHS = 3  # configs/quick.yaml


@pytest.fixture(scope="module")
def interrupted_then_resumed(synthetic_root, tmp_path_factory):
    """A quick run killed by the test hook after segmenter epoch 1, then the same command again.

    Returns (work dir, run dir, first process, second process, what the run dir held in between).
    """
    work = tmp_path_factory.mktemp("train")
    run_dir = work / "run"
    args = quick_args(synthetic_root, work, run_dir, "--set", "training.patience=10")
    first = run_cli(args, {INTERRUPT_ENV: "segmenter/train:1"})
    between = {
        "segmenter_epochs": history_epochs(run_dir / "segmenter" / "history_train.csv")
        if (run_dir / "segmenter" / "history_train.csv").is_file()
        else None,
        "backup": (run_dir / "segmenter" / "backup_train").is_dir(),
        "pair": (run_dir / "pipeline.json").exists(),
        "classifier_done": (run_dir / "classifier" / "finetune.done.json").is_file(),
    }
    second = run_cli(args)
    return work, run_dir, first, second, between


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_finished_epoch(interrupted_then_resumed):
    _, run_dir, first, second, between = interrupted_then_resumed
    assert first.returncode == INTERRUPT_EXIT_CODE, first.stderr[-3000:]
    assert between == {"segmenter_epochs": [0], "backup": True, "pair": False, "classifier_done": True}
    assert second.returncode == 0, second.stderr[-3000:]
    # the second process continued at epoch 2 of 3: every epoch once, none repeated or lost
    assert history_epochs(run_dir / "segmenter" / "history_train.csv") == list(range(SEGMENTER_EPOCHS))
    log = (run_dir / "train.log").read_text()
    assert "resuming after epoch 1 of 3" in log
    assert "classifier/head: already done" in log and "classifier/finetune: already done" in log
    assert not (run_dir / "segmenter" / "backup_train").exists()  # cleaned up once the phase finished
    marker = json.loads((run_dir / "segmenter" / "train.done.json").read_text())
    assert marker["epochs_run"] == SEGMENTER_EPOCHS


@pytest.mark.slow
def test_run_directory_holds_everything_a_user_needs(interrupted_then_resumed):
    from pipeline.models.model_io import load_pair
    from pipeline.training.config import load_config

    work, run_dir, _, second, _ = interrupted_then_resumed
    assert second.returncode == 0, second.stderr[-3000:]
    for stage, metric in (("classifier", "val_auc"), ("segmenter", "val_dice")):
        folder = run_dir / stage
        assert (folder / "best.keras").is_file()
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        history = pd.read_csv(folder / "history.csv")
        assert metric in history.columns and len(history) > 0
        assert history["stage_epoch"].tolist() == list(range(len(history)))
    # the segmenter was selected by the configured metric, computed on every validation slice
    history = pd.read_csv(run_dir / "segmenter" / "history.csv")
    marker = json.loads((run_dir / "segmenter" / "train.done.json").read_text())
    assert marker["monitor"] == "val_patient_dice"
    assert marker["best"] == pytest.approx(history["val_patient_dice"].max())
    assert {"val_fp_px_empty", "val_tumor_slice_dice"} <= set(history.columns)
    phases = pd.read_csv(run_dir / "classifier" / "history.csv")["phase"].tolist()
    assert phases == ["head", "head", "finetune"]  # quick preset: 2 head epochs, then 1 fine-tuning epoch

    config = load_config(run_dir / "config.yaml")  # the saved config loads and says what ran
    assert config.classifier.weights == "none" and config.classifier.image_size == 32
    assert config.data.splits == str(work / "splits.csv")
    assert (run_dir / "splits.csv").read_text() == (work / "splits.csv").read_text()

    pair = load_pair(run_dir)
    assert 0.0 <= pair.threshold <= 1.0
    meta = pair.meta
    assert meta["backbone_weights"] == "none (trained from scratch)" and meta["trained_from_scratch"] is True
    assert meta["classifier_image_size"] == 32 and meta["tile_size"] == 64
    assert meta["threshold"] == meta["validation"]["threshold"]
    assert {"min_volume_px", "neighbour_weight", "min_component_px"} <= set(meta)
    assert 0.0 <= meta["validation"]["val_mean_patient_dice"] <= 1.0
    assert set(meta["durations_minutes"]) >= {"classifier_head", "classifier_finetune", "segmenter_train"}
    images = np.zeros((2, 64, 64, 3), np.float32)
    assert pair.classifier.predict_on_batch(images).shape == (2, 1)
    assert pair.segmenter.predict_on_batch(images).shape == (2, 64, 64, 1)
    from pipeline.training.runner import latest_run

    assert latest_run(work / "runs") == run_dir  # what `train --resume` and `evaluate` pick up
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pair_saved"] is True
    assert "model pair:" in second.stdout


@pytest.mark.slow
def test_trainer_used_only_train_and_val_patients(interrupted_then_resumed):
    work, run_dir, _, second, _ = interrupted_then_resumed
    assert second.returncode == 0, second.stderr[-3000:]
    splits = pd.read_csv(run_dir / "splits.csv")
    side = dict(zip(splits["patient_id"], splits["split"], strict=True))
    data = json.loads((run_dir / "pipeline.json").read_text())["data"]
    train, val = set(data["train"]["patient_ids"]), set(data["val"]["patient_ids"])
    assert train and val and not train & val
    assert {side[p] for p in train} == {"train"} and {side[p] for p in val} == {"val"}
    assert data["test_patients_held_out"] == sum(v == "test" for v in side.values()) > 0


@pytest.mark.slow
def test_the_segmenter_retrains_against_another_pairs_classifier(interrupted_then_resumed, synthetic_root):
    """`--stage segmenter --classifier-from PAIR`: a new segmenter, the other pair's classifier,
    selection by the configured metric, hard negatives placed by that pair's segmenter (whose sum
    the summary records), and a calibrated pair saved."""
    from pipeline.models.model_io import load_pair

    work, run_dir, _, second, _ = interrupted_then_resumed
    assert second.returncode == 0, second.stderr[-3000:]
    new = work / "segmenter-only"
    args = quick_args(synthetic_root, work, new, "--stage", "segmenter", "--classifier-from",
                      str(run_dir), "--set", "segmenter.monitor=val_tumor_slice_dice",
                      "--set", f"segmenter.hard_negatives.reference={run_dir}")
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = json.loads((new / "summary.json").read_text())["stages"]["segmenter"]
    reference = stage["hard_negative_reference"]
    recorded = json.loads((run_dir / "pipeline.json").read_text())["sha256"]["segmenter.keras"]
    assert reference == {"pair": str(run_dir), "segmenter_sha256": recorded}
    assert not (new / "classifier").exists()  # no classifier trained in this run
    marker = json.loads((new / "segmenter" / "train.done.json").read_text())
    history = pd.read_csv(new / "segmenter" / "history.csv")
    assert marker["monitor"] == "val_tumor_slice_dice"
    assert marker["best"] == pytest.approx(history["val_tumor_slice_dice"].max())
    original, pair = load_pair(run_dir), load_pair(new)
    for a, b in zip(original.classifier.get_weights(), pair.classifier.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "classifier: taken from" in (new / "train.log").read_text()


def test_prepare_data_positions_follow_the_patient_split(synthetic_root, tmp_path):
    from pipeline.training.config import DataConfig
    from pipeline.training.data_prep import prepare_data

    cfg = DataConfig(
        data_dir=str(synthetic_root), cache_dir=str(tmp_path / "cache"), splits=str(tmp_path / "splits.csv")
    )
    data = prepare_data(cfg)
    splits = data.splits.set_index("patient_id")["split"]
    assert set(splits[data.patients(data.train_pos)]) == {"train"}
    assert set(splits[data.patients(data.val_pos)]) == {"val"}
    test_patients = set(splits[splits == "test"].index)
    used = set(data.patient_ids[np.concatenate([data.train_pos, data.val_pos])])
    assert test_patients and not used & test_patients
    tumor = data.tumor_positions(data.train_pos)
    assert data.labels[tumor].all() and len(tumor) < len(data.train_pos)
    assert np.array_equal(
        data.arrays.masks[tumor].reshape(len(tumor), -1).any(axis=1), np.ones(len(tumor), bool)
    )


def test_calibration_picks_the_best_threshold_and_breaks_ties_towards_half():
    from pipeline.training.calibration import choose_point, volume_grid

    def search_operating_point(probs, masks, gt, patients, thresholds):
        grid = volume_grid(probs, masks, gt, patients, thresholds)
        return grid, choose_point(grid)

    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0, :2, :2] = 1  # patient A: one tumour slice (4 px) and one empty slice
    pred = np.zeros_like(gt)
    pred[0, :2, :2] = 1
    pred[1, 0, 0] = 1  # a false-positive pixel on A's empty slice
    pred[3, :, :] = 1  # patient B (no tumour): the segmenter paints a whole slice
    probs = np.array([0.9, 0.35, 0.2, 0.6])
    patients = np.array(["A", "A", "B", "B"])
    grid, best = search_operating_point(probs, {(0.5, 0): pred}, gt, patients,
                                        thresholds=(0.1, 0.3, 0.5, 0.7, 0.95))
    # t=0.7: A perfect (Dice 1) and B empty/empty (1) -> mean 1.0; only 0.7 achieves it
    assert best["threshold"] == 0.7 and best["mean_patient_dice"] == 1.0
    by_t = grid.dropna().set_index("threshold")["mean_patient_dice"]
    assert by_t[0.3] == pytest.approx((8 / 9 + 0.0) / 2)  # A: 2*4/(2*4+1) with the FP pixel; B: 16 FP px -> 0
    assert by_t[0.5] == pytest.approx(0.5)  # A's FP slice gated out -> 1; B still segmented -> 0
    assert by_t[0.95] == pytest.approx(0.5)  # A gated out entirely -> 0; B -> 1
    seg_only = grid[grid["threshold"].isna()]["mean_patient_dice"].iloc[0]
    assert seg_only == pytest.approx(by_t[0.1])

    # equal scores everywhere: the threshold closest to 0.5 wins
    _, tie = search_operating_point(
        np.array([0.9, 0.9]), {(0.5, 0): gt[:2]}, gt[:2], np.array(["A", "A"]),
        thresholds=(0.2, 0.45, 0.6, 0.8)
    )
    assert tie["threshold"] == 0.45


def test_time_budget_stops_training_and_interrupt_hook_reads_env(monkeypatch, tmp_path):
    import keras

    from pipeline.training import callbacks as cb

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    budget = cb.TimeBudget(minutes=0.0, label="test")
    history = model.fit(
        np.zeros((8, 2)), np.zeros((8, 1)), epochs=5, batch_size=4, verbose=0, callbacks=[budget]
    )
    assert budget.stopped and len(history.history["loss"]) == 1

    monkeypatch.setenv(INTERRUPT_ENV, "segmenter/train:2")
    hook = cb.interrupt_from_env("segmenter/train")
    assert isinstance(hook, cb.InterruptAfterEpoch) and hook.after == 2
    assert cb.interrupt_from_env("classifier/head") is None
    monkeypatch.setenv(INTERRUPT_ENV, "segmenter/train:x")
    with pytest.raises(ValueError, match=INTERRUPT_ENV):
        cb.interrupt_from_env("segmenter/train")


def test_history_is_trimmed_to_the_epochs_the_backup_holds(tmp_path):
    from pipeline.training import callbacks as cb

    path = tmp_path / "history_train.csv"
    path.write_text("epoch,loss,val_dice\n0,1.0,0.2\n1,0.8,0.5\n2,0.7,0.4\n")
    cb.trim_history(path, keep_epochs=2)
    assert history_epochs(path) == [0, 1]
    assert cb.best_in_history(path, "val_dice") == 0.5
    rows = cb.merge_histories([("a", path), ("b", path)], tmp_path / "merged.csv")
    assert [r["phase"] for r in rows] == ["a", "a", "b", "b"]
    cb.plot_curves(rows, "dice", tmp_path / "curves.png", "t")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert cb.best_in_history(tmp_path / "missing.csv", "x") is None  # nothing recorded, not 0.0


def test_strategy_choice_and_chief_detection(monkeypatch):
    import tensorflow as tf

    from pipeline.training.distribute import get_strategy, is_chief

    assert get_strategy("default") is tf.distribute.get_strategy()
    if not tf.config.list_logical_devices("GPU"):
        assert get_strategy("auto") is tf.distribute.get_strategy()  # one code path: default on CPU
    assert get_strategy("mirrored").num_replicas_in_sync >= 1
    with pytest.raises(ValueError, match="valid: auto, default, mirrored, multi_worker"):
        get_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief()
    cluster = {"worker": ["a:1", "b:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert is_chief()


def test_recalibrate_pair_rewrites_only_the_operating_point(tiny_pair, synthetic_root, tmp_path):
    """`recalibrate_pair` (`python -m pipeline calibrate`) re-chooses the point on the validation
    patients and rewrites pipeline.json; the model files and their sums stay as they were."""
    import json

    from pipeline.models.pair_artifact import read_pair_meta
    from pipeline.postprocessing import OperatingPoint
    from pipeline.training.calibration import recalibrate_pair
    from pipeline.training.config import QUICK_PRESET, load_config
    from tests.model_helpers import copy_pair

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    before = read_pair_meta(pair)
    config = load_config(presets=[QUICK_PRESET], overrides=[
        f"data.data_dir={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.splits={tmp_path / 'splits.csv'}", "calibration.mask_threshold=[0.4, 0.5]"])
    result = recalibrate_pair(pair, config, batch_size=8)
    after = read_pair_meta(pair)
    assert after.point == result.params and isinstance(after.point, OperatingPoint)
    assert after.point.threshold in config.calibration.thresholds
    assert set(result.grid["seg_threshold"]) == {0.4, 0.5} and after.point.seg_threshold in (0.4, 0.5)
    assert after.sha256 == before.sha256 and after.tile_size == before.tile_size
    assert after.extra["validation"]["val_mean_patient_dice"] == result.val_patient_dice
    assert (pair / "calibration_grid.csv").is_file()
    assert json.loads((pair / "pipeline.json").read_text())["calibration"]["thresholds"] == list(
        config.calibration.thresholds)


def test_set_operating_point_writes_a_fixed_point_and_refuses_a_tampered_pair(tiny_pair, tmp_path, capsys):
    """`calibrate --set calibration.fixed=...`: the point is written as given, marked fixed, the
    model sums kept and the pair still verifies; a pair whose files changed is not re-signed."""
    from pipeline.errors import DataError
    from pipeline.models.pair_artifact import read_pair_meta
    from pipeline.postprocessing import OperatingPoint
    from pipeline.training.calibration import set_operating_point
    from tests.model_helpers import copy_pair

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    before = read_pair_meta(pair)
    point = OperatingPoint(threshold=0.25, seg_threshold=0.4, min_component_px=30, min_volume_px=800)
    set_operating_point(pair, point)
    after = read_pair_meta(pair)
    assert after.point == point and after.extra["validation"]["fixed"] is True
    assert "val_mean_patient_dice" not in after.extra["validation"]  # the old search's numbers go
    assert after.extra["calibration"] == {"fixed": point.to_json()} and after.sha256 == before.sha256
    from pipeline.cli import main

    fixed = "calibration.fixed={threshold: 0.3, seg_threshold: 0.35, min_component_px: 10, min_volume_px: 50}"
    assert main(["calibrate", "--models", str(pair), "--set", fixed]) == 0
    assert "seg_threshold=0.35" in capsys.readouterr().out
    assert read_pair_meta(pair).point == OperatingPoint(0.3, 0.35, 10, 50)
    with open(pair / "segmenter.keras", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError):
        set_operating_point(pair, point)
    assert main(["calibrate", "--models", str(pair), "--set", fixed.replace("0.35", "0.45")]) == 2
    assert read_pair_meta(pair, allow_unverified=True).point == OperatingPoint(0.3, 0.35, 10, 50)


def test_calibration_searches_the_mask_threshold_when_given_several():
    """An averaged (ensemble) probability map that sits at 0.4 on half the tumour: a 0.35 mask
    threshold finds it all, 0.5 only half; the grid records each threshold and the chosen one wins."""
    from pipeline.training.calibration import calibrate_from_predictions

    gt = np.zeros((2, 8, 8), np.uint8)
    gt[0, 2:6, 2:6] = 1
    prob = np.zeros((2, 8, 8))
    prob[0, 2:6, 2:4], prob[0, 2:6, 4:6] = 0.9, 0.4
    masks = {(t, 0): (prob > t).astype(np.uint8) for t in (0.35, 0.5)}
    result = calibrate_from_predictions(np.array([0.9, 0.1]), masks, gt, np.array(["A", "A"]),
                                        thresholds=(0.5,))
    assert result.params.seg_threshold == 0.35 and result.val_patient_dice == 1.0
    at = result.grid[result.grid["threshold"].notna()].set_index("seg_threshold")["mean_patient_dice"]
    assert at[0.5] == pytest.approx(2 * 8 / (8 + 16))


def test_mask_threshold_ties_go_to_half_and_the_gate_decides_first():
    from pipeline.training.calibration import calibrate_from_predictions, choose_point, volume_grid

    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2, :2] = 1
    masks = {(t, 0): gt.copy() for t in (0.4, 0.5, 0.6)}  # every mask threshold gives the same masks
    result = calibrate_from_predictions(np.array([0.9, 0.1]), masks, gt, np.array(["A", "A"]),
                                        thresholds=(0.5,))
    assert result.params.seg_threshold == 0.5
    grid = volume_grid(np.array([0.9, 0.1]), {(0.4, 0): gt, (0.5, 0): gt}, gt, np.array(["A", "A"]),
                       thresholds=(0.3, 0.45))
    assert tuple(choose_point(grid)[["threshold", "seg_threshold"]]) == (0.45, 0.5)


@pytest.mark.parametrize("value", ["[]", "[0.5, 1.5]", "0.0", "-2"])
def test_a_mask_threshold_outside_0_1_is_a_config_error(value):
    from pipeline.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="calibration.mask_threshold"):
        load_config(overrides=[f"calibration.mask_threshold={value}"])
