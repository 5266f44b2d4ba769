"""make evaluate: exact numbers on a hand-built case, the report files, model/split selection, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.splits import pair_splits_file, select_positions
from pipeline.errors import DataError
from pipeline.evaluation import evaluate as ev
from pipeline.evaluation.predictions import predict_slices
from pipeline.evaluation.report import build_report, confidence_section, patient_table, slice_table
from pipeline.paths import resolve_pair
from tests.evaluation_helpers import (
    SIZE,
    StubPipeline,
    evaluate_hand_built,
    hand_built_case,
    stub_classifier,
    stub_segment,
    stub_segmenter,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(path: Path) -> dict:
    """Parse as strict JSON: NaN/Infinity (not JSON) make the test fail."""

    def reject(token):
        raise ValueError(f"non-standard JSON constant {token} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


@pytest.fixture(scope="module")
def hand_built_result(tmp_path_factory):
    return evaluate_hand_built(tmp_path_factory.mktemp("hand_built"), n_boot=200)


# --------------------------------------------------------------------------- exact numbers


def test_end_to_end_and_segmenter_patient_dice_are_exact(hand_built_result):
    case, result = hand_built_result
    exp, rep = case.expected, result.report
    patients = {p["patient_id"]: p for p in rep["patient_dice"]["patients"]}
    assert set(patients) == set(exp["e2e_patient_dice"])
    for pid, dice in exp["e2e_patient_dice"].items():
        assert patients[pid]["end_to_end"]["dice"] == pytest.approx(dice, abs=1e-12)
        assert patients[pid]["segmenter_alone"]["dice"] == pytest.approx(
            exp["seg_patient_dice"][pid], abs=1e-12
        )
    e2e = rep["patient_dice"]["end_to_end"]
    assert e2e["mean"] == pytest.approx(exp["e2e_mean"], abs=1e-12)
    assert e2e["median"] == pytest.approx(exp["e2e_median"], abs=1e-12)
    assert e2e["min"] == pytest.approx(exp["e2e_min"], abs=1e-12)
    assert rep["patient_dice"]["segmenter_alone"]["mean"] == pytest.approx(exp["seg_mean"], abs=1e-12)
    assert rep["patient_dice"]["n_patients_without_tumor"] == 1


def test_classifier_and_segmenter_slice_metrics_are_exact(hand_built_result):
    case, result = hand_built_result
    exp, clf, seg = case.expected, result.report["classifier"], result.report["segmenter_tumor_slices"]
    assert clf["accuracy"] == pytest.approx(exp["accuracy"])
    assert clf["roc_auc"] == pytest.approx(exp["roc_auc"])
    assert clf["sensitivity"] == pytest.approx(exp["sensitivity"])
    assert clf["specificity"] == pytest.approx(exp["specificity"])
    assert {k: clf[k] for k in ("tn", "fp", "fn", "tp")} == exp["confusion"]
    assert seg["n_slices"] == 3
    assert seg["dice"]["mean"] == pytest.approx(exp["seg_slice_dice_mean"])
    assert seg["dice"]["median"] == pytest.approx(exp["seg_slice_dice_median"])
    assert seg["iou"]["mean"] == pytest.approx(exp["seg_slice_iou_mean"])


def test_pipeline_false_positive_and_negative_slices_are_listed(hand_built_result):
    case, result = hand_built_result
    errors = result.report["pipeline_errors"]
    fps = [(s["patient_id"], s["slice"]) for s in errors["false_positives"]["slices"]]
    fns = [(s["patient_id"], s["slice"], s["cause"]) for s in errors["false_negatives"]["slices"]]
    assert fps == case.expected["false_positives"]
    assert errors["false_positives"]["count"] == 1
    assert fns == case.expected["false_negatives"]
    assert errors["false_negatives"]["count"] == 1
    # a flagged slice whose segmentation is empty (P3 slice 2) is no false positive
    assert ("TCGA_HB_0003", 2) not in fps


def test_real_tumor_pipeline_gives_the_same_hand_computed_numbers():
    """Through the product's own TumorPipeline, with Keras stubs that answer what each image encodes."""
    from pipeline.inference import tumor_pipeline

    case = hand_built_case()
    exp = case.expected
    pipeline = tumor_pipeline.TumorPipeline(
        stub_classifier(), stub_segmenter(), threshold=case.threshold, seg_threshold=0.5, min_component_px=0,
        tile_size=SIZE,
    )  # fmt: skip
    preds = predict_slices(pipeline, case.images, pipeline.segment_only, batch_size=4, progress=False)
    assert preds.flagged.tolist() == [p >= case.threshold for p in case.images[:, 0, 0, 0] / 255.0]
    report, _, _ = build_report(case.rows, case.masks, preds, threshold=case.threshold, n_boot=10)
    patients = {p["patient_id"]: p for p in report["patient_dice"]["patients"]}
    for pid, dice in exp["e2e_patient_dice"].items():
        assert patients[pid]["end_to_end"]["dice"] == pytest.approx(dice, abs=1e-12)
        assert patients[pid]["segmenter_alone"]["dice"] == pytest.approx(
            exp["seg_patient_dice"][pid], abs=1e-12
        )
    assert report["classifier"]["accuracy"] == pytest.approx(exp["accuracy"])
    assert report["classifier"]["roc_auc"] == pytest.approx(exp["roc_auc"])
    errors = report["pipeline_errors"]
    assert [(s["patient_id"], s["slice"]) for s in errors["false_positives"]["slices"]] == exp[
        "false_positives"
    ]
    assert [(s["patient_id"], s["slice"], s["cause"]) for s in errors["false_negatives"]["slices"]] == exp[
        "false_negatives"
    ]


# --------------------------------------------------------------------------- report files


def test_report_json_parses_and_holds_every_section(hand_built_result):
    _, result = hand_built_result
    report = _strict_json(result.out_dir / "report.json")
    for section in (
        "provenance",
        "empty_mask_convention",
        "classifier",
        "segmenter_tumor_slices",
        "patient_dice",
        "pipeline_errors",
        "confidence_intervals",
        "headline",
        "figures",
    ):
        assert section in report, section
    assert report["empty_mask_convention"]["empty"] == "one"
    assert report["provenance"]["n_patients"] == 3 and report["provenance"]["n_slices"] == 7
    ci = report["confidence_intervals"]
    for key in (
        "end_to_end_mean_patient_dice",
        "segmenter_alone_mean_patient_dice",
        "classifier_accuracy",
        "classifier_roc_auc",
    ):
        assert ci[key]["low"] <= ci[key]["estimate"] <= ci[key]["high"], key
    assert report["classifier"]["roc_auc"] == pytest.approx(0.75)
    # the bootstrap's own (rank-formula) ROC-AUC and accuracy agree with scikit-learn's on the full set
    assert ci["classifier_roc_auc"]["estimate"] == pytest.approx(report["classifier"]["roc_auc"])
    assert ci["classifier_accuracy"]["estimate"] == pytest.approx(report["classifier"]["accuracy"])


def test_report_md_has_headline_table_and_empty_mask_convention(hand_built_result):
    _, result = hand_built_result
    md = (result.out_dir / "report.md").read_text(encoding="utf-8")
    assert "## Headline" in md
    assert "| End-to-end mean per-patient Dice |" in md
    assert "95% CI" in md
    assert "Empty-mask convention" in md and "both empty" in md
    for heading in (
        "Classifier (stage 1)",
        "Segmenter alone on tumour slices",
        "Per-patient volume Dice",
        "slice errors",
        "bootstrap confidence intervals",
        "Provenance",
    ):
        assert heading in md, heading
    for pid in ("TCGA_HB_0001", "TCGA_HB_0002", "TCGA_HB_0003"):
        assert pid in md


def test_report_html_has_the_figures_inline_and_every_table_of_report_md(hand_built_result):
    _, result = hand_built_result
    page = (result.out_dir / "report.html").read_text(encoding="utf-8")
    md = (result.out_dir / "report.md").read_text(encoding="utf-8")
    assert result.files["report_html"] == result.out_dir / "report.html"
    assert page.count("<table>") == md.count("\n|---")  # one table per Markdown table
    assert page.count('src="data:image/png;base64,') == len(result.report["figures"])
    for name in result.report["figures"].values():
        assert f'src="{name}"' not in page  # inline, not linked
    for pid in ("TCGA_HB_0001", "TCGA_HB_0002", "TCGA_HB_0003"):
        assert f"<td>{pid}</td>" in page  # underscores kept, not read as emphasis
    assert "http://" not in page and "https://" not in page


def test_report_html_escapes_what_it_is_given(tmp_path):
    from pipeline.evaluation.report_html import render_html

    markdown = "# R\n\n| patient | Dice |\n|---|---|\n| <script>x</script> | 0.5 |\n\n![f](../x.png)"
    page = render_html(markdown, tmp_path)
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert '<td class="num">0.5</td>' in page and "not found" in page  # no file outside the folder


def test_figures_are_valid_pngs(hand_built_result):
    _, result = hand_built_result
    names = result.report["figures"]
    assert set(names) == {"roc_pr", "confusion_matrix", "patient_dice", "overlays"}
    for name in names.values():
        path = result.out_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 100 and img.size[1] > 100
    leftovers = [p.name for p in result.out_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "atomic writes left temporary files behind"


def test_bootstrap_ci_is_reproducible_with_a_seed(hand_built_result):
    case, result = hand_built_result
    preds = predict_slices(StubPipeline(case.threshold), case.images, stub_segment, progress=False)
    slices = slice_table(case.rows, case.masks, preds)
    patients = patient_table(slices, case.masks, preds)
    a = confidence_section(slices, patients, n_boot=100, seed=11)
    b = confidence_section(slices, patients, n_boot=100, seed=11)
    c = confidence_section(slices, patients, n_boot=100, seed=12)
    assert a == b
    assert a != c  # another seed draws other patients
    # the report's own CIs came from seed 7 and are reproduced exactly
    again = confidence_section(slices, patients, n_boot=200, seed=7)
    stored = result.report["confidence_intervals"]
    assert stored["end_to_end_mean_patient_dice"] == pytest.approx(again["end_to_end_mean_patient_dice"])
    assert stored["classifier_roc_auc"] == pytest.approx(again["classifier_roc_auc"])


def test_bootstrap_roc_auc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    from pipeline.evaluation.report import _safe_roc_auc

    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 2, 40)
        probs = np.round(rng.random(40), 1)  # many ties
        assert _safe_roc_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert np.isnan(_safe_roc_auc(np.ones(5, int), rng.random(5)))


# --------------------------------------------------------------------------- choosing models and patients


def _fake_pair(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text("{}")
    return folder


def test_model_selection_prefers_flags_then_models_then_the_latest_run(tmp_path):
    """The rule diagnose shares (`pipeline.paths.resolve_pair`): --models > --run > models/ > latest run."""
    runs, models = tmp_path / "runs", tmp_path / "models"
    with pytest.raises(DataError, match="make train"):
        resolve_pair(runs_dir=runs, default_models=models)
    old = _fake_pair(runs / "run_old" / "pair").parent
    new = _fake_pair(runs / "run_new")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert resolve_pair(runs_dir=runs, default_models=models) == ev.ModelSource(new, new)
    (runs / "LATEST").write_text("run_old\n")
    assert resolve_pair(runs_dir=runs, default_models=models) == ev.ModelSource(old / "pair", old)
    _fake_pair(models)  # the committed release wins over every run
    assert resolve_pair(runs_dir=runs, default_models=models) == ev.ModelSource(models)
    assert resolve_pair(run=new, runs_dir=runs, default_models=models) == ev.ModelSource(new, new)
    assert resolve_pair(models=models, runs_dir=runs, default_models=models).run_dir is None
    with pytest.raises(DataError, match="no model pair"):
        resolve_pair(run=tmp_path / "empty_run", runs_dir=runs, default_models=models)
    with pytest.raises(DataError, match="not both"):
        resolve_pair(models=models, run=new, runs_dir=runs, default_models=models)


def test_splits_file_defaults_to_the_runs_copy(tmp_path):
    run = _fake_pair(tmp_path / "run")
    models = tmp_path / "models"
    models.mkdir()
    source = ev.ModelSource(run, run)
    assert pair_splits_file(None, source, models) is None
    (models / "splits.csv").write_text("patient_id,split\n")
    assert pair_splits_file(None, source, models) == models / "splits.csv"
    (run / "splits.csv").write_text("patient_id,split\n")
    assert pair_splits_file(None, source, models) == run / "splits.csv"
    assert pair_splits_file(tmp_path / "x.csv", source, models) == tmp_path / "x.csv"


def test_split_all_needs_no_split_file_and_test_split_does(synthetic_root, tmp_path):
    from pipeline.data.index import index_dataset

    index_df = index_dataset(synthetic_root, cache_dir=tmp_path / "cache")
    assert select_positions(index_df, "all", None).tolist() == list(range(len(index_df)))
    with pytest.raises(DataError, match="--split all"):
        select_positions(index_df, "test", tmp_path / "missing.csv")


# --------------------------------------------------------------------------- end to end through the CLI


@pytest.mark.slow
def test_cli_split_all_on_an_unseen_root_with_the_tiny_pair(tiny_pair, synthetic_root, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", "--models", str(tiny_pair), "--split", "all", "--data-dir", str(synthetic_root),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--n-boot", "50", "--batch-size", "25",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "End-to-end mean per-patient Dice" in printed and str(out / "report.md") in printed
    report = _strict_json(out / "report.json")
    assert report["provenance"]["split"] == "all" and report["provenance"]["split_file"] is None
    assert report["provenance"]["n_patients"] == 6 and report["provenance"]["n_slices"] == 50
    assert len(report["patient_dice"]["patients"]) == 6
    assert set(report["provenance"]["model_files_sha256"]) == {"classifier.keras", "segmenter.keras"}
    for name in report["figures"].values():
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_without_models_dir_the_latest_run_its_split_copy_and_its_folder(tiny_pair, synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "20260101-000000"
    shutil.copytree(tiny_pair, run)
    test_patients = {"TCGA_AA_0002", "TCGA_CC_0006"}
    lines = ["patient_id,split", "TCGA_AA_0001,train", "TCGA_BB_0004,train", "TCGA_CC_0005,train",
             "TCGA_BB_0003,val", *(f"{p},test" for p in sorted(test_patients))]  # fmt: skip
    (run / "splits.csv").write_text("\n".join(lines) + "\n")
    (runs / "LATEST").write_text(run.name + "\n")
    result = ev.evaluate(data_dir=synthetic_root, cache_dir=tmp_path / "cache", n_boot=20, progress=False,
                         runs_dir=runs, default_models=tmp_path / "no_models")  # fmt: skip
    assert result.out_dir == run / "evaluation" / "test"
    assert (run / "evaluation" / "test" / "report.md").is_file()
    prov = result.report["provenance"]
    assert prov["split"] == "test" and prov["split_file"] == str(run / "splits.csv")
    assert prov["run_dir"] == str(run)
    assert {p["patient_id"] for p in result.report["patient_dice"]["patients"]} == test_patients
    assert prov["n_slices"] == 16


def test_cli_reports_a_missing_model_pair(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["evaluate", "--models", str(tmp_path / "nothing"), "--no-progress"])
    assert code == 2
    assert "make train" in capsys.readouterr().err
