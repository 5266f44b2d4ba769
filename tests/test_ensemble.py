"""Ensembles of segmenters: one model whose output is the mean of its members', on both backends."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest

from pipeline.inference.image_loading import load_slice
from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.models import model_io
from pipeline.models.ensemble import build_ensemble, ensemble_members
from tests.inference_helpers import slice_images
from tests.model_helpers import make_tiny_classifier, make_tiny_segmenter


@pytest.fixture(scope="module")
def members() -> list[keras.Model]:
    out = []
    for seed in (3, 4):
        keras.utils.set_random_seed(seed)
        out.append(make_tiny_segmenter())
    return out


@pytest.fixture(scope="module")
def images(synthetic_root) -> list[np.ndarray]:
    return [load_slice(p) for p in slice_images(synthetic_root)[:12]]


def _member_mean(members, images) -> np.ndarray:
    x = np.stack(images).astype("float32")
    return np.mean([np.asarray(m(x, training=False))[..., 0] for m in members], axis=0)


def test_the_ensemble_outputs_the_mean_of_its_members(members, images):
    ensemble = build_ensemble(members)
    assert len(ensemble_members(ensemble)) == 2 and ensemble_members(members[0]) == []
    out = np.asarray(ensemble(np.stack(images).astype("float32"), training=False))[..., 0]
    expected = _member_mean(members, images)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert not np.allclose(expected, np.asarray(members[0](np.stack(images).astype("float32")))[..., 0],
                           atol=1e-3)  # the members differ, so the mean is not one of them


def test_fewer_than_two_members_are_refused(members):
    with pytest.raises(ValueError, match="at least 2"):
        build_ensemble(members[:1])


@pytest.fixture(scope="module")
def ensemble_pair(members, tmp_path_factory):
    keras.utils.set_random_seed(2)
    directory = tmp_path_factory.mktemp("ensemble_pair")
    record = {"threshold": 0.5, "segmenter_tile_size": 64, "policy": "float32", "backbone_weights": "none",
              "tiny_test_pair": True}
    return model_io.save_pair(directory, make_tiny_classifier(), build_ensemble(members), record)


@pytest.mark.parametrize("backend", ["keras", "openvino"])
def test_an_ensemble_pair_gives_the_mean_of_its_members_on_each_backend(ensemble_pair, members, images,
                                                                       backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    pipe = TumorPipeline.from_dir(ensemble_pair, backend=backend, batch_size=4)
    maps = np.stack(pipe.segment_probabilities(images))
    np.testing.assert_allclose(maps, _member_mean(members, images), atol=1e-4 if backend == "keras" else 1e-2)
    # the pair's sums cover the ensemble file: the members travel inside segmenter.keras
    assert len(ensemble_members(model_io.load_pair(ensemble_pair).segmenter)) == 2


def test_the_ensemble_command_averages_runs_and_keeps_the_first_runs_classifier_and_split(
        tiny_pair, images, tmp_path):
    from pipeline.cli import main
    from pipeline.models.pair_artifact import read_pair_record, write_pair_meta

    first = tmp_path / "fold0"
    shutil.copytree(tiny_pair, first)
    record = read_pair_record(first)
    write_pair_meta(first, {**record, "durations_minutes": {"segmenter_train": 1.5}})
    (first / "config.yaml").write_text("data: {fold: 0, folds: 3}\n", encoding="utf-8")
    assert main(["ensemble", str(first), "--out", str(tmp_path / "one")]) == 2
    assert main(["ensemble", str(first), str(tiny_pair), "--out", str(tmp_path / "ens")]) == 0
    pair = model_io.load_pair(tmp_path / "ens")  # the sums cover the new files
    members = ensemble_members(pair.segmenter)
    assert len(members) == 2
    source = read_pair_record(tiny_pair)["sha256"]
    assert pair.meta["ensemble"]["member_sha256"] == [source["segmenter.keras"]] * 2
    one = read_pair_record(tiny_pair).get("durations_minutes", {}).get("segmenter_train", 0.0)
    assert pair.meta["durations_minutes"]["segmenter_train"] == round(1.5 + one, 2)
    assert (tmp_path / "ens" / "config.yaml").read_text(encoding="utf-8") == "data: {fold: 0, folds: 3}\n"
    x = np.stack(images).astype("float32")  # two copies of one segmenter: the mean is that segmenter
    np.testing.assert_allclose(np.asarray(pair.segmenter(x)), np.asarray(members[0](x)), atol=1e-5)


def test_an_ensemble_runs_under_another_policy_with_its_probabilities_in_float32(members, images):
    """The bench times a float32 release under mixed_bfloat16: every member layer must compute in
    bfloat16 (not silently stay float32), the outputs stay float32 and near the float32 ones."""
    from pipeline.models.precision import with_policy

    ensemble = build_ensemble(members)
    mixed = with_policy(ensemble, "mixed_bfloat16")
    inner = [layer for member in ensemble_members(mixed) for layer in member.layers]
    assert {layer.dtype_policy.name for layer in inner if "conv" in layer.name} == {"mixed_bfloat16"}
    assert mixed.get_layer("mask_probability").dtype_policy.name == "float32"
    outputs = [m.get_layer("mask_probability") for m in ensemble_members(mixed)]
    assert {layer.dtype_policy.name for layer in outputs} == {"float32"}
    x = np.stack(images).astype(np.float32)
    got, want = mixed.predict_on_batch(x), ensemble.predict_on_batch(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)
    back = with_policy(mixed, "float32", keep=())
    assert {layer.dtype_policy.name for m in ensemble_members(back) for layer in m.layers} == {"float32"}


def test_an_ensemble_given_whole_adds_its_members_and_dir_hash_k_takes_one(ensemble_pair, tiny_pair,
                                                                          members, images, tmp_path):
    """Swapping one member of a release: `ensemble NEW models#1` keeps member 1 and drops member 0;
    an ensemble given whole counts as its members (one vote each, not one vote for the lot)."""
    from pipeline.cli import main

    x = np.stack(images).astype("float32")
    other = model_io.load_pair(tiny_pair).segmenter
    want_other = np.asarray(other(x, training=False))[..., 0]
    want = [np.asarray(m(x, training=False))[..., 0] for m in members]

    assert main(["ensemble", str(ensemble_pair), str(tiny_pair), "--out", str(tmp_path / "three")]) == 0
    three = model_io.load_pair(tmp_path / "three")
    assert len(ensemble_members(three.segmenter)) == 3
    assert three.meta["ensemble"]["networks"] == 3
    np.testing.assert_allclose(np.asarray(three.segmenter(x))[..., 0], np.mean([*want, want_other], axis=0),
                               atol=1e-5)

    assert main(["ensemble", f"{ensemble_pair}#1", str(tiny_pair), "--out", str(tmp_path / "swap")]) == 0
    swap = model_io.load_pair(tmp_path / "swap")
    assert len(ensemble_members(swap.segmenter)) == swap.meta["ensemble"]["networks"] == 2
    np.testing.assert_allclose(np.asarray(swap.segmenter(x))[..., 0], np.mean([want[1], want_other], axis=0),
                               atol=1e-5)


@pytest.mark.parametrize("spec, message", [("{ens}#2", "has 2 members"), ("{tiny}#0", "not an ensemble"),
                                           ("{ens}#0", "at least 2")])
def test_a_member_that_does_not_exist_or_too_few_networks_are_refused(ensemble_pair, tiny_pair, tmp_path,
                                                                      capsys, spec, message):
    from pipeline.cli import main

    source = spec.format(ens=ensemble_pair, tiny=tiny_pair)
    extra = [] if message == "at least 2" else [str(tiny_pair)]
    assert main(["ensemble", source, *extra, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "pipeline.json").exists()
