"""Paired comparison of two evaluations of the same patients: is B better than A, patient by patient?

With a dozen patients a difference of a few hundredths in a mean is noise; what can be trusted is
the distribution of per-patient differences (bootstrap over patients of the mean paired
difference) and the counts behind it: false-positive pixels on slices without tumour,
false-positive and missed slices. Input: two `make evaluate` output folders (their
`patients.csv` and `slices.csv`), output: a dict and a Markdown table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import metrics

__all__ = ["compare_evaluations", "error_counts", "render_comparison"]

SCORES = (
    ("e2e_dice", "end to end, mean per-patient Dice"),
    ("seg_dice", "segmenter alone, mean per-patient Dice"),
)


def error_counts(slices: pd.DataFrame, prefix: str) -> dict[str, int]:
    """Pixel and slice error counts of `prefix` ("e2e" or "seg") in an evaluation's slices table."""
    empty = ~slices["has_tumor"].astype(bool)
    pred = slices[f"{prefix}_pred_pixels"] > 0
    return {
        "fp_px_on_empty_slices": int(slices.loc[empty, f"{prefix}_fp"].sum()),
        "fp_px_on_tumour_slices": int(slices.loc[~empty, f"{prefix}_fp"].sum()),
        "fn_px": int(slices[f"{prefix}_fn"].sum()),
        "false_positive_slices": int((empty & pred).sum()),
        "missed_tumour_slices": int((~empty & ~pred).sum()),
    }


def compare_evaluations(a: str | os.PathLike, b: str | os.PathLike, n_boot: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """Compare evaluation folders `a` (baseline) and `b` (candidate) on their common patients.

    Per score: both means, the mean paired difference b - a with its 95 % bootstrap interval
    (patients resampled), and how many patients are better / worse / equal (|d| < 1e-3).
    Per prediction (e2e, seg): pixel and slice error counts of each side.
    """
    pa, pb = (pd.read_csv(Path(x) / "patients.csv") for x in (a, b))
    sa, sb = (pd.read_csv(Path(x) / "slices.csv") for x in (a, b))
    common = sorted(set(pa["patient_id"]) & set(pb["patient_id"]))
    if not common:
        raise ValueError(f"{a} and {b} share no patient")
    pa, pb = (p.set_index("patient_id").loc[common] for p in (pa, pb))
    sa, sb = (s[s["patient_id"].isin(common)] for s in (sa, sb))
    out: dict[str, Any] = {"baseline": str(a), "candidate": str(b), "n_patients": len(common), "scores": {}}
    for column, label in SCORES:
        d = (pb[column] - pa[column]).to_numpy(float)
        ci = metrics.bootstrap_ci(d, n_boot=n_boot, seed=seed)
        out["scores"][column] = {
            "label": label,
            "baseline": float(pa[column].mean()),
            "candidate": float(pb[column].mean()),
            "mean_diff": float(np.mean(d)),
            "ci_low": ci.low,
            "ci_high": ci.high,
            "better": int((d > 1e-3).sum()),
            "worse": int((d < -1e-3).sum()),
            "equal": int((np.abs(d) <= 1e-3).sum()),
            "per_patient": {pid: round(float(x), 4) for pid, x in zip(common, d, strict=True)},
        }
    out["counts"] = {
        prefix: {"baseline": error_counts(sa, prefix), "candidate": error_counts(sb, prefix)}
        for prefix in ("e2e", "seg")
    }
    return out


def render_comparison(result: dict[str, Any]) -> str:
    """Markdown tables of `compare_evaluations`."""
    lines = [
        f"Paired comparison on {result['n_patients']} patients: baseline `{result['baseline']}`, "
        f"candidate `{result['candidate']}`.",
        "",
        "| | baseline | candidate | paired diff [95 % CI] | better / worse / equal |",
        "|---|---|---|---|---|",
    ]
    for s in result["scores"].values():
        lines.append(
            f"| {s['label']} | {s['baseline']:.3f} | {s['candidate']:.3f} | {s['mean_diff']:+.3f} "
            f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] | {s['better']} / {s['worse']} / {s['equal']} |"
        )
    lines += ["", "| counts | e2e baseline | e2e candidate | seg baseline | seg candidate |",
              "|---|---|---|---|---|"]
    for key in result["counts"]["e2e"]["baseline"]:
        c = result["counts"]
        lines.append(
            f"| {key.replace('_', ' ')} | {c['e2e']['baseline'][key]:,} | {c['e2e']['candidate'][key]:,} | "
            f"{c['seg']['baseline'][key]:,} | {c['seg']['candidate'][key]:,} |"
        )
    return "\n".join(lines) + "\n"
