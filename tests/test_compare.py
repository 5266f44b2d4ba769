"""`evaluation/compare.py`: the paired comparison of two evaluation folders, on hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.evaluation.compare import compare_evaluations, render_comparison

SLICE_COLUMNS = ("patient_id", "has_tumor", "e2e_pred_pixels", "e2e_fp", "e2e_fn",
                 "seg_pred_pixels", "seg_fp", "seg_fn")


def _folder(path, dice: dict[str, tuple[float, float]], slices: list[tuple]) -> str:
    """An evaluation folder: patients.csv ({patient: (e2e_dice, seg_dice)}) and slices.csv rows."""
    path.mkdir()
    pd.DataFrame([{"patient_id": p, "e2e_dice": e, "seg_dice": s} for p, (e, s) in dice.items()]).to_csv(
        path / "patients.csv", index=False)
    pd.DataFrame(slices, columns=SLICE_COLUMNS).to_csv(path / "slices.csv", index=False)
    return str(path)


@pytest.fixture
def folders(tmp_path):
    dice_a = {"P1": (0.5, 0.4), "P2": (0.8, 0.8), "P3": (1.0, 0.2), "ONLY_A": (0.0, 0.0)}
    a = _folder(tmp_path / "a", dice_a, [
        ("P1", True, 100, 10, 20, 120, 30, 5),   # tumour slice, predicted
        ("P1", False, 7, 7, 0, 9, 9, 0),         # empty slice, false positive (7 px)
        ("P2", True, 0, 0, 50, 40, 0, 10),       # tumour slice missed end to end
        ("P3", False, 0, 0, 0, 3, 3, 0),         # empty slice: clean end to end, 3 FP px alone
        ("ONLY_A", True, 0, 0, 9, 0, 0, 9),      # not in b: left out
    ])
    b = _folder(tmp_path / "b", {"P1": (0.7, 0.4), "P2": (0.6, 0.8), "P3": (1.0, 0.2005)}, [
        ("P1", True, 110, 5, 10, 120, 30, 5),
        ("P1", False, 0, 0, 0, 9, 9, 0),
        ("P2", True, 30, 0, 20, 40, 0, 10),
        ("P3", False, 2, 2, 0, 3, 3, 0),
    ])
    return a, b


def test_the_paired_differences_and_their_counts(folders):
    a, b = folders
    result = compare_evaluations(a, b, n_boot=200, seed=0)
    assert result["n_patients"] == 3  # ONLY_A is not common
    e2e = result["scores"]["e2e_dice"]
    assert e2e["per_patient"] == {"P1": 0.2, "P2": -0.2, "P3": 0.0}
    assert (e2e["better"], e2e["worse"], e2e["equal"]) == (1, 1, 1)
    assert e2e["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert e2e["baseline"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert e2e["ci_low"] <= e2e["mean_diff"] <= e2e["ci_high"]
    seg = result["scores"]["seg_dice"]
    assert (seg["better"], seg["worse"], seg["equal"]) == (0, 0, 3)  # |0.0005| is within 1e-3: equal


def test_error_counts_split_false_positives_by_slice_kind(folders):
    a, b = folders
    counts = compare_evaluations(a, b, n_boot=50)["counts"]
    assert counts["e2e"]["baseline"] == {"fp_px_on_empty_slices": 7, "fp_px_on_tumour_slices": 10,
                                         "fn_px": 70, "false_positive_slices": 1, "missed_tumour_slices": 1}
    assert counts["e2e"]["candidate"] == {"fp_px_on_empty_slices": 2, "fp_px_on_tumour_slices": 5,
                                          "fn_px": 30, "false_positive_slices": 1, "missed_tumour_slices": 0}
    assert counts["seg"]["baseline"] == counts["seg"]["candidate"]


def test_the_markdown_lists_every_score_and_count(folders):
    a, b = folders
    text = render_comparison(compare_evaluations(a, b, n_boot=50))
    assert "Paired comparison on 3 patients" in text
    e2e = next(line for line in text.splitlines() if line.startswith("| end to end"))
    assert e2e.startswith("| end to end, mean per-patient Dice | 0.767 | 0.767 |")
    assert e2e.endswith("| 1 / 1 / 1 |")
    assert "| fp px on empty slices | 7 | 2 | 12 | 12 |" in text
    assert text.endswith("\n")


def test_folders_without_a_common_patient_are_refused(tmp_path):
    a = _folder(tmp_path / "a", {"P1": (0.5, 0.5)}, [])
    b = _folder(tmp_path / "b", {"P2": (0.5, 0.5)}, [])
    with pytest.raises(ValueError, match="share no patient"):
        compare_evaluations(a, b)
