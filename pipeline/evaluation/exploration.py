"""What `notebooks/exploration.ipynb` shows: dataset summaries, example slices, training curves, Grad-CAM.

The notebook only calls this module and the rest of the package, so nothing it shows is
computed by code that lives in the notebook alone (and `tests/test_notebook.py` runs it
end to end). Three groups:

- configuration: `notebook_config()` resolves the data root, the model pair and the training
  run from the environment, the way the commands do (`LGG_DATA_DIR`, `LGG_MODELS_DIR`,
  `LGG_RUN_DIR`, `LGG_CACHE_DIR`);
- the dataset: per-patient table, slices per patient, tumour balance, tumour sizes, the three
  channels of a few slices and mask overlays through one patient's volume;
- the models: training curves from a run's `history.csv`, which patients to evaluate
  (`choose_split`), per-patient volume Dice next to per-slice Dice, and a Grad-CAM panel.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, no pyplot), so
nothing depends on the backend another module selected; `show(fig)` displays one in Jupyter.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.data.tiff_io import read_pair, tiff_shape
from pipeline.errors import DataError
from pipeline.inference.overlays import TRUTH_COLOR, heatmap_overlay, overlay
from pipeline.paths import DATA_DIR_ENV, RUNS_DIR, resolve_cache_dir, resolve_data_dir
from pipeline.preprocessing import CHANNELS, FLAIR_CHANNEL

__all__ = [
    "MODELS_DIR_ENV",
    "RUN_DIR_ENV",
    "EvaluationSplit",
    "NotebookConfig",
    "choose_split",
    "dice_comparison",
    "example_slices",
    "load_slice",
    "notebook_config",
    "patient_table",
    "pick_gradcam_slice",
    "plot_channels",
    "plot_gradcam",
    "plot_patient_slices",
    "plot_slices_per_patient",
    "plot_tumour_balance",
    "plot_tumour_sizes",
    "resolve_run_dir",
    "show",
    "stage_history",
    "training_curves",
    "training_summary",
]

MODELS_DIR_ENV = "LGG_MODELS_DIR"
RUN_DIR_ENV = "LGG_RUN_DIR"

# Training stages of a run: their per-phase history files (in training order) and the
# validation metric each is selected on (see pipeline/training/*_training.py).
STAGE_PHASES: dict[str, tuple[str, ...]] = {"classifier": ("head", "finetune"), "segmenter": ("train",)}
STAGE_METRIC: dict[str, str] = {"classifier": "auc", "segmenter": "dice"}
MERGED_HISTORY = "history.csv"

GREY = {"cmap": "gray", "vmin": 0, "vmax": 255}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NotebookConfig:
    """Where the notebook reads from.

    data_dir: dataset root (`resolve_data_dir`: `$LGG_DATA_DIR`, else `data/kaggle_3m`).
    cache_dir: index and array cache (`resolve_cache_dir`: `$LGG_CACHE_DIR`, else `.cache/`).
    models: the model pair (`pipeline.paths.PairSource`).
    run_dir: the training run whose curves are shown, or None when there is none.
    notes: how each choice was made, for the reader.
    """

    data_dir: Path
    cache_dir: Path
    models: Any  # pipeline.paths.PairSource
    run_dir: Path | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """Multi-line text naming every location and why it was chosen."""
        lines = [
            f"data root : {self.data_dir}",
            f"cache     : {self.cache_dir}",
            f"models    : {self.models.pair_dir}",
            f"run       : {self.run_dir if self.run_dir is not None else '(none)'}",
        ]
        return "\n".join(lines + [f"  - {note}" for note in self.notes])


def resolve_run_dir(
    flag: str | os.PathLike | None, models: Any = None, runs_dir: str | os.PathLike = RUNS_DIR
) -> tuple[Path | None, str]:
    """The training run for the curves and why: `flag` (`$LGG_RUN_DIR`) > the run the models came
    from (`models.run_dir`, else the `run_dir` recorded in the pair's `pipeline.json` if it exists
    here) > `<runs_dir>/LATEST` > None. Returns `(run_dir or None, note)`.

    A run still training counts: its curves are read from the per-phase histories.
    """
    from pipeline.paths import from_project, latest_run

    if flag:
        return Path(flag).expanduser(), f"run from ${RUN_DIR_ENV}"
    if models is not None and getattr(models, "run_dir", None) is not None:
        return Path(models.run_dir), "run the models were loaded from"
    if models is not None:
        from pipeline.models.pair_artifact import read_pair_record

        try:
            recorded = read_pair_record(models.pair_dir).get("run_dir")
        except DataError:
            recorded = None
        if isinstance(recorded, str) and recorded and from_project(recorded).is_dir():
            return from_project(recorded), "run recorded in the pair's pipeline.json"
    latest = latest_run(runs_dir)
    if latest is not None:
        return latest, f"latest run ({Path(runs_dir) / 'LATEST'})"
    return None, f"no training run found (set ${RUN_DIR_ENV} or run `make train`): curves are skipped"


def notebook_config(runs_dir: str | os.PathLike = RUNS_DIR) -> NotebookConfig:
    """Resolve data root, cache, model pair and training run from the environment.

    Models: `$LGG_MODELS_DIR` (a pair directory), else the rule of every command
    (`pipeline.paths.resolve_pair`: `models/` if it holds a pair, else the latest run holding
    one; DataError when none does).
    Run: see `resolve_run_dir`.
    """
    from pipeline.paths import resolve_pair

    models_flag = os.environ.get(MODELS_DIR_ENV) or None
    source = resolve_pair(models=models_flag, runs_dir=runs_dir)
    notes = [
        f"data root from ${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "default data root",
        f"models from ${MODELS_DIR_ENV}"
        if models_flag
        else ("models of the latest run" if source.run_dir else "models from models/"),
    ]
    run_dir, run_note = resolve_run_dir(os.environ.get(RUN_DIR_ENV), source, runs_dir)
    return NotebookConfig(
        data_dir=resolve_data_dir(),
        cache_dir=resolve_cache_dir(),
        models=source,
        run_dir=run_dir,
        notes=(*notes, run_note),
    )


# --------------------------------------------------------------------------- the dataset


def patient_table(index_df: pd.DataFrame) -> pd.DataFrame:
    """Index frame -> one row per patient (sorted by id).

    Columns: `patient_id`, `slices`, `tumour_slices`, `tumour_fraction` (tumour slices / slices),
    `tumour_pixels` (summed over the patient's masks: the tumour volume in voxels).
    """
    groups = index_df.groupby("patient_id", sort=True)
    table = pd.DataFrame(
        {
            "slices": groups.size(),
            "tumour_slices": groups["has_tumor"].sum().astype(int),
            "tumour_pixels": groups["tumor_pixels"].sum().astype(int),
        }
    )
    table.insert(2, "tumour_fraction", table["tumour_slices"] / table["slices"])
    return table.reset_index()


def plot_slices_per_patient(index_df: pd.DataFrame) -> Figure:
    """Histogram of slices per patient, all slices and tumour slices, medians in the legend."""
    table = patient_table(index_df)
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    top = int(table["slices"].max())
    bins = np.arange(0, top + 2) - 0.5 if top <= 40 else 20
    for column, label, color in (("slices", "all slices", "C0"), ("tumour_slices", "tumour slices", "C3")):
        values = table[column]
        ax.hist(values, bins=bins, alpha=0.6, color=color, label=f"{label} (median {values.median():g})")
    title = f"Slices per patient ({len(table)} patients)"
    ax.set(xlabel="slices per patient", ylabel="patients", title=title)
    ax.legend()
    return fig


def plot_tumour_balance(index_df: pd.DataFrame) -> Figure:
    """Bars of tumour vs no-tumour slices and of patients with vs without any tumour slice, labelled
    with counts and shares."""
    table = patient_table(index_df)
    groups = {
        "slices": (int(index_df["has_tumor"].sum()), int((~index_df["has_tumor"]).sum())),
        "patients": (int((table["tumour_slices"] > 0).sum()), int((table["tumour_slices"] == 0).sum())),
    }
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    for ax, (name, (tumour, empty)) in zip(fig.subplots(1, 2), groups.items(), strict=True):
        bars = ax.bar(["tumour", "no tumour"], [tumour, empty], color=["C3", "C0"])
        total = max(tumour + empty, 1)
        ax.bar_label(bars, labels=[f"{v} ({100 * v / total:.0f}%)" for v in (tumour, empty)])
        ax.set(ylabel=name, title=f"{name.capitalize()} with / without tumour")
        ax.margins(y=0.15)
    return fig


def plot_tumour_sizes(index_df: pd.DataFrame) -> Figure:
    """Tumour size distributions: area per tumour slice (pixels, and % of the slice) and tumour
    volume per patient (pixels summed over its slices), with medians marked."""
    tumour = index_df.loc[index_df["has_tumor"], "tumor_pixels"].to_numpy()
    volumes = patient_table(index_df).query("tumour_pixels > 0")["tumour_pixels"].to_numpy()
    height, width = tiff_shape(index_df["mask_path"].iloc[0])[:2]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_slice, ax_patient = fig.subplots(1, 2)
    for ax, values, what in ((ax_slice, tumour, "tumour slices"), (ax_patient, volumes, "patients")):
        if len(values) == 0:
            ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="C3", alpha=0.75)
        median = float(np.median(values))
        ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:,.0f} px")
        ax.legend()
    share = 100 * np.median(tumour) / (height * width) if len(tumour) else float("nan")
    ax_slice.set(
        xlabel="tumour area per slice (pixels)",
        ylabel="slices",
        title=f"Tumour area on {len(tumour)} tumour slices\n"
        f"(median {share:.1f}% of a {height}x{width} slice)",
    )
    ax_patient.set(
        xlabel="tumour volume per patient (pixels over all slices)",
        ylabel="patients",
        title=f"Tumour volume of {len(volumes)} patients",
    )
    return fig


def load_slice(row: Mapping[str, Any] | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An index row -> (image uint8 (H, W, 3) in file channel order, mask uint8 (H, W) 0/1)."""
    return read_pair(row["image_path"], row["mask_path"])


def example_slices(index_df: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """`n` index rows to look at: each patient's largest-tumour slice, patients picked evenly over
    the range of those sizes (small to large tumours). Without tumour slices, the middle slice of
    the first `n` patients."""
    tumour = index_df[index_df["has_tumor"]]
    if tumour.empty:
        middle = [group.index[len(group) // 2] for _, group in index_df.groupby("patient_id", sort=True)]
        return index_df.loc[middle[:n]]
    largest = tumour.loc[tumour.groupby("patient_id")["tumor_pixels"].idxmax()]
    largest = largest.sort_values(["tumor_pixels", "patient_id"], kind="stable")
    picks = np.unique(np.linspace(0, len(largest) - 1, min(n, len(largest))).round().astype(int))
    return largest.iloc[picks]


def _slice_label(row: Mapping[str, Any] | pd.Series) -> str:
    return f"{row['patient_id']} slice {row['slice']}\n{int(row['tumor_pixels'])} tumour px"


def plot_channels(rows: pd.DataFrame) -> Figure:
    """One row per index row: pre-contrast, FLAIR, post-contrast (file order, `CHANNELS`) and the
    FLAIR with the ground-truth mask contour in green."""
    fig = Figure(figsize=(11, 2.9 * max(len(rows), 1)), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), len(CHANNELS) + 1, squeeze=False)
    for r, (_, row) in enumerate(rows.iterrows()):
        image, mask = load_slice(row)
        for c, name in enumerate(CHANNELS):
            axes[r][c].imshow(image[..., c], **GREY)
            weight = "bold" if c == FLAIR_CHANNEL else "normal"  # FLAIR shows the LGG abnormality
            axes[r][c].set_title(f"{name} (channel {c})", fontsize=9, fontweight=weight)
        axes[r][-1].imshow(overlay(image, {"tumour mask": (mask, TRUTH_COLOR)}, thickness=1))
        axes[r][-1].set_title("FLAIR + ground-truth contour", fontsize=9)
        axes[r][0].set_ylabel(_slice_label(row), fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_patient_slices(index_df: pd.DataFrame, patient_id: str | None = None, n: int = 8) -> Figure:
    """`n` slices evenly spaced through one patient's volume (default: the patient with the most
    tumour slices), FLAIR with the mask contour: the tumour appears, grows and vanishes."""
    if patient_id is None:
        patient_id = patient_table(index_df).sort_values(
            ["tumour_slices", "patient_id"], ascending=[False, True]
        )["patient_id"].iloc[0]
    rows = index_df[index_df["patient_id"] == patient_id]
    if rows.empty:
        raise ValueError(f"no slices of patient {patient_id!r} in the index")
    picks = rows.iloc[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))]
    n_cols = min(4, len(picks))
    n_rows = -(-len(picks) // n_cols)
    fig = Figure(figsize=(2.8 * n_cols, 3.0 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (_, row) in zip(axes, picks.iterrows(), strict=False):
        image, mask = load_slice(row)
        ax.imshow(overlay(image, {"tumour mask": (mask, TRUTH_COLOR)}, thickness=1))
        ax.set_title(f"slice {row['slice']}: {int(row['tumor_pixels'])} px", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{patient_id}: {len(picks)} of {len(rows)} slices (FLAIR, ground truth in green)")
    return fig


# --------------------------------------------------------------------------- training curves


def stage_history(run_dir: str | os.PathLike, stage: str) -> pd.DataFrame:
    """One stage's training history: `<run>/<stage>/history.csv`, else (a run still training) its
    per-phase `history_<phase>.csv` files concatenated in training order with a `phase` column.
    Empty frame when the stage has no finished epoch yet."""
    if stage not in STAGE_PHASES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGE_PHASES)}")
    stage_dir = Path(run_dir) / stage
    merged = stage_dir / MERGED_HISTORY
    if merged.is_file():
        return pd.read_csv(merged)
    frames = []
    for phase in STAGE_PHASES[stage]:
        path = stage_dir / f"history_{phase}.csv"  # pipeline.training.callbacks.history_path
        if path.is_file():
            frame = pd.read_csv(path)
            if len(frame):
                frames.append(frame.assign(phase=phase))
    if not frames:
        return pd.DataFrame()
    history = pd.concat(frames, ignore_index=True)
    history.insert(0, "stage_epoch", range(len(history)))
    return history


def training_curves(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Loss and validation-metric curves of each stage with a history, as PNGs in `out_dir`
    (drawn by `pipeline.training.callbacks.plot_curves`, the figure `make train` writes).
    Returns stage -> PNG path; stages without a finished epoch are left out."""
    from pipeline.training.callbacks import plot_curves

    written = {}
    for stage, metric in STAGE_METRIC.items():
        history = stage_history(run_dir, stage)
        if history.empty:
            continue
        written[stage] = plot_curves(
            history.to_dict("records"),
            metric,
            Path(out_dir) / f"curves_{stage}.png",
            f"{stage}: loss and {metric} per epoch (validation dashed)",
        )
    return written


def training_summary(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Per stage: epochs run, phases, best validation metric and the epoch (1-based) it was reached."""
    rows = []
    for stage, metric in STAGE_METRIC.items():
        history = stage_history(run_dir, stage)
        column = f"val_{metric}"
        if history.empty or column not in history:
            continue
        validated = history[column].notna().any()  # a final model (`--fold all`) validates on no patient
        rows.append(
            {
                "stage": stage,
                "epochs": len(history),
                "phases": ", ".join(dict.fromkeys(history.get("phase", pd.Series(dtype=str)).astype(str))),
                "monitor": column if validated else "none (no validation patients)",
                "best": float(history[column].max()) if validated else float("nan"),
                "best_epoch": int(history[column].idxmax()) + 1 if validated else None,
            }
        )
    return pd.DataFrame(rows, columns=["stage", "epochs", "phases", "monitor", "best", "best_epoch"])


# --------------------------------------------------------------------------- evaluation


class EvaluationSplit(NamedTuple):
    """Which patients the notebook evaluates: `name` for `evaluate(split=...)`, the split file
    (None for "all") and a sentence saying why."""

    name: str
    path: Path | None
    note: str


def choose_split(index_df: pd.DataFrame, models: Any) -> EvaluationSplit:
    """The test patients of the models' split file when it has some under this data root, else all
    patients (no split file, or one written for another data root, e.g. the synthetic test set).

    The split file is looked up as `make evaluate` does (`pipeline.data.splits.pair_splits_file`):
    the run's copy, the pair's, then `models/splits.csv`.
    """
    from pipeline.data.splits import load_splits, pair_splits_file

    n_all = index_df["patient_id"].nunique()
    path = pair_splits_file(None, models)
    if path is None:
        return EvaluationSplit("all", None, f"no split file: evaluating all {n_all} patients")
    splits = load_splits(path)
    test = set(splits.loc[splits["split"] == "test", "patient_id"]) & set(index_df["patient_id"])
    if not test:
        return EvaluationSplit(
            "all", None, f"the split file {path} has no test patient in this data root: all {n_all} patients"
        )
    return EvaluationSplit("test", path, f"test split: {len(test)} patients (split file {path})")


def dice_comparison(report: Mapping[str, Any]) -> pd.DataFrame:
    """The report's Dice numbers side by side, each with its unit: per-patient volume Dice (end to
    end, segmenter alone) and per-slice Dice of the segmenter on tumour slices only."""
    patient = report["patient_dice"]
    per_slice = report["segmenter_tumor_slices"]
    rows = [
        ("per-patient volume Dice", "end-to-end pipeline", "patients", patient["n_patients"],
         patient["end_to_end"]["mean"], patient["end_to_end"]["median"]),
        ("per-patient volume Dice", "segmenter alone", "patients", patient["n_patients"],
         patient["segmenter_alone"]["mean"], patient["segmenter_alone"]["median"]),
        ("per-slice Dice, tumour slices only", "segmenter alone", "slices", per_slice["n_slices"],
         per_slice["dice"]["mean"], per_slice["dice"]["median"]),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["measure", "prediction", "unit", "n", "mean", "median"])


def pick_gradcam_slice(slices: pd.DataFrame) -> pd.Series:
    """The evaluated slice to explain: the tumour slice the classifier is most sure of (largest
    tumour on ties), else the slice with the highest probability. `slices` is the evaluation's
    slice table (`slices.csv`: `case`, `slice`, `has_tumor`, `probability`, `gt_pixels`)."""
    if slices.empty:
        raise ValueError("no evaluated slices to pick from")
    candidates = slices[slices["has_tumor"].astype(bool)]
    if candidates.empty:
        candidates = slices
    ranked = candidates.sort_values(["probability", "gt_pixels"], ascending=False, kind="stable")
    return ranked.iloc[0]


def plot_gradcam(classifier: Any, index_df: pd.DataFrame, entry: Mapping[str, Any] | pd.Series) -> Figure:
    """Grad-CAM (`pipeline.inference.gradcam.grad_cam`) of the classifier on the slice `entry`
    names (`case`, `slice`): FLAIR with the ground truth, and the heatmap over it."""
    from pipeline.inference.gradcam import grad_cam

    match = index_df[(index_df["case"] == entry["case"]) & (index_df["slice"] == int(entry["slice"]))]
    if match.empty:
        raise ValueError(f"slice {entry['case']} {entry['slice']} is not in the index")
    image, mask = load_slice(match.iloc[0])
    heatmap = grad_cam(classifier, image)
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax_image, ax_cam = fig.subplots(1, 2)
    ax_image.imshow(overlay(image, {"ground truth": (mask, TRUTH_COLOR)}, thickness=1))
    ax_image.set_title("FLAIR + ground truth (green)", fontsize=9)
    ax_cam.imshow(heatmap_overlay(image, heatmap, alpha=0.45))
    if mask.any():
        ax_cam.contour(mask, levels=[0.5], colors=["white"], linewidths=0.8)
    probability = entry.get("probability") if hasattr(entry, "get") else None
    ax_cam.set_title(
        "Grad-CAM of the tumour logit"
        + (f" (p = {float(probability):.3f})" if probability is not None else ""),
        fontsize=9,
    )
    for ax in (ax_image, ax_cam):
        ax.axis("off")
    fig.suptitle(f"{entry['case']} slice {entry['slice']}")
    return fig


# --------------------------------------------------------------------------- display


def show(fig: Figure, dpi: int = 90) -> None:
    """Display `fig` as a PNG in Jupyter (works whatever matplotlib backend is active)."""
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    display(Image(data=buffer.getvalue()))
