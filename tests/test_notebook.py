"""notebooks/exploration.ipynb: committed executed and small, logic-free, run end to end on synthetic data.

The slow test runs the notebook with nbclient in a fresh kernel of *this* interpreter (a
kernelspec written to a temp dir that JUPYTER_PATH puts first), on the synthetic dataset with
an untrained tiny pair and a fake training run, so a change in the package that breaks a cell
fails here. The helpers of `pipeline.evaluation.exploration` are tested directly below it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.evaluation import exploration as ex
from pipeline.evaluation.evaluate import ModelSource

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "exploration.ipynb"
KERNEL_NAME = "python3"  # what the notebook's metadata names; resolved to this venv below
CELL_TIMEOUT = 120  # seconds per cell
TEST_PATIENTS = ("TCGA_AA_0002", "TCGA_BB_0003", "TCGA_CC_0006")  # one without tumour


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


# --------------------------------------------------------------------------- the committed file


def test_committed_notebook_is_valid_small_and_free_of_errors():
    """It is committed executed on the development copy (`python -m pipeline notebook`), so it reads
    with its figures on a repository page: at most 3 MB, and no cell may have failed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL_NAME
    assert NOTEBOOK.stat().st_size <= 3_000_000
    for cell in _code_cells(nb):
        assert all(out.output_type != "error" for out in cell.outputs), cell.source[:60]


def test_notebook_defines_no_logic_of_its_own():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        for line in cell.source.splitlines():
            stripped = line.lstrip()
            assert not stripped.startswith(("def ", "class ", "async def ", "lambda")), (
                f"logic defined in the notebook (move it to the pipeline package): {line!r}"
            )
    sources = "\n".join(cell.source for cell in _code_cells(nb))
    assert "from pipeline" in sources and "import *" not in sources


# --------------------------------------------------------------------------- executing it


def _write_split(pair: Path) -> Path:
    """Give `pair` a split file putting three synthetic patients in the test split."""
    train = ("TCGA_AA_0001", "TCGA_BB_0004", "TCGA_CC_0005")
    lines = ["patient_id,split", *(f"{p},train" for p in train), *(f"{p},test" for p in TEST_PATIENTS)]
    (pair / "splits.csv").write_text("\n".join(lines) + "\n")
    return pair


@pytest.fixture(scope="module")
def tiny_pair_with_split(tiny_pair, tmp_path_factory) -> Path:
    """An untrained tiny pair (tests/model_helpers.py) with a split file: what the notebook loads."""
    from tests.model_helpers import copy_pair

    return _write_split(copy_pair(tiny_pair, tmp_path_factory.mktemp("notebook") / "pair"))


@pytest.fixture
def fake_pair(tmp_path) -> Path:
    """A folder that passes for a pair where only its `pipeline.json` and split file are read."""
    pair = tmp_path / "fake_pair"
    pair.mkdir()
    (pair / "pipeline.json").write_text("{}")
    return _write_split(pair)


def _history(path: Path, epochs: int, metric: str, **extra: float) -> None:
    rng = np.random.default_rng(epochs)
    frame = pd.DataFrame(
        {
            "epoch": range(epochs),
            "loss": np.linspace(0.7, 0.3, epochs),
            metric: np.linspace(0.6, 0.9, epochs),
            "val_loss": np.linspace(0.75, 0.4, epochs) + rng.uniform(0, 0.02, epochs),
            f"val_{metric}": np.linspace(0.55, 0.85, epochs),
            **{k: np.full(epochs, v) for k, v in extra.items()},
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def make_fake_run(run_dir: Path) -> Path:
    """A run folder as `make train` leaves it mid-way: per-phase classifier histories (no merged
    `history.csv` yet) and a finished segmenter with its merged history."""
    _history(run_dir / "classifier" / "history_head.csv", 3, "auc", learning_rate=1e-3)
    _history(run_dir / "classifier" / "history_finetune.csv", 2, "auc", learning_rate=1e-4)
    seg = run_dir / "segmenter" / "history.csv"
    _history(seg, 4, "dice")
    merged = pd.read_csv(seg)
    merged.insert(0, "phase", "train")
    merged.insert(0, "stage_epoch", range(len(merged)))
    merged.to_csv(seg, index=False)
    return run_dir


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A `python3` kernelspec running this interpreter, found first through JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    found = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert found.argv[0] == sys.executable, f"kernel {KERNEL_NAME!r} resolves to {found.argv}"
    return KERNEL_NAME


def _outputs(cell) -> tuple[str, int]:
    """All text a cell printed or displayed (streams, text/plain, text/html), and its PNG count."""
    texts, pngs = [], 0
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            texts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            texts.append(str(out.data.get("text/plain", "")) + str(out.data.get("text/html", "")))
            pngs += "image/png" in out.data
    return "\n".join(texts), pngs


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_synthetic_data(
    synthetic_root, tiny_pair_with_split, venv_kernel, tmp_path, monkeypatch
):
    from nbclient import NotebookClient

    run_dir = make_fake_run(tmp_path / "runs" / "20260101-000000")
    monkeypatch.setenv("LGG_DATA_DIR", str(synthetic_root))
    monkeypatch.setenv("LGG_MODELS_DIR", str(tiny_pair_with_split))
    monkeypatch.setenv("LGG_RUN_DIR", str(run_dir))
    monkeypatch.setenv("LGG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's scratch folder lands in tmp_path

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=venv_kernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # cwd = the notebook folder
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    cells = _code_cells(nb)
    for cell in cells:
        assert not [o for o in cell.outputs if o.output_type == "error"]
    text = "\n".join(_outputs(c)[0] for c in cells)
    n_png = sum(_outputs(c)[1] for c in cells)

    # The configuration came from the environment, as the commands read it.
    assert f"data root : {synthetic_root}" in text
    assert f"models    : {tiny_pair_with_split}" in text and f"run       : {run_dir}" in text
    # The dataset section counted the synthetic dataset (tests/synthetic.py: 6 patients, 50 slices).
    assert "patients: 6" in text and "slices: 50" in text and "tumor_slices: 23" in text
    assert "TCGA_BB_0004" in text  # the patient table lists the patient with most tumour slices
    # Curves from the fake run, including the classifier still mid-training (per-phase files).
    assert len(list(tmp_path.glob("lgg-notebook-*/curves_classifier.png"))) == 1
    assert "val_auc" in text and "val_dice" in text
    # The evaluation used the pair's split file: its 3 test patients only.
    assert "test split: 3 patients" in text and "evaluated patients: 3" in text
    assert "End-to-end mean per-patient Dice" in text
    assert "per-slice Dice, tumour slices only" in text and "both empty" in text
    assert "Grad-CAM of TCGA_" in text
    # 5 dataset figures, 2 training curves, ROC/PR, confusion matrix, patient Dice, overlays, Grad-CAM.
    assert n_png == 12, f"{n_png} images displayed"


# --------------------------------------------------------------------------- the helpers


@pytest.fixture(scope="module")
def index_df(synthetic_root, tmp_path_factory):
    from pipeline.data.index import index_dataset

    return index_dataset(synthetic_root, cache_dir=tmp_path_factory.mktemp("cache"))


def test_patient_table_counts_slices_and_tumour(index_df):
    table = ex.patient_table(index_df).set_index("patient_id")
    assert table.loc["TCGA_BB_0004", "slices"] == 12 and table.loc["TCGA_BB_0004", "tumour_slices"] == 8
    assert table.loc["TCGA_BB_0003", "tumour_slices"] == 0 and table.loc["TCGA_BB_0003", "tumour_pixels"] == 0
    assert table["slices"].sum() == len(index_df)
    assert table["tumour_pixels"].sum() == index_df["tumor_pixels"].sum()
    assert table.loc["TCGA_CC_0005", "tumour_fraction"] == pytest.approx(3 / 8)


def test_example_slices_are_largest_tumours_of_distinct_patients(index_df):
    rows = ex.example_slices(index_df, n=4)
    assert len(rows) == 4 and rows["patient_id"].is_unique and rows["has_tumor"].all()
    for _, row in rows.iterrows():
        patient = index_df[index_df["patient_id"] == row["patient_id"]]
        assert row["tumor_pixels"] == patient["tumor_pixels"].max()
    assert rows["tumor_pixels"].is_monotonic_increasing  # small to large
    # more than there are tumour patients: each tumour patient once
    assert len(ex.example_slices(index_df, n=50)) == 5


def test_dataset_figures_have_their_panels(index_df):
    assert len(ex.plot_tumour_balance(index_df).axes) == 2
    assert len(ex.plot_channels(ex.example_slices(index_df, n=2)).axes) == 2 * 4
    figure = ex.plot_patient_slices(index_df, "TCGA_BB_0004", n=8)
    assert "TCGA_BB_0004: 8 of 12 slices" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="no slices"):
        ex.plot_patient_slices(index_df, "TCGA_XX_9999")


def test_stage_history_prefers_the_merged_file_and_falls_back_to_phases(tmp_path):
    run = make_fake_run(tmp_path / "run")
    classifier = ex.stage_history(run, "classifier")
    assert classifier["phase"].tolist() == ["head"] * 3 + ["finetune"] * 2
    assert classifier["stage_epoch"].tolist() == list(range(5))
    assert len(ex.stage_history(run, "segmenter")) == 4
    assert ex.stage_history(tmp_path / "empty", "segmenter").empty
    summary = ex.training_summary(run).set_index("stage")
    assert summary.loc["classifier", "epochs"] == 5
    assert summary.loc["classifier", "phases"] == "head, finetune"
    assert summary.loc["segmenter", "best_epoch"] == 4  # val_dice rises every epoch in the fake run
    written = ex.training_curves(run, tmp_path / "out")
    assert set(written) == {"classifier", "segmenter"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written.values())
    with pytest.raises(ValueError, match="unknown stage"):
        ex.stage_history(run, "detector")


def test_a_final_model_without_validation_is_summarised_without_a_best_epoch(tmp_path):
    """`--fold all` trains on every patient: its history's validation columns are all empty."""
    run = make_fake_run(tmp_path / "run")
    seg = run / "segmenter" / "history.csv"
    history = pd.read_csv(seg)
    history["val_dice"] = float("nan")
    history.to_csv(seg, index=False)
    summary = ex.training_summary(run).set_index("stage")
    assert summary.loc["segmenter", "epochs"] == 4
    assert summary.loc["segmenter", "monitor"].startswith("none")
    assert pd.isna(summary.loc["segmenter", "best_epoch"])
    assert summary.loc["classifier", "best_epoch"] >= 1  # the validated stage keeps its best epoch


def test_run_dir_resolution_order(tmp_path, fake_pair):
    runs = tmp_path / "runs"
    (runs / "20260101-000000").mkdir(parents=True)
    (runs / "LATEST").write_text("20260101-000000\n")
    pair = ModelSource(fake_pair)
    assert ex.resolve_run_dir(str(tmp_path / "given"), pair, runs)[0] == tmp_path / "given"
    from_run = ModelSource(fake_pair, tmp_path / "its_run")
    assert ex.resolve_run_dir(None, from_run, runs)[0] == tmp_path / "its_run"
    assert ex.resolve_run_dir(None, pair, runs)[0] == runs / "20260101-000000"
    run_dir, note = ex.resolve_run_dir(None, pair, tmp_path / "no_runs")
    assert run_dir is None and "curves are skipped" in note


def test_notebook_config_reads_the_environment(tmp_path, monkeypatch, synthetic_root, fake_pair):
    monkeypatch.setenv("LGG_DATA_DIR", str(synthetic_root))
    monkeypatch.setenv("LGG_MODELS_DIR", str(fake_pair))
    monkeypatch.setenv("LGG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LGG_RUN_DIR", raising=False)
    config = ex.notebook_config(runs_dir=tmp_path / "no_runs")
    assert config.data_dir == synthetic_root.resolve() and config.cache_dir == tmp_path / "cache"
    assert config.models.pair_dir == fake_pair and config.run_dir is None
    assert "curves are skipped" in config.describe()
    monkeypatch.setenv("LGG_MODELS_DIR", str(tmp_path))  # not a pair
    with pytest.raises(DataError, match="not a model pair"):
        ex.notebook_config(runs_dir=tmp_path / "no_runs")


def test_choose_split_uses_test_patients_or_falls_back_to_all(index_df, tmp_path, fake_pair):
    chosen = ex.choose_split(index_df, ModelSource(fake_pair))
    assert chosen.name == "test" and chosen.path == fake_pair / "splits.csv"
    other = tmp_path / "other_pair"
    other.mkdir()
    (other / "splits.csv").write_text("patient_id,split\nTCGA_ZZ_0001,train\nTCGA_ZZ_0002,test\n")
    fallback = ex.choose_split(index_df, ModelSource(other))
    assert fallback.name == "all" and fallback.path is None and "all 6 patients" in fallback.note


def test_dice_comparison_keeps_units_apart():
    report = {
        "patient_dice": {
            "n_patients": 3,
            "end_to_end": {"mean": 0.5, "median": 0.6},
            "segmenter_alone": {"mean": 0.4, "median": 0.45},
        },
        "segmenter_tumor_slices": {"n_slices": 10, "dice": {"mean": 0.7, "median": 0.8}},
    }
    table = ex.dice_comparison(report)
    assert table["unit"].tolist() == ["patients", "patients", "slices"]
    assert table["n"].tolist() == [3, 3, 10] and table["mean"].tolist() == [0.5, 0.4, 0.7]


def test_pick_gradcam_slice_prefers_the_surest_tumour_slice():
    slices = pd.DataFrame(
        {
            "case": ["A", "A", "B", "B"],
            "slice": [1, 2, 1, 2],
            "has_tumor": [False, True, True, True],
            "probability": [0.99, 0.7, 0.9, 0.9],
            "gt_pixels": [0, 50, 20, 80],
        }
    )
    entry = ex.pick_gradcam_slice(slices)
    assert (entry["case"], entry["slice"]) == ("B", 2)  # tie on probability -> larger tumour
    no_tumour = slices.assign(has_tumor=False)
    assert ex.pick_gradcam_slice(no_tumour)["probability"] == 0.99
