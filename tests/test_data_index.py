"""Reading TIFFs and indexing a Kaggle-layout root: ordering, pairing, counts, cache, every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.cli import main as cli_main
from pipeline.data import index as index_module
from pipeline.data import readers
from pipeline.data.index import COLUMNS, index_dataset, patient_id_of, summarize
from pipeline.data.tiff_io import read_image, read_mask
from pipeline.errors import DataError
from tests.data_helpers import expected_counts, slice_paths, truncate, write_tiff
from tests.synthetic import DEFAULT_CASES


@pytest.fixture(scope="module")
def index_df(synthetic_root, tmp_path_factory):
    return index_dataset(synthetic_root, cache_dir=tmp_path_factory.mktemp("cache"))


# --- reading -----------------------------------------------------------------------------------


def test_read_image_keeps_file_channel_order(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # pre-contrast, FLAIR, post-contrast
    out = read_image(write_tiff(tmp_path / "x.tif", image))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out[0, 0].tolist() == [10, 20, 30]


def test_read_mask_binarises_and_accepts_identical_channels(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    mask[0, 0] = 100  # below the threshold: background
    two_d = read_mask(write_tiff(tmp_path / "a_mask.tif", mask))
    three = read_mask(write_tiff(tmp_path / "b_mask.tif", np.repeat(mask[..., None], 3, axis=-1)))
    assert two_d.dtype == np.uint8 and set(np.unique(two_d)) == {0, 1}
    assert two_d.sum() == 9
    np.testing.assert_array_equal(two_d, three)


def test_read_mask_rejects_masks_that_binarising_would_empty(tmp_path):
    path = write_tiff(tmp_path / "a_mask.tif", np.eye(8, dtype=np.uint8))  # 0/1 labels, not 0/255
    with pytest.raises(DataError, match="expected 0/255") as err:
        read_mask(path)
    assert err.value.files == [str(path)]


# --- indexing the synthetic set ----------------------------------------------------------------


def test_index_counts_match_what_was_written(index_df):
    assert list(index_df.columns) == COLUMNS
    assert summarize(index_df) == expected_counts()
    per_case = index_df.groupby("case").size().to_dict()
    assert per_case == {case: n for case, n, _ in DEFAULT_CASES}


def test_tumour_flags_follow_the_written_ranges(index_df):
    for case, _, tumour_range in DEFAULT_CASES:
        rows = index_df[index_df["case"] == case]
        expected = [
            tumour_range is not None and tumour_range[0] <= s <= tumour_range[1] for s in rows["slice"]
        ]
        assert rows["has_tumor"].tolist() == expected
        assert ((rows["tumor_pixels"] > 0) == rows["has_tumor"]).all()


def test_slices_sort_numerically(index_df):
    case = "TCGA_BB_0004_20000404"  # 12 slices: text order would put _10 before _2
    rows = index_df[index_df["case"] == case]
    assert rows["slice"].tolist() == list(range(1, 13))
    assert [Path(p).name for p in rows["image_path"]][8:10] == [f"{case}_9.tif", f"{case}_10.tif"]
    assert index_df["case"].is_monotonic_increasing


def test_images_pair_with_masks_by_stem(index_df):
    for image_path, mask_path, pixels in index_df[["image_path", "mask_path", "tumor_pixels"]].itertuples(
        index=False
    ):
        assert mask_path == image_path[: -len(".tif")] + "_mask.tif"
        assert pixels == int((tifffile.imread(mask_path) > 127).sum())


def test_patient_id_is_first_three_parts(index_df):
    assert patient_id_of("TCGA_CS_4941_19960909") == "TCGA_CS_4941"
    assert (index_df["patient_id"] == index_df["case"].map(patient_id_of)).all()
    # one rule for the index and for inference (which also looks at the file name)
    assert (index_df["image_path"].map(readers.patient_id_from_name) == index_df["patient_id"]).all()


def test_one_reader_registry_for_training_and_inference(index_df, tmp_path, monkeypatch):
    from pipeline.inference.image_loading import load_slice

    path = index_df["image_path"].iloc[0]
    assert isinstance(readers.reader_for(path), readers.TiffReader)
    assert isinstance(readers.reader_for("x.JPEG"), readers.PillowReader)
    np.testing.assert_array_equal(read_image(path), load_slice(path))  # same decoder, same channel order
    with pytest.raises(DataError, match=r"unsupported file type '\.nii'.*\.tif"):
        readers.reader_for("brain.nii")

    class FakeVolumeReader(readers.SliceReader):
        name, suffixes = "fake volume", (".nii",)

        def read(self, path):
            return np.full((16, 16), 7, np.uint8)

    monkeypatch.setattr(readers, "READERS", list(readers.READERS))
    readers.register_reader(FakeVolumeReader())
    (tmp_path / "brain.nii").write_bytes(b"x")
    assert load_slice(tmp_path / "brain.nii").shape == (16, 16, 3)


def test_second_call_uses_cache_and_a_changed_file_invalidates_it(
    writable_synthetic_root, tmp_path, monkeypatch
):
    first = index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    calls = []
    real_read_pair = index_module.read_pair

    def counting_read_pair(*args):
        calls.append(args)
        return real_read_pair(*args)

    monkeypatch.setattr(index_module, "read_pair", counting_read_pair)
    second = index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    assert calls == []  # nothing decoded again
    assert second.equals(first)

    # Add tumour to a tumour-free slice: the file list hash changes, so the index is rebuilt.
    image_path, mask_path = slice_paths(writable_synthetic_root, case_number=2, slice_number=1)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 255
    write_tiff(mask_path, mask)
    third = index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    assert len(calls) == len(first)
    row = third[third["image_path"] == str(image_path)].iloc[0]
    assert row["has_tumor"] and row["tumor_pixels"] == 100


# --- bad input ---------------------------------------------------------------------------------


def _missing_mask(root):
    image, mask = slice_paths(root, 0, 3)
    mask.unlink()
    return image, "image without mask"


def _mask_without_image(root):
    image, mask = slice_paths(root, 1, 2)
    image.unlink()
    return mask, "mask without image"


def _zero_byte_image(root):
    image, _ = slice_paths(root, 0, 1)
    image.write_bytes(b"")
    return image, "zero bytes"


def _truncated_image(root):
    image, _ = slice_paths(root, 3, 10)
    return truncate(image), "truncated"


def _truncated_mask(root):
    _, mask = slice_paths(root, 4, 2)
    return truncate(mask), "truncated"


def _garbage_image(root):
    image, _ = slice_paths(root, 2, 4)
    image.write_bytes(b"this is not a tiff file" * 20)
    return image, "unreadable"


def _grayscale_image(root):
    image, _ = slice_paths(root, 5, 1)
    write_tiff(image, np.zeros((64, 64), np.uint8))
    return image, "wrong shape"


def _uint16_image(root):
    image, _ = slice_paths(root, 5, 2)
    write_tiff(image, np.zeros((64, 64, 3), np.uint16))
    return image, "wrong dtype"


def _mask_of_other_size(root):
    _, mask = slice_paths(root, 1, 1)
    write_tiff(mask, np.zeros((32, 32), np.uint8))
    return mask, "but its mask is 32x32"


def _mask_with_differing_channels(root):
    _, mask = slice_paths(root, 1, 3)
    bad = np.zeros((64, 64, 3), np.uint8)
    bad[..., 0] = 255
    write_tiff(mask, bad)
    return mask, "channels that differ"


def _float_mask(root):
    _, mask = slice_paths(root, 1, 4)
    write_tiff(mask, np.zeros((64, 64), np.float32))
    return mask, "wrong dtype"


def _empty_case_folder(root):
    folder = root / "TCGA_ZZ_9999_20200101"
    folder.mkdir()
    return folder, "empty case folder"


def _stray_tiff(root):
    image, _ = slice_paths(root, 0, 1)
    stray = root / "loose_1.tif"
    shutil.copy(image, stray)
    return stray, "outside any case folder"


DAMAGE = [
    _missing_mask,
    _mask_without_image,
    _zero_byte_image,
    _truncated_image,
    _truncated_mask,
    _garbage_image,
    _grayscale_image,
    _uint16_image,
    _mask_of_other_size,
    _mask_with_differing_channels,
    _float_mask,
    _empty_case_folder,
    _stray_tiff,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_raises_naming_the_file(damage, writable_synthetic_root, tmp_path):
    offender, problem = damage(writable_synthetic_root)
    with pytest.raises(DataError) as err:
        index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    assert str(offender) in err.value.files
    line = next(ln for ln in str(err.value).splitlines() if str(offender) in ln)
    assert problem in line


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_skip_bad_lists_and_goes_on(damage, writable_synthetic_root, tmp_path):
    offender, problem = damage(writable_synthetic_root)
    with pytest.warns(UserWarning, match="skipping"):
        df = index_dataset(writable_synthetic_root, cache_dir=tmp_path, skip_bad=True)
    skipped = df.attrs["skipped"]
    assert any(s["path"] == str(offender) and problem in s["problem"] for s in skipped)
    # Only the damaged slice (if any) is dropped.
    assert len(df) >= expected_counts()["slices"] - 1
    assert str(offender) not in set(df["image_path"]) | set(df["mask_path"])


def test_every_problem_is_reported_at_once(writable_synthetic_root, tmp_path):
    damaged = [d(writable_synthetic_root)[0] for d in (_missing_mask, _truncated_image, _empty_case_folder)]
    with pytest.raises(DataError) as err:
        index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    assert {str(p) for p in damaged} <= set(err.value.files)
    assert "skip" in str(err.value)  # says how to go on anyway


def test_problems_survive_the_cache(writable_synthetic_root, tmp_path):
    offender, _ = _truncated_mask(writable_synthetic_root)
    with pytest.warns(UserWarning):
        index_dataset(writable_synthetic_root, cache_dir=tmp_path, skip_bad=True)
    with pytest.raises(DataError) as err:  # the cached result still remembers the bad file
        index_dataset(writable_synthetic_root, cache_dir=tmp_path)
    assert str(offender) in err.value.files


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        index_dataset(tmp_path / "nope", cache_dir=tmp_path)
    assert str(tmp_path / "nope") in err.value.files


def test_root_that_is_a_file(tmp_path):
    path = tmp_path / "kaggle_3m"
    path.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        index_dataset(path, cache_dir=tmp_path)


@pytest.mark.parametrize("content", ["empty", "other_folders", "case_folders_without_tifs"])
def test_root_that_is_not_a_kaggle_layout(tmp_path, content):
    root = tmp_path / "root"
    root.mkdir()
    if content == "other_folders":
        (root / "images").mkdir()
        write_tiff(root / "images" / "a.tif", np.zeros((4, 4, 3), np.uint8))
    elif content == "case_folders_without_tifs":
        (root / "TCGA_AA_0001_19990101").mkdir()
    with pytest.raises(DataError, match="not a Kaggle") as err:
        index_dataset(root, cache_dir=tmp_path / "cache")
    assert str(root) in str(err.value)


def test_parent_of_the_kaggle_folder_gets_a_hint(writable_synthetic_root, tmp_path):
    with pytest.raises(DataError, match="did you mean"):
        index_dataset(writable_synthetic_root.parent, cache_dir=tmp_path / "cache")


# --- command line ------------------------------------------------------------------------------


def test_cli_index_prints_counts_and_writes_splits(synthetic_root, tmp_path, capsys):
    splits = tmp_path / "splits.csv"
    argv = ["index", "--data-dir", str(synthetic_root), "--cache-dir", str(tmp_path), "--splits", str(splits)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    counts = expected_counts()
    assert f"Patients:         {counts['patients']}" in out
    assert f"Slices:           {counts['slices']}" in out
    assert f"Tumour slices:    {counts['tumor_slices']}" in out
    for name in ("train", "val", "test", "total"):
        assert name in out
    assert splits.is_file() and "written" in out
    assert cli_main(argv) == 0
    assert "reused" in capsys.readouterr().out


def test_cli_index_reports_bad_files_and_can_skip_them(writable_synthetic_root, tmp_path, capsys):
    offender, _ = _missing_mask(writable_synthetic_root)
    argv = ["index", "--data-dir", str(writable_synthetic_root), "--cache-dir", str(tmp_path)]
    argv += ["--splits", str(tmp_path / "splits.csv")]
    assert cli_main(argv) == 1
    assert str(offender) in capsys.readouterr().err
    with pytest.warns(UserWarning):
        assert cli_main([*argv, "--skip-bad"]) == 0
    assert "Skipped files:    1" in capsys.readouterr().out


# --- the shared development copy ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared_data
def test_shared_copy_counts(shared_root):
    # Uses the project cache (.cache/ or $LGG_CACHE_DIR): the first run decodes ~3k slices.
    df = index_dataset(shared_root)
    assert summarize(df) == {"patients": 81, "slices": 2936, "tumor_slices": 1030, "tumor_patients": 81}
    assert df.groupby("case")["slice"].apply(lambda s: s.is_monotonic_increasing).all()


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_the_bars_of_the_first_read(synthetic_root, tmp_path, monkeypatch, progress):
    from pipeline.data import array_cache

    disabled: list[bool] = []

    def recording_tqdm(iterable, *args, disable=False, **kwargs):
        disabled.append(disable)
        return iterable

    monkeypatch.setattr(index_module, "tqdm", recording_tqdm)
    monkeypatch.setattr(array_cache, "tqdm", recording_tqdm)
    df = index_dataset(synthetic_root, cache_dir=tmp_path, progress=progress)
    array_cache.load_arrays(df, tmp_path, progress=progress)
    assert disabled == [not progress, not progress]  # the index read, then the array cache build
