"""Inference backends: the seam (keras | openvino | auto), the IR cache's stale rule, agreement checks.

Tests that run OpenVINO are marked `needs_openvino` (skipped where it is not installed); the
registry, the `auto` rule's refusals and the agreement tolerances run everywhere.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from pipeline.inference.backends import (  # ir_cache, openvino_runner import openvino lazily
    REGISTRY,
    Backend,
    BackendError,
    KerasRunner,
    ir_cache,
    make_runner,
    openvino_available,
    openvino_runner,
    register_backend,
    resolve_backend,
)
from pipeline.inference.image_loading import load_slice
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.models.agreement import MASK_AGREEMENT, PROBABILITY_TOL, agreement
from tests.inference_helpers import slice_images

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")


def _gpu() -> bool:
    from pipeline.models.precision import gpu_available

    return gpu_available()


@pytest.fixture(scope="module")
def tiny_pair_dir(tiny_pair):
    return tiny_pair


@pytest.fixture(scope="module")
def images(synthetic_root):
    return [load_slice(p) for p in slice_images(synthetic_root)[:20]]


@pytest.fixture(scope="module")
def pipelines(tiny_pair_dir):
    """The tiny pair loaded twice: on Keras (the reference) and on OpenVINO."""
    keras_pipe = TumorPipeline.from_dir(tiny_pair_dir, backend="keras", batch_size=8)
    openvino_pipe = TumorPipeline.from_dir(tiny_pair_dir, backend="openvino", batch_size=8)
    return keras_pipe, openvino_pipe


# --------------------------------------------------------------------------- choosing a backend


@needs_openvino
def test_auto_follows_lgg_backend_then_picks_openvino_on_a_cpu(monkeypatch):
    monkeypatch.setenv("LGG_BACKEND", "keras")
    assert resolve_backend("auto") == "keras"
    monkeypatch.delenv("LGG_BACKEND")
    assert resolve_backend("auto") == ("keras" if _gpu() else "openvino")
    assert resolve_backend("keras") == "keras"


def test_a_new_backend_is_one_registration(monkeypatch):
    monkeypatch.setitem(REGISTRY, "echo", REGISTRY["keras"])  # undone after the test
    register_backend(Backend("echo", lambda model, **_: KerasRunner(model), lambda: True))
    assert resolve_backend("echo") == "echo"
    assert isinstance(make_runner(object(), "echo"), KerasRunner)
    with pytest.raises(ValueError, match="valid: auto, keras, openvino, echo"):
        resolve_backend("onnx")


def test_unknown_backends_are_refused_with_the_valid_names(monkeypatch):
    with pytest.raises(ValueError, match="valid: auto, keras, openvino"):
        resolve_backend("onnx")
    monkeypatch.setenv("LGG_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="LGG_BACKEND"):
        resolve_backend("auto")


# --------------------------------------------------------------------------- the two backends agree


@needs_openvino
def test_the_tiny_pair_runs_on_both_backends_and_they_agree(pipelines, images):
    keras_pipe, openvino_pipe = pipelines
    assert keras_pipe.backend_name == "keras"
    assert openvino_pipe.backend_info == {
        "backend": "openvino",
        "classifier_precision": openvino_pipe.classifier_runner.precision,
        "segmenter_precision": openvino_pipe.segmenter_runner.precision,
    }
    assert openvino_pipe.classifier_runner.name == "openvino"

    p_keras, p_openvino = keras_pipe.classify(images), openvino_pipe.classify(images)
    assert np.max(np.abs(p_keras - p_openvino)) <= PROBABILITY_TOL

    maps_keras = np.stack(keras_pipe.segment_probabilities(images))
    maps_openvino = np.stack(openvino_pipe.segment_probabilities(images))
    masks_agree = (maps_keras > 0.5) == (maps_openvino > 0.5)
    assert masks_agree.mean() >= MASK_AGREEMENT


@needs_openvino
def test_gate_decisions_are_the_same_except_within_the_tolerance_of_the_threshold(pipelines, images):
    keras_pipe, openvino_pipe = pipelines
    probabilities = keras_pipe.classify(images)
    threshold = float(np.median(probabilities))  # flags about half of the slices
    for pipe in pipelines:
        pipe.threshold = threshold
    try:
        keras_results, openvino_results = keras_pipe.predict(images), openvino_pipe.predict(images)
    finally:
        for pipe in pipelines:
            pipe.threshold = 0.5
    assert any(r.is_tumor for r in keras_results) and not all(r.is_tumor for r in keras_results)
    for p, a, b in zip(probabilities, keras_results, openvino_results, strict=True):
        if abs(p - threshold) > PROBABILITY_TOL:
            assert a.is_tumor == b.is_tumor
        if a.is_tumor and b.is_tumor:
            assert (a.mask == b.mask).mean() >= MASK_AGREEMENT


@needs_openvino
def test_a_batch_that_is_not_a_multiple_of_the_streams_keeps_its_order(tiny_pair_dir, pipelines, images):
    keras_pipe, openvino_pipe = pipelines
    runner = openvino_runner.OpenVINORunner(openvino_pipe.segmenter_runner.xml, "f32", streams=2)
    x = np.stack(images[:5]).astype(np.float32)
    out = runner.predict_on_batch(x)
    assert out.shape == (5, 64, 64, 1)
    reference = keras_pipe.segmenter_runner.predict_on_batch(x)
    assert agreement(reference, out)["ok"]
    single = runner.predict_on_batch(x[3:4])  # slice 3 alone gives slice 3's map
    np.testing.assert_allclose(single[0], out[3], atol=1e-5)


@needs_openvino
def test_evaluate_runs_on_openvino_and_reports_it(tiny_pair_dir, synthetic_root, tmp_path):
    from pipeline.evaluation.evaluate import evaluate

    reports = {}
    for backend in ("keras", "openvino"):
        result = evaluate(models=tiny_pair_dir, data_dir=synthetic_root, split="all",
                          cache_dir=tmp_path / "c", out_dir=tmp_path / backend, n_boot=20, progress=False,
                          backend=backend)
        reports[backend] = result.report
    assert reports["openvino"]["provenance"]["backend"] == "openvino"
    assert reports["keras"]["provenance"]["backend"] == "keras"
    auc = {b: next(r["value"] for r in reports[b]["headline"] if "ROC-AUC" in r["metric"]) for b in reports}
    assert auc["openvino"] == pytest.approx(auc["keras"], abs=0.02)


@needs_openvino
@pytest.mark.skipif("_gpu()", reason="auto picks keras where TensorFlow sees a GPU")
def test_diagnose_uses_openvino_by_default(tiny_pair_dir, synthetic_root, tmp_path, monkeypatch):
    from pipeline.commands import diagnose

    monkeypatch.delenv("LGG_BACKEND")
    case = next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir())
    out = tmp_path / "out"
    code = diagnose.main([str(case), "--out", str(out), "--models", str(tiny_pair_dir), "--quiet"])
    assert code == 0
    settings = json.loads((tmp_path / "out" / "report.json").read_text())["settings"]
    assert settings["backend"] == "openvino"


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def tiny_segmenter():
    """A one-convolution map model: exports in a fraction of the tiny ResUNet's time."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                  kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01))(inputs)
    return keras.Model(inputs, outputs)


@needs_openvino
def test_an_ir_is_exported_once_and_reused_while_it_is_intact(tiny_segmenter, tmp_path):
    sha = "a" * 64
    entry, exported = ir_cache.cached_ir(tiny_segmenter, sha, tmp_path)
    assert exported and entry.xml.is_file()
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    assert manifest["model_sha256"] == sha
    again, exported_again = ir_cache.cached_ir(tiny_segmenter, sha, tmp_path)
    assert not exported_again and again.directory == entry.directory
    assert not list(tmp_path.glob(".export-*"))  # the temporary export directory is gone


@needs_openvino
def test_a_changed_model_file_gets_a_new_ir_never_the_stale_one(tiny_segmenter, tmp_path):
    old, _ = ir_cache.cached_ir(tiny_segmenter, "a" * 64, tmp_path)
    new, exported = ir_cache.cached_ir(tiny_segmenter, "b" * 64, tmp_path)
    assert exported and new.directory != old.directory


@needs_openvino
@pytest.mark.parametrize("damage", ["bin", "manifest_sha", "manifest_garbage", "xml_missing"])
def test_a_damaged_or_mismatched_entry_is_exported_again_with_a_warning(tiny_segmenter, tmp_path, caplog,
                                                                        damage):
    sha = "c" * 64
    entry, _ = ir_cache.cached_ir(tiny_segmenter, sha, tmp_path)
    manifest_path = entry.directory / "manifest.json"
    if damage == "bin":
        with open(entry.directory / "model.bin", "r+b") as fh:
            fh.seek(100)
            fh.write(b"\x00\x01\x02\x03")
    elif damage == "manifest_sha":  # an entry left by another model under this name
        manifest = json.loads(manifest_path.read_text())
        manifest["model_sha256"] = "d" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "manifest_garbage":
        manifest_path.write_text("{not json")
    else:
        entry.xml.unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.backends.ir_cache"):
        rebuilt, exported = ir_cache.cached_ir(tiny_segmenter, sha, tmp_path)
    assert exported
    assert "is not used" in caplog.text
    assert json.loads((rebuilt.directory / "manifest.json").read_text())["model_sha256"] == sha


@needs_openvino
def test_a_pair_keys_the_cache_by_its_recorded_file_sums(tiny_pair_dir, pipelines):
    from pipeline.models.model_io import read_pair_meta

    sums = read_pair_meta(tiny_pair_dir).sha256
    xml = pipelines[1].classifier_runner.xml
    manifest = json.loads((xml.parent / "manifest.json").read_text())
    assert manifest["model_sha256"] == sums["classifier.keras"]


# --------------------------------------------------------------------------- the agreement check


def test_agreement_tolerances():
    p = np.array([[0.2], [0.7]], np.float32)
    assert agreement(p, p + 0.009)["ok"]
    assert not agreement(p, p + 0.011)["ok"]
    maps = np.zeros((1, 100, 100, 1), np.float32)
    flipped = maps.copy()
    flipped.reshape(-1)[:40] = 1.0  # 0.4 % of the pixels change side
    assert agreement(maps, flipped)["ok"]
    flipped.reshape(-1)[:60] = 1.0  # 0.6 %
    result = agreement(maps, flipped)
    assert not result["ok"] and result["mask_agreement"] == pytest.approx(0.994)


@needs_openvino
def test_a_backend_that_disagrees_is_refused_and_auto_falls_back_to_keras(tiny_segmenter, tmp_path,
                                                                         monkeypatch, caplog):
    real = openvino_runner.OpenVINORunner.predict_on_batch

    def drifting(self, x):
        return real(self, x) + 0.3  # pushes many pixels across 0.5

    monkeypatch.setattr(openvino_runner.OpenVINORunner, "predict_on_batch", drifting)
    with pytest.raises(BackendError, match="disagrees with Keras"):
        make_runner(tiny_segmenter, "openvino", precision="f32", cache_dir=tmp_path)

    monkeypatch.setenv("LGG_OPENVINO_CACHE", str(tmp_path / "other"))
    monkeypatch.delenv("LGG_BACKEND")
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.tumor_pipeline"):
        pipe = TumorPipeline(tiny_segmenter, tiny_segmenter, backend="auto", precision="f32", tile_size=64)
    assert pipe.backend_name == "keras"
    assert "using keras" in caplog.text
    with pytest.raises(BackendError):
        TumorPipeline(tiny_segmenter, tiny_segmenter, backend="openvino", precision="f32", tile_size=64)
