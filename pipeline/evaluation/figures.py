"""PNG figures of an evaluation: ROC/PR curves, confusion matrix, per-patient Dice, overlay grid.

Every function writes its PNG atomically, closes its figure and returns the path it wrote.
Importing this module leaves matplotlib's backend alone (a notebook keeps its own); the
commands that draw (`train`, `evaluate`) choose the headless Agg backend themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from pipeline.inference.overlays import PREDICTION_COLOR, TRUTH_COLOR, overlay
from pipeline.io_utils import atomic_save
from pipeline.postprocessing import gate

DPI = 110


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def plot_roc_pr(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    path: str | os.PathLike,
    predicted: np.ndarray | None = None,
) -> Path:
    """ROC and precision-recall curves of the slice classifier side by side, the operating point marked.

    `labels` (N,) 0/1, `probabilities` (N,) in [0, 1]; `predicted` (N,) bool are the decisions
    at `threshold` (default `probabilities >= threshold`, the pipeline's gate). When only one
    class is present the curves are undefined; the panels then say so instead of drawing.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    predicted = gate(probabilities, threshold) if predicted is None else np.asarray(predicted, bool)
    if len(np.unique(labels)) < 2:
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        ax_roc.plot(fpr, tpr, color="C0", label=f"ROC (AUC = {auc(fpr, tpr):.4f})")
        ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        op_fpr = predicted[labels == 0].mean()
        op_tpr = predicted[labels == 1].mean()
        ax_roc.plot(op_fpr, op_tpr, "o", color="C3", label=f"threshold {threshold:.3g}")
        precision, recall, _ = precision_recall_curve(labels, probabilities)
        ax_pr.plot(recall, precision, color="C0", label=f"PR (AUC = {auc(recall, precision):.4f})")
        ax_pr.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1, label="prevalence")
        if predicted.any():
            op_precision = labels[predicted].mean()
            ax_pr.plot(op_tpr, op_precision, "o", color="C3", label=f"threshold {threshold:.3g}")
        ax_roc.legend(loc="lower right")
        ax_pr.legend(loc="lower left")
    ax_roc.set(
        xlabel="false-positive rate (1 - specificity)",
        ylabel="true-positive rate (sensitivity)",
        title="Classifier ROC (slices)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax_pr.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Classifier precision-recall (slices)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    return _save(fig, path)


def plot_confusion_matrix(
    tn: int, fp: int, fn: int, tp: int, threshold: float, path: str | os.PathLike
) -> Path:
    """The classifier's 2x2 slice confusion matrix (rows: truth, columns: prediction) with counts."""
    matrix = np.array([[tn, fp], [fn, tp]])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(matrix, cmap="Blues")
    names = ["no tumour", "tumour"]
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(
        xlabel="predicted",
        ylabel="ground truth",
        title=f"Classifier confusion matrix\n(threshold {threshold:.3g})",
    )
    top = matrix.max() if matrix.size else 0
    for (r, c), value in np.ndenumerate(matrix):
        ax.text(
            c,
            r,
            str(int(value)),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if value > top / 2 else "black",
        )
    return _save(fig, path)


def plot_patient_dice(
    end_to_end: Sequence[float], segmenter_alone: Sequence[float], path: str | os.PathLike
) -> Path:
    """Distribution of per-patient volume Dice: end-to-end pipeline vs segmenter alone.

    A box plot with every patient drawn as a point (jittered), so that single bad patients
    stay visible; the two series are per-patient lists of equal length.
    """
    series = [np.asarray(end_to_end, dtype=float), np.asarray(segmenter_alone, dtype=float)]
    names = ["end-to-end pipeline", "segmenter alone"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.boxplot(series, showmeans=True, showfliers=False, widths=0.5)  # every point is drawn below
    ax.set_xticks([1, 2], names)
    rng = np.random.default_rng(0)  # fixed jitter: the same report draws the same figure
    for i, values in enumerate(series, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.6, color=f"C{i - 1}")
    ax.set(
        ylabel="per-patient volume Dice",
        ylim=(-0.02, 1.02),
        title="Per-patient Dice (mean marked by a triangle)",
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@dataclass(frozen=True)
class OverlayPanel:
    """One panel of the overlay grid: a raw slice, its ground truth and prediction, and a title."""

    image: np.ndarray  # uint8 (H, W, 3), file channel order
    truth: np.ndarray  # (H, W) 0/1
    prediction: np.ndarray  # (H, W) 0/1
    title: str


def _mpl_color(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in rgb)


def plot_overlay_grid(rows: Sequence[tuple[str, Sequence[OverlayPanel]]], path: str | os.PathLike) -> Path:
    """A grid of slices: each row is `(label, panels)`; FLAIR in grey, truth and prediction contours.

    Contours are drawn by `pipeline.inference.overlays.overlay` (the look of `diagnose`):
    ground truth in green, prediction in red, so misses and false alarms read at a glance;
    the title of each panel carries the patient and its Dice.
    """
    n_rows = max(len(rows), 1)
    n_cols = max((len(panels) for _, panels in rows), default=1) or 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.5 * n_rows), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels):
                continue
            panel = panels[c]
            ax.imshow(
                overlay(
                    panel.image,
                    {"truth": (panel.truth, TRUTH_COLOR), "prediction": (panel.prediction, PREDICTION_COLOR)},
                    thickness=max(1, round(panel.image.shape[0] / 128)),  # 2 px on 256-px slices: legible
                )
            )
            ax.set_title(panel.title, fontsize=8)
        axes[r][0].text(
            -0.08,
            0.5,
            label,
            transform=axes[r][0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=11,
            fontweight="bold",
        )
    if not rows:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no patients", ha="center", va="center")
    handles = [
        plt.Line2D([], [], color=_mpl_color(TRUTH_COLOR), label="ground truth"),
        plt.Line2D([], [], color=_mpl_color(PREDICTION_COLOR), label="prediction (end-to-end)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Best and worst patients: slice with the largest tumour (FLAIR)")
    return _save(fig, path)


def pick_overlay_slice(patient_slices) -> int:
    """Position (into the evaluated arrays) of the slice to show for one patient.

    `patient_slices` is the patient's part of the report's slice table (its index holds the
    array positions). The slice with the largest ground-truth tumour; for a patient without
    tumour, the one with the largest predicted area (its false alarm); else the middle slice.
    """
    if patient_slices["gt_pixels"].max() > 0:
        return int(patient_slices["gt_pixels"].idxmax())
    if patient_slices["e2e_pred_pixels"].max() > 0:
        return int(patient_slices["e2e_pred_pixels"].idxmax())
    return int(patient_slices.index[len(patient_slices) // 2])


def overlay_grid_rows(
    slices, patients, images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, per_row: int = 4
) -> list[tuple[str, list[OverlayPanel]]]:
    """Rows "best" and "worst" of the overlay grid, ranked by end-to-end per-patient Dice.

    `slices`/`patients` are the report tables (`slices` indexed by array position); `images`,
    `masks`, `predictions` the evaluated arrays. With fewer than `2 * per_row` patients the
    two rows split them so that no patient appears twice.
    """
    ranked = patients.sort_values(["e2e_dice", "patient_id"], ascending=[False, True], na_position="last")
    ids = ranked["patient_id"].tolist()
    n_best = min(per_row, (len(ids) + 1) // 2)
    n_worst = min(per_row, len(ids) - n_best)
    groups = [("best", ids[:n_best]), ("worst", list(reversed(ids))[:n_worst])]
    dice = dict(zip(patients["patient_id"], patients["e2e_dice"], strict=True))
    rows = []
    for label, chosen in groups:
        panels = []
        for pid in chosen:
            pos = pick_overlay_slice(slices[slices["patient_id"] == pid])
            entry = slices.loc[pos]
            panels.append(
                OverlayPanel(
                    image=np.asarray(images[pos]),
                    truth=np.asarray(masks[pos]),
                    prediction=np.asarray(predictions[pos]),
                    title=(
                        f"{pid} slice {entry['slice']}\n"
                        f"patient Dice {dice[pid]:.3f}, slice Dice {entry['e2e_dice']:.3f}"
                    ),
                )
            )
        if panels:
            rows.append((label, panels))
    return rows
