"""Batch diagnosis: inputs of every kind, bad files, reports, resume, and never writing outside OUT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from pipeline.commands import diagnose as command
from pipeline.errors import DataError
from pipeline.inference import diagnosis as diagnose
from pipeline.inference.diagnosis import JOURNAL, output_names, run_diagnosis
from pipeline.inference.image_loading import (
    MAX_SIDE,
    expand_inputs,
    load_slice,
    natural_key,
    patient_id_from_name,
)
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.paths import PairSource, resolve_pair
from tests.inference_helpers import expected_mask, file_hashes, slice_images, stub_pipeline
from tests.synthetic import make_slice


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _tree(root: Path) -> dict[Path, str]:
    return file_hashes(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- loading slices


def test_dataset_tiffs_load_in_file_channel_order(synthetic_root):
    path = slice_images(synthetic_root)[0]
    np.testing.assert_array_equal(load_slice(path), tifffile.imread(path))


def test_rgb_png_keeps_channel_order_and_jpeg_loads(tmp_path):
    image = np.zeros((16, 20, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 120, 250
    Image.fromarray(image).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_slice(tmp_path / "rgb.png"), image)  # not BGR
    Image.fromarray(image).save(tmp_path / "rgb.jpg", quality=95)
    loaded = load_slice(tmp_path / "rgb.jpg")
    assert loaded.shape == (16, 20, 3) and np.abs(loaded.astype(int) - image).max() <= 8  # lossy


def test_greyscale_is_replicated_to_three_channels(tmp_path):
    grey = np.arange(16 * 24, dtype=np.uint8).reshape(16, 24)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "grey.tif", grey[..., None])
    for name in ("grey.png", "grey.tif"):
        loaded = load_slice(tmp_path / name)
        assert loaded.shape == (16, 24, 3) and loaded.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(loaded[..., c], grey)


def test_sixteen_bit_is_rescaled_with_the_image_range(tmp_path):
    values = np.linspace(0, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)  # a typical MRI range
    tifffile.imwrite(tmp_path / "deep.tif", values)
    Image.fromarray(values).save(tmp_path / "deep.png")
    for name in ("deep.tif", "deep.png"):
        loaded = load_slice(tmp_path / name)
        assert loaded.dtype == np.uint8 and loaded.shape == (16, 16, 3)
        assert loaded.min() == 0 and loaded.max() == 255  # min..max -> 0..255, not >> 8 (which gives 0..11)
        np.testing.assert_array_equal(loaded[..., 0], np.round(values / 3000 * 255).astype(np.uint8))
    rgb16 = np.stack([values, values // 2, values // 3], -1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    loaded = load_slice(tmp_path / "rgb16.tif")
    assert loaded[..., 0].max() == 255 and loaded[..., 1].max() == 128  # one scale for all channels


def test_alpha_is_dropped(tmp_path):
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = (30, 60, 90)
    rgba[..., 3] = 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    for name in ("rgba.png", "rgba.tif"):
        np.testing.assert_array_equal(load_slice(tmp_path / name), rgba[..., :3])
    la = np.stack([np.full((12, 12), 50, np.uint8), np.full((12, 12), 200, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (load_slice(tmp_path / "la.png") == 50).all()


def _write_bad_files(folder: Path, good: Path) -> dict[str, str]:
    """Every kind of bad input -> the words its error message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.tif").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "fake.tif").write_bytes(b"II*\x00" + b"\xff" * 64)  # a TIFF header and garbage
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.zeros((8, MAX_SIDE + 8), np.uint8)).save(folder / "huge.png")
    png = folder / "cut.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:400])
    return {
        "empty.tif": "zero bytes",
        "truncated.tif": "truncated",
        "notes.png": "not an image",
        "fake.tif": "TIFF",
        "tiny.png": "absurd image size 4x6",
        "huge.png": "absurd image size",
        "cut.png": "truncated",
    }


def test_every_bad_file_raises_a_data_error_naming_it(tmp_path, synthetic_root):
    expected = _write_bad_files(tmp_path, slice_images(synthetic_root)[0])
    (tmp_path / "data.csv").write_text("a,b\n")
    expected["data.csv"] = "unsupported file type"
    expected["missing.tif"] = "cannot open"
    for name, words in expected.items():
        with pytest.raises(DataError, match=words) as info:
            load_slice(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


# --------------------------------------------------------------------------- finding inputs


def test_expand_inputs_folders_globs_masks_and_numeric_order(synthetic_root):
    case = synthetic_root / "TCGA_BB_0004_20000404"  # 12 slices
    from_folder = expand_inputs([case])
    assert [p.name for p in from_folder] == [f"TCGA_BB_0004_20000404_{n}.tif" for n in range(1, 13)]
    assert expand_inputs([str(case / "*.tif")]) == from_folder  # the glob matches masks too; skipped
    assert len(expand_inputs([case], include_masks=True)) == 24
    everything = expand_inputs([synthetic_root, case / "TCGA_BB_0004_20000404_3.tif"])  # duplicates once
    assert len(everything) == len(slice_images(synthetic_root)) == 50
    assert everything == sorted(everything, key=natural_key)
    assert len(expand_inputs([f"{synthetic_root}/**/*_1.tif"])) == 6
    with pytest.raises(DataError, match="not found") as info:
        expand_inputs([case, "no/such/folder", "nothing-*.tif"])
    assert "no/such/folder" in str(info.value) and "nothing-*.tif" in str(info.value)


def test_patient_id_from_file_or_folder_name():
    assert patient_id_from_name("x/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_7.tif") == "TCGA_CS_4941"
    assert patient_id_from_name("TCGA_DU_A5TW_19980228/slice_3.png") == "TCGA_DU_A5TW"
    assert patient_id_from_name("scans/brain_01.png") is None


def test_output_names_are_unique_per_input_path(tmp_path):
    a, b, c = tmp_path / "a" / "scan.tif", tmp_path / "b" / "SCAN.png", tmp_path / "b" / "other.tif"
    names = output_names([a, b, c])
    assert len({n.lower() for n in names.values()}) == 3  # also on case-insensitive file systems
    assert names[a].startswith("scan__") and names[b].startswith("SCAN__") and names[c].startswith("other__")
    assert output_names([a, b, c]) == names  # deterministic: a resumed run reuses them
    assert output_names([c]) == {c: names[c]}  # independent of the other inputs, so of the run
    assert output_names([tmp_path / "x y+z.png"])[tmp_path / "x y+z.png"].startswith("x_y_z__")


# --------------------------------------------------------------------------- the batch run


def test_diagnosis_of_a_dataset_folder(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = run_diagnosis([synthetic_root], out, pipeline=stub_pipeline(), batch_size=8, progress=False)
    inputs = slice_images(synthetic_root)
    assert result.exit_code == 0 and len(result.rows) == len(inputs) and result.skipped_masks == len(inputs)

    report = pd.read_csv(out / "report.csv")
    assert list(report.columns) == list(diagnose.COLUMNS) and len(report) == len(inputs)
    assert report["error"].isna().all()
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["path"] for r in rows] == [str(p) for p in expand_inputs([synthetic_root])]
    for row in rows:
        path = Path(row["path"])
        truth = load_slice(path.with_name(path.stem + "_mask.tif"))[..., 0] > 0
        assert row["patient_id"] == "_".join(path.parent.name.split("_")[:3])
        assert row["decision"] == ("tumour" if truth.any() else "no tumour")
        assert row["area_px"] == truth.sum()  # the stub segmenter reproduces synthetic tumours
        if truth.any():
            mask = _png(out / row["mask_path"])
            np.testing.assert_array_equal(mask > 0, truth)
            assert set(np.unique(mask)) == {0, 255}
            overlay_png = _png(out / row["overlay_path"])
            assert overlay_png.shape == (*truth.shape, 3)
            assert (overlay_png[..., 0] == 255).any()  # the red contour
            ys, xs = np.nonzero(truth)
            assert row["bbox"] == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
            assert row["centroid"] == pytest.approx([ys.mean(), xs.mean()], abs=0.01)
            assert row["components"] == 1
        else:
            assert row["mask_path"] is None and row["bbox"] is None
    assert len(list((out / "masks").iterdir())) == sum(r["decision"] == "tumour" for r in rows)

    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == 6 and patients["slices"].sum() == len(inputs)
    by_patient = patients.set_index("patient_id")
    assert by_patient.loc["TCGA_BB_0003", "slices_flagged"] == 0  # the patient without tumour
    assert by_patient.loc["TCGA_BB_0004", "slices_flagged"] == 8
    truth_volume = sum(
        int((load_slice(Path(r["path"]).with_name(Path(r["path"]).stem + "_mask.tif")) > 0)[..., 0].sum())
        for r in rows
        if r["patient_id"] == "TCGA_AA_0001"
    )
    assert by_patient.loc["TCGA_AA_0001", "tumour_volume_px"] == truth_volume
    largest = max((r for r in rows if r["patient_id"] == "TCGA_AA_0001"), key=lambda r: r["area_px"])
    assert by_patient.loc["TCGA_AA_0001", "largest_slice"] == largest["path"]


def test_bad_files_get_their_row_and_the_batch_goes_on(synthetic_root, tmp_path):
    good = slice_images(synthetic_root)[2:6]
    folder = tmp_path / "inputs"
    expected = _write_bad_files(folder, good[0])
    for p in good:
        shutil.copy(p, folder / p.name)
    greyscale = np.asarray(load_slice(good[0]))[..., 1]
    Image.fromarray(greyscale).save(folder / "TCGA_ZZ_0009_grey.png")
    result = run_diagnosis([folder], tmp_path / "out", pipeline=stub_pipeline(), batch_size=3, progress=False)

    assert result.exit_code == 1 and result.n_failed == len(expected)
    rows = {Path(r["path"]).name: r for r in result.rows}
    assert len(rows) == len(expected) + len(good) + 1
    for name, words in expected.items():
        assert words in rows[name]["error"], rows[name]
        assert rows[name]["decision"] is None and rows[name]["probability"] is None
    for name in [p.name for p in good] + ["TCGA_ZZ_0009_grey.png"]:
        assert rows[name]["error"] is None and rows[name]["decision"] in ("tumour", "no tumour")
    report = pd.read_csv(tmp_path / "out" / "report.csv")
    assert report["error"].notna().sum() == len(expected)
    assert ",64,64," in (tmp_path / "out" / "report.csv").read_text()  # integers stay integers


def test_the_command_exit_code_says_whether_anything_failed(synthetic_root, tmp_path, monkeypatch, capsys):
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "pipeline.json").write_text("{}")
    monkeypatch.setattr(TumorPipeline, "from_dir", classmethod(lambda cls, path, **kw: stub_pipeline()))
    case = synthetic_root / "TCGA_CC_0005_20010505"
    args = ["--models", str(pair), "--quiet"]
    assert command.main([str(case), "--out", str(tmp_path / "ok"), *args]) == 0
    printed = capsys.readouterr().out
    assert "8 slice(s): 3 with tumour, 0 flagged with nothing outlined, 5 without, 0 failed" in printed

    (tmp_path / "bad.tif").write_bytes(b"")
    assert command.main([str(case), str(tmp_path / "bad.tif"), "--out", str(tmp_path / "mixed"), *args]) == 1
    assert "zero bytes" in capsys.readouterr().err
    assert command.main(["no/such/input", "--out", str(tmp_path / "x"), *args]) == 2
    assert command.main([str(case), "--out", str(tmp_path / "x"), "--models", str(tmp_path)]) == 2
    assert "make train" in capsys.readouterr().err


def test_explain_writes_a_grad_cam_per_flagged_slice(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "pipeline.inference.gradcam.grad_cam",
        lambda classifier, image: np.linspace(
            0, 1, image.shape[0] * image.shape[1], dtype=np.float32
        ).reshape(image.shape[:2]),
    )
    result = run_diagnosis(
        [synthetic_root / "TCGA_CC_0005_20010505"],
        tmp_path / "out",
        pipeline=stub_pipeline(),
        explain=True,
        progress=False,
    )
    flagged = [r for r in result.rows if r["decision"] == "tumour"]
    assert flagged and all(r["gradcam_path"] for r in flagged)
    assert all(r["gradcam_path"] is None for r in result.rows if r["decision"] != "tumour")
    assert _png(tmp_path / "out" / flagged[0]["gradcam_path"]).shape == (64, 64, 3)


# --------------------------------------------------------------------------- resume


class _InterruptAfter:
    """Wraps a pipeline; counts the slices it diagnosed and dies (like Ctrl-C) on call `fail_on`."""

    def __init__(self, pipe: TumorPipeline, fail_on: int | None = None):
        self.pipe, self.fail_on, self.calls, self.seen = pipe, fail_on, 0, 0
        self.point, self.tile_size, self.backend_name = pipe.point, pipe.tile_size, pipe.backend_name
        self.variants, self.model_sha256 = pipe.variants, pipe.model_sha256

    def predict(self, images):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.seen += len(images)
        return self.pipe.predict(images)

    def predict_volume(self, images):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.seen += len(images)
        return self.pipe.predict_volume(images)


def test_an_interrupted_run_resumes_without_redoing_anything(synthetic_root, tmp_path):
    out = tmp_path / "out"
    total = len(slice_images(synthetic_root))
    first = _InterruptAfter(stub_pipeline(), fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_diagnosis([synthetic_root], out, pipeline=first, batch_size=4, progress=False)
    studies = [len(u) for u in diagnose.group_volumes(expand_inputs([synthetic_root]))]
    assert first.seen == sum(studies[:2])  # two studies (the journal's units) finished before it
    assert not (out / "report.csv").exists()  # no half-made report
    with open(out / JOURNAL, "a") as fh:
        fh.write('{"type": "row", "key": "cut sh')  # the crash also cut a journal line short

    second = _InterruptAfter(stub_pipeline())
    result = run_diagnosis([synthetic_root], out, pipeline=second, batch_size=4, progress=False)
    done = sum(studies[:2])
    assert second.seen == total - done and result.resumed == done  # nothing diagnosed twice
    assert result.exit_code == 0 and len(pd.read_csv(out / "report.csv")) == total
    assert [r["path"] for r in result.rows] == [str(p) for p in expand_inputs([synthetic_root])]

    third = _InterruptAfter(stub_pipeline())
    assert run_diagnosis([synthetic_root], out, pipeline=third, progress=False).resumed == total
    assert third.seen == 0  # a finished run is not redone
    fourth = _InterruptAfter(stub_pipeline())
    run_diagnosis([synthetic_root], out, pipeline=fourth, resume=False, progress=False)
    assert fourth.seen == total  # --no-resume
    fifth = _InterruptAfter(stub_pipeline(threshold=0.7))
    with pytest.raises(DataError, match="other settings .*threshold: 0.6 in the journal, 0.7 now"):
        run_diagnosis([synthetic_root], out, pipeline=fifth, progress=False)  # never mixed (issue 21)
    run_diagnosis([synthetic_root], out, pipeline=fifth, resume=False, progress=False)
    assert fifth.seen == total  # other settings: only with --no-resume


def test_a_changed_input_is_diagnosed_again(writable_synthetic_root, tmp_path):
    case = writable_synthetic_root / "TCGA_AA_0001_19990101"
    run_diagnosis([case], tmp_path / "out", pipeline=stub_pipeline(), progress=False)
    changed = case / "TCGA_AA_0001_19990101_1.tif"
    image, _ = make_slice(np.random.default_rng(5), 64, True)
    tifffile.imwrite(changed, image, photometric="rgb")
    again = _InterruptAfter(stub_pipeline())
    result = run_diagnosis([case], tmp_path / "out", pipeline=again, progress=False)
    assert again.seen == 1
    row = next(r for r in result.rows if r["path"] == str(changed))
    assert row["area_px"] == expected_mask(image).sum()


# --------------------------------------------------------------------------- staying inside OUT


def test_outputs_stay_inside_out_and_inputs_are_untouched(writable_synthetic_root, tmp_path):
    inputs = writable_synthetic_root
    out = inputs / "diagnosis"  # OUT inside the input folder: allowed, and never read back as input
    before = _tree(inputs)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    first = run_diagnosis([inputs], out, pipeline=stub_pipeline(), progress=False)
    second = run_diagnosis([inputs], out, pipeline=stub_pipeline(), resume=False, progress=False)
    assert len(second.rows) == len(first.rows) == len(slice_images(inputs))
    after = _tree(inputs)
    assert {p: h for p, h in after.items() if not p.is_relative_to(out)} == before  # inputs untouched
    assert set(after) - set(before) and all(p.is_relative_to(out) for p in set(after) - set(before))
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert not [p for p in out.rglob("*.tmp")]  # no temporary files left behind


def test_out_holding_an_input_or_being_a_file_is_refused(synthetic_root, tmp_path):
    image = slice_images(synthetic_root)[0]
    with pytest.raises(DataError, match="not a folder"):
        run_diagnosis([image], image, pipeline=stub_pipeline(), progress=False)
    copy = tmp_path / "out" / "in" / "slice.tif"
    copy.parent.mkdir(parents=True)
    shutil.copy(image, copy)
    before = file_hashes([copy])
    for item in (copy, copy.parent, tmp_path / "out"):
        with pytest.raises(DataError, match="inside the output folder"):
            run_diagnosis([item], tmp_path / "out", pipeline=stub_pipeline(), progress=False)
    assert file_hashes([copy]) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in"]  # nothing written


def test_models_dir_resolution(tmp_path):
    """The rule shared with evaluate: --models > --run > models/ > the latest run with a pair."""
    where = {"runs_dir": tmp_path / "runs", "default_models": tmp_path / "models"}
    with pytest.raises(DataError, match="make train"):
        resolve_pair(**where)
    for run in ("20240101-000000", "20240202-000000"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "pipeline.json").write_text("{}")
    assert resolve_pair(**where).pair_dir.name == "20240202-000000"
    (tmp_path / "runs" / "LATEST").write_text("20240101-000000\n")
    assert resolve_pair(**where).pair_dir.name == "20240101-000000"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pipeline.json").write_text("{}")
    assert resolve_pair(**where).pair_dir == tmp_path / "models"
    run = tmp_path / "runs" / "20240202-000000"
    assert resolve_pair(run, **where).pair_dir == run
    assert resolve_pair(run=run, **where) == PairSource(run, run)
    with pytest.raises(DataError, match="not a model pair"):
        resolve_pair(tmp_path / "runs", **where)


def test_slices_of_a_study_are_diagnosed_as_one_volume(synthetic_root, tmp_path):
    paths = expand_inputs([synthetic_root])
    units = diagnose.group_volumes(paths)
    assert sorted(len(u) for u in units) == sorted(
        pd.Series([p.parent for p in paths]).value_counts().tolist()
    )  # one unit per study folder, in slice order
    for unit in units:
        numbers = [int(p.stem.rsplit("_", 1)[1]) for p in unit]
        assert numbers == sorted(numbers) and len({p.parent for p in unit}) == 1
    # a 3D filter larger than any tumour: the volume route drops every mask, the 2D route keeps them
    pipe = stub_pipeline(min_volume_px=10**6)
    as_volumes = run_diagnosis([synthetic_root], tmp_path / "vol", pipeline=pipe, progress=False)
    as_slices = run_diagnosis([synthetic_root], tmp_path / "2d", pipeline=pipe, progress=False, volumes=False)
    assert as_volumes.settings["volumes"] and not as_slices.settings["volumes"]
    assert sum(r["area_px"] for r in as_volumes.rows) == 0
    assert sum(r["area_px"] for r in as_slices.rows) > 0
    single = diagnose.group_volumes([paths[0], paths[1]])  # two slices are not a study
    assert single == [[paths[0]], [paths[1]]]


def test_a_threshold_override_reaches_the_volume_route(synthetic_root, tmp_path):
    """`threshold=` on a ready pipeline applies to studies too, not only to single slices."""
    result = run_diagnosis([synthetic_root], tmp_path / "out", pipeline=stub_pipeline(), threshold=0.99,
                           progress=False)
    assert result.settings["volumes"] and result.settings["threshold"] == 0.99
    assert result.n_flagged == 0  # the stub's tumour slices score ~0.8, under 0.99
