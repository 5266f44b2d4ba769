"""`bench pipeline`: each backend timed side by side in one run, its JSON rows and its table."""

from __future__ import annotations

import argparse
import json

import pytest

from pipeline.benchmarks import end_to_end

FIELDS = {"backend", "policy", "end_to_end_slices_per_s", "classifier_slices_per_s",
          "segmenter_slices_per_s", "peak_rss_mb"}


def _fake_worker(spec):
    rate = {"keras": 10.0, "openvino": 25.0}[spec.get("backend", "keras")]
    row = {"kind": spec["kind"], "backend": spec.get("backend", "keras"),
           "policy": spec["policy"] if spec.get("backend", "keras") == "keras" else "f32",
           "slices": "synthetic", "n_slices": spec["n_slices"], "n_tumour": 32, "n_flagged": 40,
           "batch_size": spec["batch_size"], "models": "fake", "classifier_slices_per_s": 3 * rate,
           "segmenter_slices_per_s": rate, "stages_only_slices_per_s": 1.2 * rate,
           "end_to_end_slices_per_s": rate, "peak_rss_mb": 100.0}
    if spec["kind"] == "baseline":
        row.update(end_to_end_slices_per_s=2.0, classifier_slices_per_s=None, segmenter_slices_per_s=None)
    return row


def test_bench_pipeline_times_keras_and_openvino_side_by_side(monkeypatch, tmp_path, capsys):
    specs = []
    monkeypatch.setattr(end_to_end, "_run_worker", lambda spec: specs.append(spec) or _fake_worker(spec))
    monkeypatch.setattr(end_to_end, "_find_pair", lambda models, run, fresh: None)
    args = argparse.Namespace(batch_size=16, n_slices=96, baseline_slices=24, data_dir=None, models=None,
                              fresh_models=True, policies=("float32",), backends=("keras", "openvino"),
                              precisions=("auto", "f32"), json=tmp_path / "bench.json")
    assert end_to_end.run(args) == 0
    assert [(s["kind"], s.get("backend"), s.get("precision")) for s in specs] == [
        ("pipeline", "keras", None), ("pipeline", "openvino", "auto"), ("pipeline", "openvino", "f32"),
        ("baseline", None, None)]
    report = json.loads((tmp_path / "bench.json").read_text())
    for row in report["results"]:
        assert FIELDS <= set(row)
    assert "cpu_flags" in report["environment"]
    table = capsys.readouterr().out
    openvino_line = next(line for line in table.splitlines() if line.startswith("pipeline   openvino"))
    assert openvino_line.split()[-1] == "2.5"  # x keras float32 in the same run
    assert "flags:" in table


def test_bench_diagnosis_times_a_whole_run_per_executor(tiny_pair, synthetic_root):
    from pipeline.benchmarks import diagnosis

    inputs = sorted(str(p) for p in synthetic_root.glob("*/*.tif") if not p.stem.endswith("_mask"))[:4]
    row = diagnosis.measure({"executor": "local", "inputs": inputs, "pair_dir": str(tiny_pair),
                             "batch_size": 2, "backend": "keras", "concurrency": 1})
    assert row["slices"] == 4 and row["failed"] == 0 and row["cold_s"] > 0 and row["warm_slices_per_s"] > 0
    # the pair loaded once: the models alone and the run with files, timed on the same slices
    assert row["load_s"] > 0 and row["models_slices_per_s"] > 0 and row["files_slices_per_s"] > 0
    assert 0 < row["files_to_models"] == pytest.approx(row["files_slices_per_s"] / row["models_slices_per_s"],
                                                       rel=0.1)
    ray_row = {**row, "executor": "ray", "cold_s": row["cold_s"] + 5.0, "warm_s": row["warm_s"] + 2.0}
    table = diagnosis.format_report({"results": [row, ray_row]})
    assert "the pair loaded once" in table and "of the models' rate" in table
    assert "Ray's overhead against local: +5.00 s cold, +2.00 s warm (1 actor(s))" in table


def test_bench_models_trains_the_resnet50_encoder_unet(monkeypatch):
    """`bench models --stages resnet_unet` times the ensemble's ResNet50-encoder member, the one
    whose training cost decides which policy to train in, not the ResUNet again."""
    from pipeline.benchmarks.models import measure_stage

    monkeypatch.setenv("LGG_BACKBONE_WEIGHTS", "/nonexistent.h5")  # no ImageNet weights: from scratch
    resunet = measure_stage("segmenter", "float32", batch_size=1, steps=1, warmup=0, image_size=32)
    row = measure_stage("resnet_unet", "float32", batch_size=1, steps=1, warmup=0, image_size=32)
    assert row["stage"] == "resnet_unet" and row["policy"] == "float32"
    assert row["params"] > 5 * resunet["params"]  # stages 1-4 of ResNet50: ~12M against ~2M
    assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
