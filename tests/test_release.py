"""The trained release: float16-stored weights loading as float32 models, drift check, size cap, sha256."""

from __future__ import annotations

import argparse
import copy
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.inference.image_loading import load_slice
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.models import release as release_mod
from pipeline.models.model_io import (
    CLASSIFIER_FILE,
    META_FILE,
    SEGMENTER_FILE,
    load_pair,
    read_pair_meta,
    sha256_of,
)
from pipeline.models.release import (
    SPLITS_FILE,
    SUMS_FILE,
    ProbeSpec,
    as_float32_model,
    export_release,
    probe_batch,
    verify_release,
)
from tests.inference_helpers import slice_images

SMALL_PROBE = ProbeSpec(n=6, size=64, seed=0)
SPLITS_TEXT = "patient_id,split\nTCGA_AA_0001,train\nTCGA_AA_0002,val\nTCGA_BB_0003,test\n"
RELEASE_FILES = {CLASSIFIER_FILE, SEGMENTER_FILE, SPLITS_FILE, META_FILE}


@pytest.fixture(scope="module")
def run_dir(tiny_pair, tmp_path_factory) -> Path:
    """A stand-in training run: the tiny float32 pair plus its split file."""
    from tests.model_helpers import copy_pair

    run = copy_pair(tiny_pair, tmp_path_factory.mktemp("runs") / "20250101-000000")
    (run / SPLITS_FILE).write_text(SPLITS_TEXT, encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def release(run_dir, tmp_path_factory) -> dict:
    """The float16 release of `run_dir` (shared, read-only: copy it before damaging it)."""
    return export_release(run_dir, tmp_path_factory.mktemp("release") / "models", probe=SMALL_PROBE)


@pytest.fixture(scope="module")
def original_pair(run_dir):
    """The run's float32 pair, loaded once (a ResNet50 load takes seconds)."""
    return load_pair(run_dir)


@pytest.fixture(scope="module")
def released_pipeline(release) -> TumorPipeline:
    """The release loaded the way `make diagnose` loads it."""
    return TumorPipeline.from_dir(release["out_dir"], batch_size=4)


def _mini_classifier():
    """A classifier-shaped model far lighter than ResNet50, for tests that only exercise the export logic."""
    import keras

    from pipeline.preprocessing import ClassifierPreprocess

    inputs = keras.Input((None, None, 3), name="image")
    x = ClassifierPreprocess(name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="mini_classifier")


@pytest.fixture(scope="module")
def mini_run_dir(tmp_path_factory) -> Path:
    """A run whose pair is a mini classifier and the tiny ResUNet: exports in about a second."""
    from pipeline.models.model_io import save_pair
    from tests.model_helpers import make_tiny_segmenter

    run = save_pair(tmp_path_factory.mktemp("runs") / "20250102-000000", _mini_classifier(),
                    make_tiny_segmenter(), {"threshold": 0.5, "segmenter_tile_size": 64, "policy": "float32"})
    (run / SPLITS_FILE).write_text(SPLITS_TEXT, encoding="utf-8")
    return run


def _outputs(classifier, segmenter, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float32)
    return np.asarray(classifier.predict_on_batch(x)), np.asarray(segmenter.predict_on_batch(x))


def _stored_dtypes(model_file: Path) -> set[str]:
    """Dtypes of the float tensors inside a .keras archive's weights file."""
    with zipfile.ZipFile(model_file) as archive:
        payload = archive.read("model.weights.h5")
    found: set[str] = set()
    with h5py.File(io.BytesIO(payload), "r") as h5:
        h5.visititems(lambda _, item: found.add(str(item.dtype))
                      if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None)
    return found


def _all_layers(model) -> list:
    """Every layer, nested models (the ResNet50 backbone) included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += _all_layers(layer)
    return found


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.slow
def test_float16_release_loads_as_float32_models_within_tolerance(run_dir, release, original_pair,
                                                                   released_pipeline):
    out = Path(release["out_dir"])
    for name in (CLASSIFIER_FILE, SEGMENTER_FILE):
        assert _stored_dtypes(out / name) == {"float16"}  # stored in 16 bits ...
    pair, original = released_pipeline, original_pair  # loaded by load_pair / TumorPipeline.from_dir
    for model in (pair.classifier, pair.segmenter):  # ... computing in 32
        assert {v.dtype for v in model.weights if "float" in v.dtype} == {"float32"}
        assert {layer.dtype_policy.name for layer in _all_layers(model)} == {"float32"}

    images = probe_batch(4, 64, seed=7)  # not the batch the export checked
    cls_new, seg_new = _outputs(pair.classifier, pair.segmenter, images)
    cls_ref, seg_ref = _outputs(original.classifier, original.segmenter, images)
    assert cls_new.dtype == seg_new.dtype == np.float32
    assert np.max(np.abs(cls_new - cls_ref)) <= 1e-2
    assert np.max(np.abs(seg_new - seg_ref)) <= 2e-2
    assert np.mean((seg_new > 0.5) == (seg_ref > 0.5)) >= 0.995

    info = pair.meta["release"]
    assert info["weights_dtype"] == "float16" and release["source_run"] == str(run_dir)
    assert "source_run" not in info  # a run outside the project: its absolute path is not recorded
    assert set(info["max_abs_diff"]) == {"classifier", "segmenter"}
    assert info["max_abs_diff"]["classifier"] <= 1e-2 and info["mask_agreement"] >= 0.995
    # The run's metadata travels with the release; the split file is the run's.
    assert pair.meta["threshold"] == original.meta["threshold"]
    assert pair.meta["segmenter_tile_size"] == original.meta["segmenter_tile_size"]
    assert (out / SPLITS_FILE).read_text(encoding="utf-8") == SPLITS_TEXT
    assert sorted(p.name for p in out.iterdir()) == sorted(RELEASE_FILES | {SUMS_FILE})  # no staging left


def test_release_files_are_about_half_the_float32_originals(run_dir, release):
    out = Path(release["out_dir"])
    for name in (CLASSIFIER_FILE, SEGMENTER_FILE):
        assert (out / name).stat().st_size < (run_dir / name).stat().st_size
    assert release["model_bytes"] < 0.6 * release["source_model_bytes"]
    assert release["model_bytes"] == sum((out / n).stat().st_size for n in (CLASSIFIER_FILE, SEGMENTER_FILE))


@pytest.mark.slow
def test_tumor_pipeline_from_the_release_takes_the_same_decisions(original_pair, released_pipeline,
                                                                  synthetic_root):
    images = [load_slice(p) for p in slice_images(synthetic_root)[:10]]
    settings = {"tile_size": released_pipeline.tile_size, "batch_size": 4}
    reference = TumorPipeline(original_pair.classifier, original_pair.segmenter, **settings)
    probabilities = np.sort(reference.classify(images))
    # Gate in the middle of the widest gap between slice probabilities, so that both sides hold
    # slices and the float16 drift (<= 1e-2, measured far less) cannot move a slice across.
    gaps = np.diff(probabilities)
    widest = int(np.argmax(gaps))
    assert gaps[widest] > 1e-3, f"tiny classifier gives near-identical probabilities: {probabilities}"
    threshold = float(probabilities[widest] + gaps[widest] / 2)

    reference.threshold = threshold
    released = copy.copy(released_pipeline)  # the shared fixture keeps its own threshold
    released.threshold = threshold
    expected, got = reference.predict(images), released.predict(images)
    assert [r.is_tumor for r in got] == [r.is_tumor for r in expected]
    assert any(r.is_tumor for r in got) and not all(r.is_tumor for r in got)
    for a, b in zip(got, expected, strict=True):
        assert abs(a.probability - b.probability) <= 1e-2
        assert np.mean(a.mask == b.mask) >= 0.99


def test_sha256sums_lists_every_file_and_matches(release):
    out = Path(release["out_dir"])
    lines = (out / SUMS_FILE).read_text(encoding="utf-8").splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert set(listed) == RELEASE_FILES
    assert all(listed[name] == sha256_of(out / name) for name in listed)
    meta_hashes = read_pair_meta(out).sha256
    assert meta_hashes == {n: listed[n] for n in (CLASSIFIER_FILE, SEGMENTER_FILE, SPLITS_FILE)}
    assert verify_release(out) == listed
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", SUMS_FILE], cwd=out, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_flipped_byte_is_refused_naming_the_file(release, tmp_path):
    copied = Path(shutil.copytree(release["out_dir"], tmp_path / "models"))
    damaged = copied / CLASSIFIER_FILE  # checked before anything is loaded
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    with pytest.raises(DataError, match="sha256 mismatch") as err:
        load_pair(copied)
    assert str(damaged) in str(err.value)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        TumorPipeline.from_dir(copied)
    assert str(damaged) in str(err.value)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        verify_release(copied)
    assert err.value.files == [str(damaged)]


def test_a_damaged_split_file_is_found_by_verify_release(release, tmp_path):
    copied = Path(shutil.copytree(release["out_dir"], tmp_path / "models"))
    (copied / SPLITS_FILE).write_text(SPLITS_TEXT.replace("test", "train"), encoding="utf-8")
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        verify_release(copied)
    assert err.value.files == [str(copied / SPLITS_FILE)]


def test_the_size_cap_refuses_naming_files_and_sizes(mini_run_dir, tmp_path):
    out = tmp_path / "models"
    with pytest.raises(DataError, match="too large") as err:
        export_release(mini_run_dir, out, probe=SMALL_PROBE, max_total_bytes=100_000)
    message = str(err.value)
    assert f"{CLASSIFIER_FILE} " in message and f"{SEGMENTER_FILE} " in message and "MB" in message
    assert "> 0.1 MB" in message
    assert _leftovers(out) == []  # nothing written, no staging folder left


def test_drift_beyond_tolerance_refuses_with_the_measured_numbers(mini_run_dir, tmp_path, monkeypatch):
    real = release_mod._storage_array

    def corrupting(data, dtype):  # a storage bug: kernels come back twice as large
        stored = real(data, dtype)
        return stored * 2 if stored.ndim >= 2 else stored

    monkeypatch.setattr(release_mod, "_storage_array", corrupting)
    out = tmp_path / "models"
    with pytest.raises(DataError, match="beyond tolerance") as err:
        export_release(mini_run_dir, out, probe=SMALL_PROBE)
    message = str(err.value)
    assert "classifier probability max abs diff" in message or "segmenter probability max abs diff" in message
    assert any(ch.isdigit() for ch in message.split("max abs diff", 1)[1][:12])
    assert _leftovers(out) == []


def test_an_existing_release_or_a_different_split_needs_force(run_dir, release, tmp_path):
    with pytest.raises(FileExistsError, match="force"):
        export_release(run_dir, release["out_dir"], probe=SMALL_PROBE)
    out = tmp_path / "models"
    out.mkdir()
    (out / SPLITS_FILE).write_text("patient_id,split\nOTHER,train\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="differs"):
        export_release(run_dir, out, probe=SMALL_PROBE)
    assert _leftovers(out) == [SPLITS_FILE]


def test_the_command_replaces_a_release_with_force_and_prints_sizes_and_hashes(mini_run_dir, tmp_path,
                                                                              capsys):
    from pipeline.commands import release as command

    out = tmp_path / "models"
    export_release(mini_run_dir, out, probe=SMALL_PROBE)  # float16, replaced below
    args = argparse.Namespace(run=str(mini_run_dir), out=str(out), weights_dtype="float32", force=False,
                              max_mb=100.0, probe_size=32, probe_n=2, probe_images=None)
    assert command.run(args) == 2
    assert "force" in capsys.readouterr().err

    stale = out / "openvino" / "segmenter.int8.xml"  # the replaced release's INT8 copy
    stale.parent.mkdir()
    stale.write_text("<net/>")
    args.force = True
    assert command.run(args) == 0
    assert not stale.parent.exists()
    printed = capsys.readouterr().out
    for name in RELEASE_FILES:
        assert f"{sha256_of(out / name)}  {name}" in printed
    assert "max abs diff" in printed and "MB" in printed
    pair = load_pair(out)
    assert pair.meta["release"]["weights_dtype"] == "float32"
    assert pair.meta["release"]["max_abs_diff"] == {"classifier": 0.0, "segmenter": 0.0}
    assert _stored_dtypes(out / CLASSIFIER_FILE) == {"float32"}
    verify_release(out)


def test_the_command_defaults_write_float16_into_models(tmp_path):
    from pipeline.commands import release as command
    from pipeline.paths import PROJECT_ROOT

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.run, Path(args.out), args.weights_dtype, args.force) == (None, PROJECT_ROOT / "models",
                                                                       "float16", False)
    args = parser.parse_args(["--run", str(tmp_path), "--weights-dtype", "float32", "--force"])
    assert (args.run, args.weights_dtype, args.force) == (str(tmp_path), "float32", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights-dtype", "bfloat16"])


def test_the_command_without_a_run_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from pipeline.commands import release as command

    monkeypatch.setattr(command, "_default_run", lambda: None)
    args = argparse.Namespace(run=None, out=str(tmp_path / "models"), weights_dtype="float16", force=False,
                              max_mb=100.0, probe_size=256, probe_n=8, probe_images=None)
    assert command.run(args) == 2
    assert "--run" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_a_mixed_precision_model_is_rebuilt_to_compute_in_float32():
    import keras

    from tests.model_helpers import make_tiny_segmenter

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = make_tiny_segmenter()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert "mixed_float16" in {layer.dtype_policy.name for layer in mixed.layers}

    rebuilt = as_float32_model(mixed)
    assert {layer.dtype_policy.name for layer in rebuilt.layers} == {"float32"}
    for a, b in zip(rebuilt.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert as_float32_model(rebuilt) is rebuilt  # already float32: used as is


def test_the_probe_batch_is_deterministic_and_half_of_it_has_a_tumour():
    a, b = probe_batch(6, 64, seed=3), probe_batch(6, 64, seed=3)
    assert a.dtype == np.uint8 and a.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, probe_batch(6, 64, seed=4))
    flair = a[..., 1].reshape(6, -1).astype(float)
    excess = [f.max() - np.median(f[f > 0]) for f in flair]  # brightest pixel above the head's level
    assert [e > 45 for e in excess] == [False, True] * 3  # odd slices carry the bright blob


# --------------------------------------------------------------------------- the pair artifact


def test_the_committed_release_reads_as_a_pair_artifact():
    from pipeline.paths import PROJECT_ROOT

    artifact = read_pair_meta(PROJECT_ROOT / "models")
    chosen = artifact.extra["validation"]  # the operating point calibration chose or fixed
    assert artifact.tile_size == 256 and 0.0 < artifact.point.seg_threshold < 1.0
    for key in ("threshold", "seg_threshold", "min_component_px", "min_volume_px", "neighbour_weight"):
        assert getattr(artifact.point, key) == chosen[key], key
    assert (artifact.classifier_image_size, artifact.policy, artifact.verified) == (128, "float32", True)
    assert {"validation", "data", "config", "release", "durations_minutes", "versions"} <= set(artifact.extra)
    int8 = {entry[k] for entry in artifact.extra.get("openvino_int8", {}).values() for k in ("xml", "bin")}
    assert set(artifact.sha256) == {CLASSIFIER_FILE, SEGMENTER_FILE, SPLITS_FILE} | int8  # nothing unlisted


def test_saved_and_released_pairs_record_no_absolute_machine_paths(tmp_path):
    import json

    from pipeline.models.model_io import save_pair
    from pipeline.paths import PROJECT_ROOT
    from tests.model_helpers import make_tiny_segmenter

    inside = str(PROJECT_ROOT / "runs" / "20250103-000000")
    data = {"data_dir": "/elsewhere/kaggle_3m", "splits_file": inside + "/splits.csv"}
    meta = {"threshold": 0.4, "seg_threshold": 0.5, "min_component_px": 0, "tile_size": 64, "run_dir": inside,
            "data": data, "config": {"data": {"cache_dir": str(PROJECT_ROOT / ".cache"), "seed": 1}}}
    run = save_pair(tmp_path / "run", _mini_classifier(), make_tiny_segmenter(), meta)
    written = json.loads((run / META_FILE).read_text())
    assert written["run_dir"] == "runs/20250103-000000"
    assert written["data"] == {"splits_file": "runs/20250103-000000/splits.csv"}  # data_dir outside: dropped
    assert written["config"]["data"] == {"cache_dir": ".cache", "seed": 1}
    assert written["tile_size"] == written["segmenter_tile_size"] == 64  # one value, mirrored for old readers
    (run / SPLITS_FILE).write_text(SPLITS_TEXT, encoding="utf-8")
    out = export_release(run, tmp_path / "models", probe=SMALL_PROBE)["out_dir"]
    text = (Path(out) / META_FILE).read_text()
    assert str(tmp_path) not in text and str(PROJECT_ROOT) not in text



def test_a_final_model_is_released_with_the_split_its_folds_came_from(tmp_path):
    from pipeline.models.release import release_split

    base = tmp_path / "splits.csv"
    fold_run, final_run = tmp_path / "fold1", tmp_path / "final"
    for run, fold in ((fold_run, 1), (final_run, "all")):
        run.mkdir()
        (run / "splits.csv").write_text("patient_id,split\n", encoding="utf-8")
        record = {"config": {"data": {"fold": fold, "splits": str(base)}}}
        (run / "pipeline.json").write_text(json.dumps(record), encoding="utf-8")
    assert release_split(fold_run) == fold_run / "splits.csv"  # a fold run releases what it used
    assert release_split(final_run) == base  # the final model keeps the project's split of record


def test_the_release_compares_masks_at_the_pairs_own_mask_threshold(tmp_path, monkeypatch):
    """An ensemble's pair draws masks at 0.2: float16 storage is judged there, not at 0.5."""
    from pipeline.models.model_io import save_pair
    from tests.model_helpers import make_tiny_segmenter

    run = save_pair(tmp_path / "run", _mini_classifier(), make_tiny_segmenter(),
                    {"threshold": 0.5, "seg_threshold": 0.2, "segmenter_tile_size": 64, "policy": "float32"})
    (run / SPLITS_FILE).write_text(SPLITS_TEXT, encoding="utf-8")
    cuts = []
    real = release_mod.mask_agreement
    monkeypatch.setattr(release_mod, "mask_agreement", lambda a, b, t: cuts.append(t) or real(a, b, t))
    result = export_release(run, tmp_path / "models", probe=SMALL_PROBE)
    assert cuts and set(cuts) == {0.2}
    assert result["tolerance"]["mask_threshold"] == 0.2
    recorded = json.loads((Path(result["out_dir"]) / META_FILE).read_text())["release"]["tolerance"]
    assert recorded["mask_threshold"] == 0.2
    # an explicit threshold is kept
    out = export_release(run, tmp_path / "other", probe=SMALL_PROBE,
                         tolerance=release_mod.Tolerance(mask_threshold=0.5))
    assert out["tolerance"]["mask_threshold"] == 0.5
