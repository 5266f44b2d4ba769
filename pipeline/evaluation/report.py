"""The numbers of an evaluation and their two renderings: `report.json` and `report.md`.

`build_report` turns ground-truth masks and `SlicePredictions` into one JSON-ready dict
with clearly separated sections:

1. `classifier`: slice-level stage-1 metrics at the chosen threshold;
2. `segmenter_tumor_slices`: the segmenter alone, per-slice Dice/IoU on tumour slices only;
3. `patient_dice`: per-patient volume Dice (TP/FP/FN summed over a patient's slices) for the
   segmenter alone (run on every slice) and for the end-to-end pipeline, each patient listed;
4. `pipeline_errors`: slice-level false positives / false negatives of the end-to-end pipeline;
5. `confidence_intervals`: 95% percentile bootstrap over patients for the headline numbers;
6. `empty_mask_convention`; 7. `provenance` (filled in by the caller).

Every score comes from `pipeline.metrics` (one TP/FP/FN helper, one empty-mask rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from pipeline import metrics
from pipeline.evaluation.predictions import SlicePredictions
from pipeline.postprocessing import gate

EMPTY = "one"  # see EMPTY_MASK_CONVENTION; the same rule as pipeline.metrics' default
CI_ALPHA = 0.05

EMPTY_MASK_CONVENTION = (
    "Dice = 2TP/(2TP+FP+FN) and IoU = TP/(TP+FP+FN) from pixel counts. When the ground truth "
    "and the prediction are both empty (0/0) the score is 1.0 (correctly predicted 'no tumour', "
    '`empty="one"` in pipeline.metrics); a prediction on an empty ground truth scores 0.0; an '
    "empty prediction on a non-empty ground truth scores 0.0. Per-patient volume Dice sums "
    "TP/FP/FN over all of a patient's slices first, so the rule only applies to a patient "
    "without any tumour pixel. Per-slice segmenter scores use tumour slices only, where the "
    "rule never applies. In the end-to-end pipeline a slice the classifier does not flag is an "
    "empty prediction."
)


# --------------------------------------------------------------------------- helpers


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    return value


def _summary(values: np.ndarray) -> dict[str, float]:
    """NaN-aware mean, median, min, max of a score column."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(np.isnan(values)):
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "mean": float(np.nanmean(values)),
        "median": float(np.nanmedian(values)),
        "min": float(np.nanmin(values)),
        "max": float(np.nanmax(values)),
    }


def _ci(result: metrics.BootstrapCI) -> dict[str, float]:
    return {"estimate": result.estimate, "low": result.low, "high": result.high}


def _safe_roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC by the Mann-Whitney rank formula (ties count 1/2, as scikit-learn's
    `roc_auc_score`), ~100x faster than it for the thousands of bootstrap resamples; NaN when
    the resample holds one class only (bootstrap_ci then skips it)."""
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(probs)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- tables


def slice_table(rows: pd.DataFrame, masks: np.ndarray, preds: SlicePredictions) -> pd.DataFrame:
    """One row per evaluated slice: identity, truth, classifier output and both predictions' counts.

    Columns: `patient_id, case, slice, gt_pixels, has_tumor, probability, flagged`, then
    `e2e_tp, e2e_fp, e2e_fn, e2e_pred_pixels, e2e_dice` for the end-to-end pipeline and the
    same with `seg_` for the segmenter alone (Dice per `EMPTY`).
    """
    e2e = metrics.slice_scores(masks, preds.pipeline_masks, empty=EMPTY)
    seg = metrics.slice_scores(masks, preds.segmenter_masks, empty=EMPTY)
    table = pd.DataFrame(
        {
            "patient_id": rows["patient_id"].to_numpy(),
            "case": rows["case"].to_numpy() if "case" in rows else rows["patient_id"].to_numpy(),
            "slice": rows["slice"].to_numpy() if "slice" in rows else np.arange(len(rows)),
            "gt_pixels": e2e["gt_pixels"].to_numpy(),
            "has_tumor": e2e["gt_pixels"].to_numpy() > 0,
            "probability": preds.probabilities,
            "flagged": preds.flagged,
        }
    )
    for prefix, scores in (("e2e", e2e), ("seg", seg)):
        for column in ("tp", "fp", "fn", "pred_pixels", "dice", "iou"):
            table[f"{prefix}_{column}"] = scores[column].to_numpy()
    return table


def patient_table(slices: pd.DataFrame, masks: np.ndarray, preds: SlicePredictions) -> pd.DataFrame:
    """One row per patient (sorted by id): slice counts and volume Dice of both predictions.

    `slices` is the `slice_table` of the same rows (for the patient ids and tumour-slice counts).
    """
    ids = slices["patient_id"].to_numpy()
    e2e = metrics.patient_scores(ids, masks, preds.pipeline_masks, empty=EMPTY)
    seg = metrics.patient_scores(ids, masks, preds.segmenter_masks, empty=EMPTY)
    tumour_slices = slices.groupby("patient_id")["has_tumor"].sum()
    out = e2e[["patient_id", "n_slices", "gt_pixels"]].copy()
    out["n_tumor_slices"] = tumour_slices.reindex(out["patient_id"]).to_numpy().astype(int)
    for prefix, scores in (("e2e", e2e), ("seg", seg)):
        for column in ("dice", "iou", "tp", "fp", "fn", "pred_pixels"):
            out[f"{prefix}_{column}"] = scores[column].to_numpy()
    return out


# --------------------------------------------------------------------------- sections


def classifier_section(slices: pd.DataFrame, threshold: float) -> dict[str, Any]:
    """Stage-1 slice metrics at the operating point the pipeline used, and the gate's own decisions.

    `classification_summary` flags a slice at `probability >= threshold` (the classifier
    alone); ROC-AUC and PR-AUC come from the probabilities. `gate` counts the pipeline's
    decisions (`flagged`), which with the volume-aware gate also include slices next to a
    confident one.
    """
    labels = slices["has_tumor"].astype(int).to_numpy()
    summary = metrics.classification_summary(labels, slices["probability"].to_numpy(), threshold)
    summary["positive_rule"] = "probability >= threshold (the classifier alone)"
    flagged = slices["flagged"].to_numpy().astype(bool)
    pos = labels.astype(bool)
    summary["gate"] = {
        "flagged": int(flagged.sum()),
        "accuracy": float(np.mean(flagged == pos)),
        "sensitivity": float(flagged[pos].mean()) if pos.any() else None,
        "specificity": float((~flagged[~pos]).mean()) if (~pos).any() else None,
        "flagged_only_by_neighbours": int((flagged & (slices["probability"].to_numpy() < threshold)).sum()),
    }
    return summary


def segmenter_section(slices: pd.DataFrame) -> dict[str, Any]:
    """Segmenter alone on tumour slices: per-slice Dice and IoU, mean and median."""
    tumour = slices[slices["has_tumor"]]
    dice, iou = tumour["seg_dice"].to_numpy(), tumour["seg_iou"].to_numpy()
    return {
        "description": "segmenter run on every slice, scored per slice on tumour slices only",
        "n_slices": int(len(tumour)),
        "dice": {k: v for k, v in _summary(dice).items() if k in ("mean", "median")},
        "iou": {k: v for k, v in _summary(iou).items() if k in ("mean", "median")},
        "n_empty_prediction": int((tumour["seg_pred_pixels"] == 0).sum()),
    }


def _empty_cases(patients: pd.DataFrame, prefix: str) -> dict[str, int]:
    """Counts of patients the empty-mask rule touches (`pipeline.metrics.score_summary`)."""
    table = patients.rename(columns={f"{prefix}_{c}": c for c in ("dice", "iou", "pred_pixels")})
    summary = metrics.score_summary(table, empty=EMPTY)
    return {k: summary[k] for k in ("n_gt_empty", "n_both_empty", "n_pred_on_empty_gt", "n_missed_gt")}


def patient_section(patients: pd.DataFrame) -> dict[str, Any]:
    """Per-patient volume Dice summaries of both predictions, and every patient listed."""
    out: dict[str, Any] = {
        "n_patients": int(len(patients)),
        "n_patients_without_tumor": int((patients["gt_pixels"] == 0).sum()),
    }
    for key, prefix, text in (
        ("end_to_end", "e2e", "classifier gates, segmenter on flagged slices only, others empty"),
        ("segmenter_alone", "seg", "segmenter run on every slice"),
    ):
        out[key] = {
            "description": text,
            **_summary(patients[f"{prefix}_dice"].to_numpy()),
            "empty_cases": _empty_cases(patients, prefix),
        }
    out["patients"] = [
        {
            "patient_id": r.patient_id,
            "n_slices": int(r.n_slices),
            "n_tumor_slices": int(r.n_tumor_slices),
            "gt_pixels": int(r.gt_pixels),
            "end_to_end": {
                "dice": r.e2e_dice,
                "iou": r.e2e_iou,
                "tp": int(r.e2e_tp),
                "fp": int(r.e2e_fp),
                "fn": int(r.e2e_fn),
            },
            "segmenter_alone": {
                "dice": r.seg_dice,
                "iou": r.seg_iou,
                "tp": int(r.seg_tp),
                "fp": int(r.seg_fp),
                "fn": int(r.seg_fn),
            },
        }
        for r in patients.itertuples(index=False)
    ]
    return out


def _slice_entry(r: Any) -> dict[str, Any]:
    return {
        "patient_id": r.patient_id,
        "case": r.case,
        "slice": int(r.slice),
        "probability": float(r.probability),
        "flagged": bool(r.flagged),
        "gt_pixels": int(r.gt_pixels),
        "pred_pixels": int(r.e2e_pred_pixels),
    }


def errors_section(slices: pd.DataFrame) -> dict[str, Any]:
    """End-to-end slice errors: a mask on an empty slice (FP), an empty prediction on a tumour slice (FN).

    Each false negative says whether the classifier missed the slice (`not flagged`) or the
    segmenter returned nothing on a flagged slice.
    """
    fp = slices[~slices["has_tumor"] & (slices["e2e_pred_pixels"] > 0)]
    fn = slices[slices["has_tumor"] & (slices["e2e_pred_pixels"] == 0)]
    fn_list = []
    for r in fn.itertuples(index=False):
        entry = _slice_entry(r)
        entry["cause"] = "segmenter empty on flagged slice" if r.flagged else "classifier did not flag"
        fn_list.append(entry)
    return {
        "definition": (
            "false positive: non-empty predicted mask on a slice without tumour; "
            "false negative: empty prediction on a tumour slice"
        ),
        "n_slices": int(len(slices)),
        "n_empty_slices": int((~slices["has_tumor"]).sum()),
        "n_tumor_slices": int(slices["has_tumor"].sum()),
        "false_positives": {
            "count": int(len(fp)),
            "slices": [_slice_entry(r) for r in fp.itertuples(index=False)],
        },
        "false_negatives": {
            "count": int(len(fn)),
            "missed_by_classifier": int((~fn["flagged"]).sum()),
            "empty_segmentation_on_flagged": int(fn["flagged"].sum()),
            "slices": fn_list,
        },
    }


def confidence_section(
    slices: pd.DataFrame, patients: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
    threshold: float | None = None,
) -> dict[str, Any]:
    """95% percentile bootstrap CIs, resampling patients with replacement (same seed for every number).

    The Dice means resample per-patient values; the classifier's accuracy and ROC-AUC
    resample patients and recompute over all slices of the drawn patients (a cluster
    bootstrap, since slices of one patient are not independent). Resamples where a number
    is undefined (e.g. one class only for ROC-AUC) are skipped.
    """
    labels = slices["has_tumor"].to_numpy().astype(int)
    probs = slices["probability"].to_numpy()
    # the classifier alone at the threshold, as `classifier_section` (the gate's decisions without one)
    decided = slices["flagged"].to_numpy() if threshold is None else gate(probs, threshold)
    correct = (decided.astype(int) == labels).astype(float)
    groups = slices["patient_id"].to_numpy()
    common = {"n_boot": n_boot, "seed": seed, "alpha": CI_ALPHA}
    cis = {
        "end_to_end_mean_patient_dice": metrics.bootstrap_ci(patients["e2e_dice"].to_numpy(), **common),
        "segmenter_alone_mean_patient_dice": metrics.bootstrap_ci(patients["seg_dice"].to_numpy(), **common),
        # accuracy = mean over the drawn patients' slices of "correct": the vectorised cluster path
        "classifier_accuracy": metrics.bootstrap_ci(correct, groups=groups, **common),
        "classifier_roc_auc": metrics.bootstrap_ci(
            lambda i: _safe_roc_auc(labels[i], probs[i]), groups=groups, **common
        ),
    }
    return {
        "level": 1 - CI_ALPHA,
        "method": "percentile bootstrap over patients",
        "n_boot": int(n_boot),
        "seed": int(seed),
        "n_patients": int(len(patients)),
        **{k: _ci(v) for k, v in cis.items()},
    }


def build_report(
    rows: pd.DataFrame,
    masks: np.ndarray,
    preds: SlicePredictions,
    *,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Compute every section of the report.

    rows: the evaluated index rows (at least `patient_id`; `case`, `slice` when present),
    aligned with `masks` (N, H, W) 0/1 and `preds`. Returns `(report, slices, patients)`:
    the JSON-ready dict (NaN as None) and the per-slice and per-patient tables behind it.
    """
    if not len(rows) == len(masks) == len(preds.probabilities):
        raise ValueError(
            f"rows ({len(rows)}), masks ({len(masks)}) and predictions "
            f"({len(preds.probabilities)}) must be aligned"
        )
    if len(rows) == 0:
        raise ValueError("nothing to evaluate: no slices")
    slices = slice_table(rows, masks, preds)
    patients = patient_table(slices, masks, preds)
    report = {
        "provenance": dict(provenance or {}),
        "empty_mask_convention": {"empty": EMPTY, "text": EMPTY_MASK_CONVENTION},
        "classifier": classifier_section(slices, threshold),
        "segmenter_tumor_slices": segmenter_section(slices),
        "patient_dice": patient_section(patients),
        "pipeline_errors": errors_section(slices),
        "confidence_intervals": confidence_section(slices, patients, n_boot, seed, threshold),
    }
    report["headline"] = headline(report)
    return _clean(report), slices, patients


def headline(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The headline rows: name, value and (where computed) the 95% CI bounds."""
    ci = report["confidence_intervals"]
    clf = report["classifier"]
    pd_ = report["patient_dice"]
    errors = report["pipeline_errors"]

    def row(name: str, value: Any, key: str | None = None) -> dict[str, Any]:
        bounds = ci.get(key, {}) if key else {}
        return {"metric": name, "value": value, "ci_low": bounds.get("low"), "ci_high": bounds.get("high")}

    return [
        row("End-to-end mean per-patient Dice", pd_["end_to_end"]["mean"], "end_to_end_mean_patient_dice"),
        row("End-to-end median per-patient Dice", pd_["end_to_end"]["median"]),
        row(
            "Segmenter-alone mean per-patient Dice",
            pd_["segmenter_alone"]["mean"],
            "segmenter_alone_mean_patient_dice",
        ),
        row("Classifier accuracy (slices)", clf["accuracy"], "classifier_accuracy"),
        row("Classifier ROC-AUC (slices)", clf["roc_auc"], "classifier_roc_auc"),
        row("Classifier sensitivity", clf["sensitivity"]),
        row("Classifier specificity", clf["specificity"]),
        row("Pipeline false-positive slices", errors["false_positives"]["count"]),
        row("Pipeline false-negative slices", errors["false_negatives"]["count"]),
    ]


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], body: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return lines


def _slice_list(entries: list[dict[str, Any]], limit: int, extra: str | None = None) -> list[str]:
    if not entries:
        return ["None."]
    header = ["patient", "case", "slice", "probability", "flagged", "GT px", "pred px"] + (
        [extra] if extra else []
    )
    body = [
        [
            e["patient_id"],
            e["case"],
            e["slice"],
            e["probability"],
            e["flagged"],
            e["gt_pixels"],
            e["pred_pixels"],
        ]
        + ([e[extra]] if extra else [])
        for e in entries[:limit]
    ]
    lines = _table(header, body)
    if len(entries) > limit:
        lines.append(f"\n... and {len(entries) - limit} more (all listed in report.json).")
    return lines


def render_markdown(
    report: Mapping[str, Any], figures: Mapping[str, str] | None = None, max_listed: int = 50
) -> str:
    """Human-readable report: headline table with CIs, then one section per kind of number."""
    prov = report["provenance"]
    clf = report["classifier"]
    out: list[str] = ["# Evaluation report", ""]
    out += [
        f"Split **{prov.get('split', '?')}**: {prov.get('n_patients', '?')} patients, "
        f"{prov.get('n_slices', '?')} slices ({prov.get('n_tumor_slices', '?')} with tumour); "
        f"models `{prov.get('models_dir', '?')}`; classifier threshold {_fmt(clf['threshold'], 3)}.",
        "",
    ]
    out += _md_headline(report)
    out += _md_classifier(clf)
    out += _md_segmenter(report["segmenter_tumor_slices"])
    out += _md_patient_dice(report["patient_dice"])
    out += _md_errors(report["pipeline_errors"], max_listed)
    out += _md_confidence(report["confidence_intervals"])
    out += _md_empty_masks(report)
    out += ["## 7. Provenance", ""]
    out += _table(["item", "value"], [[k, _provenance_value(v)] for k, v in prov.items()])
    out.append("")
    if figures:
        out += ["## Figures", ""]
        out += [f"![{name}]({path})" for name, path in figures.items()]
        out.append("")
    return "\n".join(out)


def _level(ci: Mapping[str, Any]) -> int:
    return int(round(100 * ci["level"]))


def _md_headline(report: Mapping[str, Any]) -> list[str]:
    ci = report["confidence_intervals"]
    out = ["## Headline", ""]
    out += _table(
        ["metric", "value", f"{_level(ci)}% CI"],
        [
            [
                r["metric"],
                r["value"],
                ""
                if r["ci_low"] is None and r["ci_high"] is None
                else f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            ]
            for r in report["headline"]
        ],
    )
    out += [
        "",
        f"CIs: {ci['method']}, {ci['n_boot']} resamples of {ci['n_patients']} patients, seed {ci['seed']}.",
        "",
    ]
    return out


_CLASSIFIER_ROWS = ("n", "n_positive", "n_negative", "accuracy", "sensitivity", "specificity", "precision",
                    "f1", "roc_auc", "pr_auc")


def _md_classifier(clf: Mapping[str, Any]) -> list[str]:
    out = [
        "## 1. Classifier (stage 1), slice level",
        "",
        f"A slice counts as predicted tumour when {clf['positive_rule']}; threshold "
        f"{_fmt(clf['threshold'], 3)}. ROC-AUC and PR-AUC use the probabilities.",
        "",
    ]
    out += _table(["metric", "value"], [[k, clf[k]] for k in _CLASSIFIER_ROWS])
    out += ["", "Confusion matrix (rows: ground truth, columns: prediction):", ""]
    out += _table(
        ["", "predicted no tumour", "predicted tumour"],
        [["no tumour", clf["tn"], clf["fp"]], ["tumour", clf["fn"], clf["tp"]]],
    )
    for note in clf.get("notes", []):
        out.append(f"\n_Note: {note}_")
    out.append("")
    return out


def _md_segmenter(seg: Mapping[str, Any]) -> list[str]:
    out = [
        "## 2. Segmenter alone on tumour slices (per-slice scores)",
        "",
        f"{seg['description']}; {seg['n_slices']} tumour slices, "
        f"{seg['n_empty_prediction']} with an empty prediction.",
        "",
    ]
    out += _table(
        ["score", "mean", "median"],
        [
            ["Dice", seg["dice"]["mean"], seg["dice"]["median"]],
            ["IoU", seg["iou"]["mean"], seg["iou"]["median"]],
        ],
    )
    out.append("")
    return out


_PATIENT_COLUMNS = ("patient", "slices", "tumour slices", "GT px", "end-to-end Dice", "segmenter-alone Dice",
                    "e2e FP px", "e2e FN px")


def _md_patient_dice(pdice: Mapping[str, Any]) -> list[str]:
    out = [
        "## 3. Per-patient volume Dice",
        "",
        "TP/FP/FN summed over all slices of a patient, one Dice per patient "
        f"({pdice['n_patients']} patients, {pdice['n_patients_without_tumor']} without tumour).",
        "",
    ]
    out += _table(
        ["prediction", "mean", "median", "min", "max"],
        [
            [name, pdice[key]["mean"], pdice[key]["median"], pdice[key]["min"], pdice[key]["max"]]
            for name, key in (
                ("end-to-end pipeline", "end_to_end"),
                ("segmenter alone (all slices)", "segmenter_alone"),
            )
        ],
    )
    out += ["", "Every patient, worst end-to-end Dice first:", ""]
    ordered = sorted(
        pdice["patients"],
        key=lambda p: (p["end_to_end"]["dice"] is None, p["end_to_end"]["dice"] or 0.0, p["patient_id"]),
    )
    out += _table(
        list(_PATIENT_COLUMNS),
        [
            [p["patient_id"], p["n_slices"], p["n_tumor_slices"], p["gt_pixels"], p["end_to_end"]["dice"],
             p["segmenter_alone"]["dice"], p["end_to_end"]["fp"], p["end_to_end"]["fn"]]
            for p in ordered
        ],
    )
    out.append("")
    return out


def _md_errors(errors: Mapping[str, Any], max_listed: int) -> list[str]:
    fp, fn = errors["false_positives"], errors["false_negatives"]
    out = [
        "## 4. End-to-end pipeline slice errors",
        "",
        errors["definition"] + ".",
        "",
        f"- false positives: **{fp['count']}** of {errors['n_empty_slices']} slices without tumour",
        f"- false negatives: **{fn['count']}** of {errors['n_tumor_slices']} tumour slices "
        f"({fn['missed_by_classifier']} not flagged by the classifier, "
        f"{fn['empty_segmentation_on_flagged']} flagged but segmented empty)",
        "",
        "### False positives",
        "",
    ]
    out += _slice_list(fp["slices"], max_listed)
    out += ["", "### False negatives", ""]
    out += _slice_list(fn["slices"], max_listed, extra="cause")
    out.append("")
    return out


def _md_confidence(ci: Mapping[str, Any]) -> list[str]:
    out = [f"## 5. {_level(ci)}% bootstrap confidence intervals", ""]
    out += _table(
        ["number", "estimate", "low", "high"],
        [[k, v["estimate"], v["low"], v["high"]] for k, v in ci.items() if isinstance(v, dict)],
    )
    out += [
        "",
        f"Patients resampled with replacement ({ci['n_boot']} times, seed {ci['seed']}); classifier "
        "numbers are recomputed over all slices of the drawn patients.",
        "",
    ]
    return out


def _md_empty_masks(report: Mapping[str, Any]) -> list[str]:
    pdice = report["patient_dice"]
    out = ["## 6. Empty-mask convention", "", report["empty_mask_convention"]["text"], ""]
    for name, key in (("End-to-end", "end_to_end"), ("Segmenter alone", "segmenter_alone")):
        cases = pdice[key]["empty_cases"]
        out.append(
            f"- {name}: {cases['n_gt_empty']} patient(s) without tumour, {cases['n_both_empty']} of them "
            f"with no predicted pixel (scored 1.0), {cases['n_pred_on_empty_gt']} with predicted pixels "
            f"(scored 0.0); {cases['n_missed_gt']} patient(s) with tumour but no predicted pixel (0.0)."
        )
    out.append("")
    return out


def _provenance_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_provenance_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_provenance_value(v) for v in value) or "-"
    return _fmt(value)
