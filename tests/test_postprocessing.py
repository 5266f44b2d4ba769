"""Post-processing: the gate rule, the volume-aware gate, 2D and 3D components, predict_volume."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.predictions import run_pipeline, run_segmenter
from pipeline.postprocessing import (
    OperatingPoint,
    clean_volume,
    gate,
    neighbour_probabilities,
    remove_small_volumes,
    volume_gate,
    volume_spans,
)
from pipeline.training.calibration import calibrate_from_predictions, volume_grid
from tests.inference_helpers import StubClassifier, StubSegmenter, expected_mask
from tests.synthetic import make_slice


def _volume() -> np.ndarray:
    """5 slices of 16x16: a 3x3 blob on slice 1 only (9 voxels) and a 2x2 blob on slices 2-4 (12)."""
    vol = np.zeros((5, 16, 16), np.uint8)
    vol[1, 1:4, 1:4] = 1
    vol[2:5, 10:12, 10:12] = 1
    return vol


def test_a_component_in_one_slice_is_dropped_where_one_spanning_three_slices_survives():
    vol = _volume()
    kept = remove_small_volumes(vol, min_volume_px=10)
    assert kept[1].sum() == 0  # 9 voxels on a single slice: below 10
    assert kept[2:5, 10:12, 10:12].all() and kept.sum() == 12  # 4 px per slice over 3 slices: 12
    assert remove_small_volumes(vol, 13).sum() == 0
    np.testing.assert_array_equal(remove_small_volumes(vol, 0), vol)


def test_diagonal_neighbours_in_the_next_slice_belong_to_one_component():
    vol = np.zeros((2, 4, 4), np.uint8)
    vol[0, 0, 0] = vol[1, 1, 1] = 1  # 26-connected across the slice gap
    assert remove_small_volumes(vol, 2).sum() == 2


def test_two_patients_are_never_merged():
    # the same blob at the end of patient A and the start of patient B: adjacent rows, different studies
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[1, 2:5, 2:5] = masks[2, 2:5, 2:5] = 1  # 9 px in A's last slice, 9 in B's first
    gt = masks.copy()
    ids = np.array(["A", "A", "B", "B"])
    grid = volume_grid(np.ones(4), {(0.5, 0): masks}, gt, ids, thresholds=(0.5,), min_volume_px=(0, 10, 18))
    gated = grid[grid["threshold"].notna()].set_index("min_volume_px")["mean_patient_dice"]
    assert gated[0] == 1.0 and gated[10] == 0.0  # each patient's part is 9 voxels: dropped at 10
    assert gated[18] == 0.0  # merged across the boundary it would have been 18 voxels and kept
    assert [r.start for r in volume_spans(ids)] == [0, 2]
    with pytest.raises(ValueError, match="contiguous"):
        volume_spans(np.array(["A", "B", "A"]))


def test_gate_flags_at_or_above_the_threshold():
    assert gate(np.array([0.44, 0.45, 0.46]), 0.45).tolist() == [False, True, True]


def test_the_volume_aware_gate_lowers_the_bar_next_to_a_confident_slice():
    p = np.array([0.1, 0.3, 0.95, 0.2, 0.05])
    np.testing.assert_allclose(neighbour_probabilities(p, 0.0), p)
    np.testing.assert_allclose(neighbour_probabilities(p, 0.5), [0.15, 0.475, 0.95, 0.475, 0.1])
    params = OperatingPoint(threshold=0.45, neighbour_weight=0.5)
    masks = np.ones((5, 2, 2), np.uint8)
    scores, flagged = volume_gate(p, params)
    out = clean_volume(masks, flagged, params)
    assert flagged.tolist() == [False, True, True, True, False]
    assert out.sum(axis=(1, 2)).tolist() == [0, 4, 4, 4, 0]


@pytest.mark.parametrize("bad", [{"threshold": 2.0}, {"threshold": float("nan")}, {"min_volume_px": -1},
                                 {"neighbour_weight": 1.5}])
def test_params_reject_values_out_of_range(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        OperatingPoint(**bad)


def test_calibration_picks_the_3d_filter_that_removes_isolated_false_positives():
    gt = np.zeros((6, 16, 16), np.uint8)
    gt[1:4, 4:8, 4:8] = 1  # a tumour over three slices (48 voxels)
    pred = gt.copy()
    pred[5, 12:14, 12:14] = 1  # a 4-voxel speck on a normal slice
    probs = np.array([0.1, 0.9, 0.9, 0.9, 0.1, 0.9])
    result = calibrate_from_predictions(probs, {(0.5, 0): pred}, gt, np.array(["A"] * 6), thresholds=(0.5,),
                                        min_volume_px=(0, 10))
    assert result.params.min_volume_px == 10 and result.val_patient_dice == 1.0


def test_predict_volume_segments_only_flagged_slices_and_drops_small_volumes():
    rng = np.random.default_rng(0)
    images = [make_slice(rng, 64, tumor=i >= 2)[0] for i in range(5)]
    from pipeline.inference.tumor_pipeline import TumorPipeline

    seg = StubSegmenter()
    pipe = TumorPipeline(StubClassifier(), seg, threshold=0.6, tile_size=64, min_volume_px=1)
    results = pipe.predict_volume(images)
    assert [r.is_tumor for r in results] == [False, False, True, True, True]
    assert seg.n_seen == 3  # only the flagged slices reached the segmenter
    for image, r in zip(images[2:], results[2:], strict=True):
        np.testing.assert_array_equal(r.mask, expected_mask(image))
    # the evaluation's volume route gives the pipeline's own answers
    stack = np.stack(images)
    probs, flagged, masks = run_pipeline(pipe, stack, volume_ids=np.array(["P"] * 5), progress=False)
    assert flagged.tolist() == [False, False, True, True, True]
    big = run_segmenter(pipe.segment_only, stack, volume_ids=np.array(["P"] * 5), min_volume_px=10**6,
                        progress=False)
    assert big.sum() == 0  # every 3D component is below a million voxels
