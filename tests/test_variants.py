"""Fast by default (issue 23): the pair's variant record (`pipeline.models.variant_record`), how it is
written and read back (`pair_artifact.record_variants`), the CPU class, and how `auto` picks among
the variants that passed (`openvino_runner.choose_variant`: rates injected, never timed here).

The record and the choice rule run without OpenVINO; the command and the pipeline plumbing on the
tiny pair are marked `needs_openvino`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.inference.backends import BackendError, openvino_available, openvino_runner
from pipeline.inference.backends.ir_cache import IREntry
from pipeline.inference.backends.variant_check import gate_flips, variant_result
from pipeline.io_utils import sha256_of
from pipeline.models.pair_artifact import (
    META_FILE,
    SUMS_FILE,
    PairArtifact,
    read_pair_meta,
    read_sums,
    record_variants,
    write_pair_meta,
)
from pipeline.models.precision import cpu_class
from pipeline.models.variant_record import applicable, check_variants, failure
from tests.model_helpers import copy_pair

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")


def _result(ok=True, cpu="amx", kind="probability", diff=0.001, files=None, **more):
    result = {"ok": ok, "kind": kind, "max_abs_diff": diff, "n_slices": 20, "cpu": cpu,
              "files_sha256": files or {"classifier.keras": "c" * 64}}
    if kind == "map":
        result["mask_agreement"] = more.pop("mask_agreement", 0.999)
    return {**result, **more}


def _loaded(ok=True, **more):
    """`_result` as `variant_check` writes it from 0.3.2 on: with the run under load."""
    idle = _result(**more)
    loaded = _result(ok=ok, **{k: v for k, v in more.items() if k not in ("ok",)})
    return {**idle, "ok_idle": idle["ok"], "ok": bool(idle["ok"] and ok),
            "under_load": {**loaded, "busy_processes": 2}}


# --------------------------------------------------------------------------- the CPU class


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "amx"),
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"}, "avx512_bf16"),
    ({"avx2", "avx512f", "avx512_vnni"}, "vnni"),
    ({"avx2", "avx_vnni"}, "vnni"),
    ({"avx2", "fma"}, "avx2"),
    ({"sse4_2"}, "baseline"),
    (set(), "baseline"),
])
def test_the_cpu_class_is_the_best_capability_the_flags_list(flags, expected):
    assert cpu_class(flags) == expected


# --------------------------------------------------------------------------- the record in pipeline.json


def _results(pair):
    sums = read_pair_meta(pair).sha256
    cls = {"classifier.keras": sums["classifier.keras"]}
    seg = {"segmenter.keras": sums["segmenter.keras"]}
    return {
        "classifier": {"f32": _result(files=cls), "bf16": _result(ok=False, diff=0.0207, files=cls)},
        "segmenter": {"f32": _result(kind="map", files=seg), "bf16": _result(kind="map", files=seg)},
    }


def _release_like(tiny_pair, tmp_path):
    """A copy of the tiny pair that also sums a `splits.csv`, as a release does."""
    pair = copy_pair(tiny_pair, tmp_path / "pair")
    (pair / "splits.csv").write_text("patient_id,split\nTCGA_XX_0001,val\n", encoding="utf-8")
    record = json.loads((pair / META_FILE).read_text(encoding="utf-8"))
    record["sha256"]["splits.csv"] = sha256_of(pair / "splits.csv")
    write_pair_meta(pair, record)
    return pair


def test_the_record_is_written_into_pipeline_json_and_the_sums_still_verify(tiny_pair, tmp_path):
    from pipeline.models.release import verify_release

    pair = _release_like(tiny_pair, tmp_path)
    listed_before = list(read_sums(pair / SUMS_FILE))
    record_variants(pair, _results(pair))

    artifact = read_pair_meta(pair)  # SHA256SUMS vouches for the new pipeline.json
    variants = artifact.extra["variants"]
    assert variants["classifier"]["amx"]["bf16"]["ok"] is False
    assert variants["segmenter"]["amx"]["bf16"]["mask_agreement"] == 0.999
    assert list(read_sums(pair / SUMS_FILE)) == listed_before  # same files, same order
    assert read_sums(pair / SUMS_FILE)[META_FILE] == sha256_of(pair / META_FILE)
    verify_release(pair)  # every listed file matches (raises DataError otherwise)


def test_a_new_mask_threshold_drops_the_segmenters_record_and_the_release_verifies(tiny_pair, tmp_path):
    """The segmenter's variants were checked with masks at the old mask threshold: once the pair
    thresholds elsewhere (`calibrate --set calibration.fixed=...`) they are unchecked again."""
    from pipeline.models.release import verify_release
    from pipeline.postprocessing import OperatingPoint
    from pipeline.training.calibration import set_operating_point

    pair = _release_like(tiny_pair, tmp_path)
    record_variants(pair, _results(pair))
    point = read_pair_meta(pair).point
    set_operating_point(pair, OperatingPoint(point.threshold, point.seg_threshold, 30, 800))
    assert set(read_pair_meta(pair).extra["variants"]) == {"classifier", "segmenter"}  # same masks
    set_operating_point(pair, OperatingPoint(point.threshold, 0.4, 30, 800))
    artifact = read_pair_meta(pair)
    assert set(artifact.extra["variants"]) == {"classifier"} and artifact.point.seg_threshold == 0.4
    verify_release(pair)


def test_another_cpu_class_is_filed_beside_the_first_and_a_rerun_replaces_its_own(tiny_pair, tmp_path):
    pair = copy_pair(tiny_pair, tmp_path / "pair")
    record_variants(pair, _results(pair))
    other = {role: {v: {**r, "cpu": "avx512_bf16"} for v, r in by.items()}
             for role, by in _results(pair).items()}
    record_variants(pair, {"classifier": other["classifier"]})
    again = {"classifier": {"f32": _results(pair)["classifier"]["f32"]}}
    record_variants(pair, again)
    variants = read_pair_meta(pair).extra["variants"]
    assert set(variants["classifier"]) == {"amx", "avx512_bf16"}
    assert set(variants["classifier"]["amx"]) == {"f32"}  # the rerun on amx replaced that class's record
    assert set(variants["classifier"]["avx512_bf16"]) == {"f32", "bf16"}
    assert set(variants["segmenter"]["amx"]) == {"f32", "bf16"}


@pytest.mark.parametrize("change, named", [
    (lambda v: v.update(classifier=[]), "variants.classifier must be an object"),
    (lambda v: v.update(gate={}), "unknown role 'gate'"),
    (lambda v: v["classifier"].update(sse={}), "unknown CPU class 'sse'"),
    (lambda v: v["classifier"]["amx"].update(fp8=_result()), "unknown variant 'fp8'"),
    (lambda v: v["classifier"]["amx"]["bf16"].update(ok="yes"), "variants.classifier.amx.bf16.ok"),
    (lambda v: v["classifier"]["amx"]["bf16"].pop("max_abs_diff"), "max_abs_diff must be a number"),
    (lambda v: v["classifier"]["amx"]["f32"].update(max_abs_diff=-1), "max_abs_diff must be in"),
    (lambda v: v["segmenter"]["amx"]["f32"].update(mask_agreement=1.5), "mask_agreement must be in"),
    (lambda v: v["segmenter"]["amx"]["f32"].update(n_slices=0), "n_slices must be an integer"),
    (lambda v: v["segmenter"]["amx"]["f32"].update(cpu="vnni"), "filed under 'amx'"),
    (lambda v: v["segmenter"]["amx"]["f32"].update(files_sha256={"x": "nothex"}), "files_sha256"),
])
def test_a_malformed_record_is_a_data_error_naming_the_key_and_the_file(tiny_pair, tmp_path, change, named):
    pair = copy_pair(tiny_pair, tmp_path / "pair")
    record_variants(pair, _results(pair))
    record = json.loads((pair / META_FILE).read_text(encoding="utf-8"))
    change(record["variants"])
    with pytest.raises(DataError, match=named):
        write_pair_meta(pair, record)  # the writer refuses it
    (pair / META_FILE).write_text(json.dumps(record), encoding="utf-8")
    (pair / SUMS_FILE).write_text("".join(
        f"{sha256_of(pair / n)}  {n}\n" for n in read_sums(pair / SUMS_FILE)), encoding="utf-8")
    with pytest.raises(DataError, match=named) as caught:
        read_pair_meta(pair)  # so does the reader, though SHA256SUMS vouches for the file
    assert str(pair / META_FILE) in caught.value.files


def test_a_record_of_other_model_files_does_not_apply():
    sums = {"classifier.keras": "c" * 64, "segmenter.keras": "e" * 64,
            "openvino/segmenter.int8.bin": "b" * 64}
    variants = {"segmenter": {"amx": {
        "f32": _result(kind="map", files={"segmenter.keras": "e" * 64}),
        "int8": _result(kind="map", files={"segmenter.keras": "e" * 64,
                                           "openvino/segmenter.int8.bin": "0" * 64}),
    }}}
    assert set(applicable(variants, "segmenter", "amx", sums)) == {"f32"}  # the INT8 file changed since
    assert applicable(variants, "segmenter", "vnni", sums) == {}
    assert applicable(variants, "classifier", "amx", sums) == {}
    assert applicable(None, "classifier", "amx", sums) == {}
    PairArtifact.from_dict({"threshold": 0.5, "seg_threshold": 0.5, "min_component_px": 0, "tile_size": 64,
                            "sha256": sums, "variants": variants})  # valid


# --------------------------------------------------------------------------- the check's own numbers


def test_gate_flips_count_changed_decisions_and_those_beyond_the_tolerance():
    reference = np.array([0.10, 0.495, 0.505, 0.60, 0.90])
    candidate = np.array([0.10, 0.503, 0.498, 0.40, 0.90])
    assert gate_flips(reference, candidate, 0.5) == {"gate_flips": 3, "gate_flips_beyond_tolerance": 1}


def test_a_variant_result_applies_the_agreement_tolerances():
    reference = np.array([[0.2], [0.7]], np.float32)
    ok = variant_result(reference, reference + 0.009, "amx", {"classifier.keras": "c" * 64}, threshold=0.5)
    bad = variant_result(reference, reference + 0.0207, "amx", {"classifier.keras": "c" * 64}, threshold=0.5)
    assert ok["ok"] and ok["n_slices"] == 2 and ok["gate_flips"] == 0
    assert not bad["ok"]
    assert failure(bad) == ("its probabilities differ from Keras by up to 0.0207 on 2 slices, beyond 0.01")
    maps = np.zeros((2, 10, 10, 1), np.float32)
    maps[1] = 1.0  # a tumour of 100 px
    flipped = maps.copy()
    flipped[0, :1, :1] = 1.0  # 1 of 200 pixels: 99.5 % agree, the limit itself; mask Dice 0.995
    assert variant_result(maps, flipped, "vnni", {"segmenter.keras": "e" * 64})["ok"]
    flipped[0, :1, :2] = 1.0
    assert "99.00 % of the pixels of 2 slices, below 99.5 %" in failure(
        variant_result(maps, flipped, "vnni", {"segmenter.keras": "e" * 64}))


def test_a_segmenter_variant_is_compared_at_the_pairs_mask_threshold():
    """A pair thresholding masks at 0.4: a variant whose pixels sit at 0.45 where Keras has 0.55
    gives the same masks there, and different ones at 0.5."""
    maps = np.zeros((1, 10, 10, 1), np.float32)
    maps[0, :5] = 0.55
    shifted = maps.copy()
    shifted[0, :5] = 0.45
    at_pair = variant_result(maps, shifted, "amx", {"segmenter.keras": "e" * 64}, threshold=0.4)
    assert at_pair["ok"] and at_pair["threshold"] == 0.4 and "gate_flips" not in at_pair
    assert not variant_result(maps, shifted, "amx", {"segmenter.keras": "e" * 64})["ok"]


def test_a_segmenter_variant_must_keep_the_tumour_not_only_the_pixels():
    """INT8 on release 0.3.0: 99.93 % of the pixels agreed, validation Dice fell by 0.028. A small
    tumour mostly lost is a small share of the pixels but not of the mask's Dice."""
    maps = np.zeros((1, 100, 100, 1), np.float32)
    maps[0, :10, :10] = 1.0  # 100 tumour pixels of 10,000
    shrunk = maps.copy()
    shrunk[0, :10, :1] = 0.0  # 10 of them lost: 99.9 % of the pixels agree, mask Dice 0.947
    result = variant_result(maps, shrunk, "amx", {"segmenter.keras": "e" * 64})
    assert result["mask_agreement"] == pytest.approx(0.999)
    assert result["mask_dice"] == pytest.approx(0.947, abs=1e-3)
    assert not result["ok"]
    assert "Dice of 0.947 against Keras' on 1 slices, below 0.99" in failure(result)
    assert variant_result(maps, maps, "amx", {"segmenter.keras": "e" * 64})["mask_dice"] == 1.0


# --------------------------------------------------------------------------- auto picks by speed


class _Model:
    name = "classifier"


@pytest.fixture
def chooser(tmp_path, monkeypatch):
    """`choose_variant` on a fake cache entry, on a bf16 CPU `cpu-A`, with injected rates."""
    entry = IREntry(tmp_path, {"model_sha256": "c" * 64})
    rates = {"f32": 100.0, "bf16": 300.0, "int8": 200.0}
    timed = []

    def fake_rates(_entry, _model, candidates, _int8_xml=None):
        timed.append(list(candidates))
        return {v: rates[v] for v in candidates}

    monkeypatch.setattr(openvino_runner, "variant_rates", fake_rates)
    monkeypatch.setattr(openvino_runner, "native_bf16", lambda: True)
    monkeypatch.setattr(openvino_runner, "has_amx", lambda: True)
    monkeypatch.setattr(openvino_runner, "cpu_key", lambda: "cpu-A")
    monkeypatch.setattr(openvino_runner, "_agreement", lambda *_: {"ok": True, "kind": "probability",
                                                                   "max_abs_diff": 0.001})

    def choose(requested="auto", record=None, int8_xml="int8.xml"):
        return openvino_runner.choose_variant(entry, _Model(), requested, record, int8_xml)

    choose.entry, choose.rates, choose.timed = entry, rates, timed
    return choose


def test_the_fastest_variant_that_passed_is_picked(chooser):
    record = {"f32": _result(), "bf16": _result(), "int8": _loaded()}
    assert chooser(record=record) == "bf16"
    assert chooser.timed == [["f32", "bf16", "int8"]]


def test_a_failing_variant_is_never_picked_however_fast(chooser):
    record = {"f32": _result(), "bf16": _result(ok=False, diff=0.0207), "int8": _loaded()}
    assert chooser(record=record) == "int8"
    assert chooser.timed == [["f32", "int8"]]


def test_quantize_measures_its_new_int8_files_even_where_the_record_predates_them(chooser):
    """`quantize` evaluates each candidate pair with `CANDIDATE_PRECISION`: with a record of this
    CPU class that has no result for the new INT8 files, that must still run the INT8 IR (under
    `auto` it ran bf16, and every candidate looked as good as float32)."""
    from pipeline.quantization.int8 import CANDIDATE_PRECISION

    record = {"f32": _result(), "bf16": _result()}
    assert chooser(record=record) == "bf16"
    assert chooser(CANDIDATE_PRECISION, record) == "int8"
    assert chooser(CANDIDATE_PRECISION, record, int8_xml=None) == "f32"  # the model left in float32


def test_only_f32_passing_runs_f32_without_timing(chooser):
    assert chooser(record={"f32": _result(), "bf16": _result(ok=False, diff=0.02)}) == "f32"
    assert chooser.timed == []


def test_int8_runs_under_auto_only_when_its_record_passed(chooser):
    chooser.rates.update(int8=1000.0)
    assert chooser(record={"f32": _result(), "bf16": _result()}) == "bf16"  # int8 has no record here
    assert chooser(record={"f32": _result(), "int8": _loaded()}, int8_xml=None) == "f32"  # no INT8 IR


def test_an_int8_record_without_the_run_under_load_is_not_run_by_auto(chooser):
    """An INT8 IR that agreed on an idle CPU gave wrong maps while other processes ran
    (`openvino_runner` docstring): a record from before that check does not let auto run it."""
    chooser.rates.update(int8=1000.0)
    assert chooser(record={"f32": _result(), "int8": _result()}) == "f32"
    assert chooser(record={"f32": _result(), "int8": _loaded(ok=False)}) == "f32"
    assert chooser(record={"f32": _result(), "int8": _loaded()}) == "int8"


def test_a_variant_that_fails_only_under_load_fails_and_says_so():
    result = _loaded(ok=False, kind="map", mask_agreement=0.999)
    result["under_load"]["mask_agreement"] = 0.62
    assert not result["ok"] and result["ok_idle"]
    assert failure(result) == ("on a CPU kept busy by 2 other processes, its masks agree with Keras on "
                               "62.00 % of the pixels of 20 slices, below 99.5 % (idle it passed)")
    check_variants({"segmenter": {"amx": {"int8": result}}})
    with pytest.raises(ValueError, match=r"segmenter\.amx\.int8\.ok is true, but its run under load failed"):
        check_variants({"segmenter": {"amx": {"int8": {**result, "ok": True}}}})


def test_an_int8_ir_runs_on_one_stream_wherever_it_is_run(tmp_path):
    """Two streams on a loaded CPU gave wrong INT8 maps (`openvino_runner` docstring); the
    pipeline, `variants` and `quantize` all run an INT8 IR through `int8_runner`."""
    entry = IREntry(tmp_path, {"model_sha256": "c" * 64})
    runner = openvino_runner.variant_runner(entry, "int8", tmp_path / "segmenter.int8.xml")
    assert (runner.streams, runner.precision, runner.hint) == (openvino_runner.INT8_STREAMS, "int8", "f32")
    assert openvino_runner.INT8_STREAMS == 1


def test_busy_cores_keeps_every_core_busy_and_reaps_its_processes():
    from pipeline.inference.backends.cpu_load import busy_cores, core_count

    with busy_cores() as spinners:
        assert len(spinners) == core_count()
        assert all(p.poll() is None for p in spinners)  # running
    assert all(p.returncode is not None for p in spinners)
    with pytest.raises(RuntimeError), busy_cores(1) as spinners:
        raise RuntimeError("the check failed")
    assert spinners[0].returncode is not None


def test_a_forced_variant_that_failed_is_refused_saying_which_check_and_by_how_much(chooser):
    record = {"f32": _result(), "bf16": _result(ok=False, diff=0.0207, n_slices=421)}
    with pytest.raises(BackendError, match=r"--precision bf16 is refused .* \(amx\) failed, its "
                                           r"probabilities differ from Keras by up to 0\.0207 on 421 "
                                           r"slices, beyond 0\.01"):
        chooser("bf16", record)
    masks = {"int8": _result(ok=False, kind="map", mask_agreement=0.98)}
    with pytest.raises(BackendError, match=r"masks agree with Keras on 98\.00 % .* below 99\.5 %"):
        chooser("int8", masks)
    assert chooser("f32", record) == "f32"
    assert chooser("bf16", {"bf16": _result()}) == "bf16"
    assert chooser("int8", {}, int8_xml=None) == "f32"  # no INT8 IR of this model: it runs f32
    with pytest.raises(ValueError, match="valid: auto, f32, bf16, int8"):
        chooser("fp8", record)


def test_the_choice_is_recorded_per_cpu_and_reused(chooser, monkeypatch):
    record = {"f32": _result(), "bf16": _result(), "int8": _loaded()}
    assert chooser(record=record) == "bf16"
    manifest = json.loads((chooser.entry.directory / "manifest.json").read_text())
    saved = manifest["variant_by_cpu"]["cpu-A"]
    assert saved["chosen"] == "bf16" and saved["candidates"] == ["f32", "bf16", "int8"]
    assert saved["slices_per_s"] == {"f32": 100.0, "bf16": 300.0, "int8": 200.0}

    chooser.rates.update(int8=900.0)  # a later run reads the record instead of timing again
    assert chooser(record=record) == "bf16"
    assert len(chooser.timed) == 1

    monkeypatch.setattr(openvino_runner, "cpu_key", lambda: "cpu-B")  # another CPU times for itself
    assert chooser(record=record) == "int8"
    changed = {"f32": _result(), "int8": _loaded()}  # other candidates on cpu-A: timed again
    monkeypatch.setattr(openvino_runner, "cpu_key", lambda: "cpu-A")
    assert chooser(record=changed) == "int8"
    assert len(chooser.timed) == 3
    manifest = json.loads((chooser.entry.directory / "manifest.json").read_text())
    assert set(manifest["variant_by_cpu"]) == {"cpu-A", "cpu-B"}


def test_without_a_record_for_this_cpu_class_auto_behaves_as_before(chooser, monkeypatch):
    assert chooser(record={}) == "bf16"  # AMX, bf16 agrees on the synthetic probe; never unchecked INT8
    assert chooser(record={}, int8_xml=None) == "bf16"
    monkeypatch.setattr(openvino_runner, "_agreement", lambda *_: {"ok": True, "kind": "probability",
                                                                   "max_abs_diff": 0.008})
    (chooser.entry.directory / "manifest.json").unlink()
    chooser.entry.manifest.pop("precision_by_cpu")
    assert chooser(record={}, int8_xml=None) == "f32"  # within the tolerance, not within half of it
    assert chooser.timed == []


# --------------------------------------------------------------------------- end to end on the tiny pair


def _checkable_pair(tiny_pair, root, tmp_path):
    """A copy of the tiny pair with a split file whose validation patients are two of `root`'s."""
    pair = copy_pair(tiny_pair, tmp_path / "pair")
    patients = sorted({p.name.rsplit("_", 1)[0] for p in root.iterdir() if p.is_dir()})
    rows = [f"{p},{'val' if i < 2 else 'train'}" for i, p in enumerate(patients)]
    (pair / "splits.csv").write_text("patient_id,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return pair


@needs_openvino
def test_the_command_checks_every_variant_and_records_it(tiny_pair, synthetic_root, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.inference.backends.openvino_runner import native_bf16

    pair = _checkable_pair(tiny_pair, synthetic_root, tmp_path)
    code = main(["variants", "--models", str(pair), "--data-dir", str(synthetic_root),
                 "--cache-dir", str(tmp_path / "cache"), "--max-slices", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    variants = read_pair_meta(pair).extra["variants"]
    cpu = cpu_class()
    expected = {"f32", "bf16"} if native_bf16() else {"f32"}
    for role in ("classifier", "segmenter"):
        record = variants[role][cpu]
        assert set(record) == expected
        assert record["f32"]["ok"] and record["f32"]["n_slices"] == 8 + 12
        assert record["f32"]["under_load"]["ok"] and record["f32"]["under_load"]["n_slices"] == 8 + 12
    assert variants["classifier"][cpu]["f32"]["gate_flips_beyond_tolerance"] == 0
    assert f"CPU class {cpu}" in out and "classifier f32   ok" in out


def test_the_command_refuses_a_pair_without_a_split_file(tiny_pair, synthetic_root, tmp_path, capsys):
    from pipeline.cli import main

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    if not openvino_available():
        pytest.skip("OpenVINO is not installed")
    code = main(["variants", "--models", str(pair), "--data-dir", str(synthetic_root)])
    assert code == 2
    assert "split file" in capsys.readouterr().err


@needs_openvino
def test_the_pipeline_follows_the_pairs_record(tiny_pair, tmp_path):
    from pipeline.inference.tumor_pipeline import TumorPipeline

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    results = _results(pair)
    cpu = cpu_class()
    results = {role: {v: {**r, "cpu": cpu} for v, r in by.items()} for role, by in results.items()}
    record_variants(pair, results)
    with pytest.raises(BackendError, match="--precision bf16 is refused for classifier"):
        TumorPipeline.from_dir(pair, backend="openvino", precision="bf16")
    pipe = TumorPipeline.from_dir(pair, backend="openvino")  # auto: the classifier's bf16 failed
    assert pipe.classifier_runner.precision == "f32"
