"""INT8 copies of a pair's models: which shipped files apply (`pair_artifact.int8_irs`), and the
offline workflow's pure parts (`pipeline.quantization.int8`: calibration slices, the record, the
keep/reject decision, reading the numbers from `evaluate()`), none of which needs NNCF or OpenVINO."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.models.agreement import MASK_AGREEMENT, MASK_DICE, PROBABILITY_TOL
from pipeline.quantization import int8 as q


def _int8_pair(tmp_path, source_sha="a" * 64):
    from pipeline.io_utils import sha256_of

    (tmp_path / "openvino").mkdir()
    for ext in ("xml", "bin"):
        (tmp_path / "openvino" / f"segmenter.int8.{ext}").write_bytes(f"fake {ext}".encode())
    sums = {f"openvino/segmenter.int8.{ext}": sha256_of(tmp_path / "openvino" / f"segmenter.int8.{ext}")
            for ext in ("xml", "bin")}
    entry = {"xml": "openvino/segmenter.int8.xml", "bin": "openvino/segmenter.int8.bin",
             "source_sha256": source_sha}
    meta = {"sha256": sums, "openvino_int8": {"segmenter": entry}}
    return meta


def test_a_pairs_int8_ir_is_used_only_while_it_belongs_to_the_model_file(tmp_path, caplog):
    from pipeline.models.pair_artifact import int8_irs

    meta = _int8_pair(tmp_path)
    assert int8_irs(tmp_path, meta, {"segmenter": "a" * 64}) == {
        "segmenter": tmp_path / "openvino" / "segmenter.int8.xml"}
    with caplog.at_level(logging.WARNING):
        assert int8_irs(tmp_path, meta, {"segmenter": "b" * 64}) == {}  # the model was retrained
    assert "another model file" in caplog.text
    (tmp_path / "openvino" / "segmenter.int8.bin").write_bytes(b"changed")
    with pytest.raises(DataError, match="INT8 segmenter files .* do not match their sha256"):
        int8_irs(tmp_path, meta, {"segmenter": "a" * 64})  # refused: never a silent float32 (issue 21)
    with caplog.at_level(logging.WARNING):
        assert int8_irs(tmp_path, meta, {"segmenter": "a" * 64}, allow_unverified=True) == {}
    assert "UNVERIFIED PAIR" in caplog.text


def test_calibration_slices_are_half_tumour_when_there_are_enough():
    from pipeline.quantization.int8 import calibration_slices

    images = np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    has_tumour = np.arange(100) < 30
    picked = calibration_slices(images, has_tumour, n=40, seed=0)
    assert picked.shape == (40, 2, 2, 3)
    assert int((picked[:, 0, 0, 0] < 30).sum()) == 20
    assert len(calibration_slices(images, has_tumour, n=500)) == 100  # never more than there are


def test_int8_files_are_listed_with_their_sums_and_stale_ones_dropped(tmp_path):
    import shutil

    from pipeline.models.pair_artifact import int8_irs
    from pipeline.quantization.int8 import _int8_record

    made = tmp_path / "made"
    made.mkdir()
    entry = {"xml": "openvino/segmenter.int8.xml", "bin": "openvino/segmenter.int8.bin",
             "source_sha256": "a" * 64, "abs_xml": str(made / "s.xml"), "abs_bin": str(made / "s.bin")}
    for key in ("xml", "bin"):
        (made / f"s.{key}").write_bytes(key.encode())
    meta = {"threshold": 0.5,
            "sha256": {"classifier.keras": "c" * 64, "openvino/classifier.int8.xml": "d" * 64},
            "openvino_int8": {"classifier": {"xml": "openvino/classifier.int8.xml"}}}
    pair = tmp_path / "pair"
    record = _int8_record(meta, {"segmenter": entry}, pair, shutil.copyfile)
    assert set(record["sha256"]) == {"classifier.keras", entry["xml"], entry["bin"]}  # the stale sum is gone
    assert list(record["openvino_int8"]) == ["segmenter"]
    assert not any(k.startswith("abs_") for k in record["openvino_int8"]["segmenter"])
    assert meta["sha256"]["openvino/classifier.int8.xml"] == "d" * 64  # the input record is left alone
    assert int8_irs(pair, record, {"segmenter": "a" * 64}) == {"segmenter": pair / entry["xml"]}


def _measured(**drops):
    """{variant: measurements} passing every check, with the given (variant -> overrides)."""
    ok = {"drop": 0.0, "max_probability_diff": 0.0, "segmenter_mask_agreement": 1.0,
          "segmenter_mask_dice": 1.0}
    return {v: {**ok, **drops.get(v, {})} for v in q.VARIANTS}


def test_the_variant_with_the_most_int8_models_among_those_that_pass_is_kept():
    measured = _measured()
    assert q.decide(measured) == "both" and all(m["kept"] for m in measured.values())


@pytest.mark.parametrize("failure, kept", [
    ({"both": {"drop": q.MAX_DROP + 1e-4}}, "classifier"),  # one model more costs Dice
    ({"both": {"max_probability_diff": PROBABILITY_TOL * 1.1},
      "classifier": {"max_probability_diff": PROBABILITY_TOL * 1.1}}, "segmenter"),  # the gate moves
    ({"both": {"segmenter_mask_agreement": MASK_AGREEMENT - 1e-3},
      "segmenter": {"segmenter_mask_agreement": MASK_AGREEMENT - 1e-3}}, "classifier"),
    # nearly every pixel agrees, yet the tumour's outline moves: the variant check's Dice limit
    ({"both": {"segmenter_mask_dice": MASK_DICE - 1e-3},
      "segmenter": {"segmenter_mask_dice": MASK_DICE - 1e-3}}, "classifier"),
    ({v: {"drop": 0.1} for v in q.VARIANTS}, None),  # nothing passes: nothing is written
])
def test_a_variant_is_rejected_by_any_one_check(failure, kept):
    measured = _measured(**failure)
    assert q.decide(measured) == kept
    for variant in failure:
        assert measured[variant]["kept"] is False


def test_the_limits_themselves_pass():
    measured = _measured(both={"drop": q.MAX_DROP, "max_probability_diff": PROBABILITY_TOL,
                               "segmenter_mask_agreement": MASK_AGREEMENT,
                               "segmenter_mask_dice": MASK_DICE})
    assert q.decide(measured) == "both"
    assert q.decide(measured, max_drop=q.MAX_DROP / 2) == "classifier"


def test_the_validation_numbers_come_from_the_report_not_its_display_text(tmp_path, monkeypatch):
    import pandas as pd

    from pipeline.evaluation import evaluate as ev

    slices_csv = tmp_path / "slices.csv"
    pd.DataFrame({"probability": [0.25, 0.75]}).to_csv(slices_csv, index=False)
    seen = {}

    def fake_evaluate(**kwargs):
        seen.update(kwargs)
        report = {"patient_dice": {"end_to_end": {"mean": 0.8125}}, "headline": []}
        return ev.EvaluationResult(report, tmp_path, {"slices_csv": slices_csv})

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    dice, probabilities = q._validation_run(tmp_path / "pair", "auto", tmp_path / "out", tmp_path / "s.csv",
                                            None, None)
    assert dice == 0.8125 and probabilities.tolist() == [0.25, 0.75]
    assert seen["split"] == "val" and seen["backend"] == "openvino" and seen["precision"] == "auto"


def test_an_unknown_quantization_preset_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization preset 'fast'; valid: mixed, performance"):
        q.quantize_ir(tmp_path / "model.xml", np.zeros((1, 8, 8, 3), np.float32), tmp_path / "out.xml",
                      preset="fast")
