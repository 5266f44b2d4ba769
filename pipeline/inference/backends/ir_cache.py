"""OpenVINO IR files of a Keras model, exported once and cached by the model's sha256.

Layout under the cache root (`$LGG_OPENVINO_CACHE`, else `$LGG_CACHE_DIR/openvino`, default
`.cache/openvino`):

    <sha256[:32]>-ov<openvino version>/
        model.xml, model.bin   the IR (`keras.Model.export(format="openvino")`, dynamic batch;
                               the runner reshapes it to static batch shapes before compiling)
        manifest.json          model_sha256 (full), openvino and keras versions, the IR files'
                               sha256, and what the runner records: agreement checks per
                               precision, the precision chosen per CPU, the sha256 of each
                               compiled blob (`compiled_sha256`, recorded after each compile)
        compiled/              OpenVINO's own compiled-blob cache (`CACHE_DIR`)

A directory is used only when its manifest names the same model sha256 and OpenVINO version
and its IR files and compiled blobs still have the recorded sums; anything else (a damaged or
half-written entry, a file changed by hand, another model's blob copied over one) is logged and
exported again - a stale IR is never reused. A blob no sum covers (its process was killed
before recording it) is removed, and compiled again when needed. Bytes are not enough: an IR
edited together with its manifest would pass, so the runner also probes every entry it loads
against the Keras model (`openvino_runner`), and a disagreement re-exports it.
Exports are written to a temporary directory and renamed into place, so an interrupted
export leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io_utils import atomic_write_json, sha256_of

log = logging.getLogger(__name__)

__all__ = ["IREntry", "cache_root", "cached_ir", "model_fingerprint"]

CACHE_ENV = "LGG_OPENVINO_CACHE"
MANIFEST = "manifest.json"
IR_XML = "model.xml"
IR_BIN = "model.bin"
COMPILED = "compiled"
FORMAT = 6  # bump when the meaning of the manifest or the export changes (5: compiled_sha256; 6: a
# mixed-policy model is exported as its float32 rebuild)


def cache_root(flag: str | os.PathLike | None = None) -> Path:
    """The IR cache root: `flag`, else `$LGG_OPENVINO_CACHE`, else `<$LGG_CACHE_DIR or .cache>/openvino`."""
    from pipeline.paths import resolve_cache_dir

    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else resolve_cache_dir() / "openvino"


def model_fingerprint(model: Any) -> str:
    """sha256 over a model's config and weights: the cache key of a model that has no file."""
    digest = hashlib.sha256(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weights in model.get_weights():
        array = np.ascontiguousarray(weights)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import keras
    import openvino

    return {"openvino": openvino.__version__.split("-")[0], "keras": keras.__version__}


class IREntry:
    """One cache directory: the IR of one model file, and its manifest."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @property
    def xml(self) -> Path:
        return self.directory / IR_XML

    @property
    def compiled_dir(self) -> Path:
        return self.directory / COMPILED

    def record(self, key: str, value: Any) -> None:
        """Store `value` under `key` in the manifest (merged into a dict there), written atomically."""
        current = self.manifest.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        self.manifest[key] = value
        atomic_write_json(self.directory / MANIFEST, self.manifest)

    def record_compiled(self) -> None:
        """Record the sum of every compiled blob no sum covers yet (after a compile wrote it)."""
        known = dict(self.manifest.get("compiled_sha256") or {})
        fresh = {}
        for path in _compiled_files(self.compiled_dir):
            name = path.relative_to(self.compiled_dir).as_posix()
            if name not in known:
                try:
                    fresh[name] = sha256_of(path)
                except OSError:  # removed meanwhile (another process found it uncovered)
                    continue
        if fresh:
            self.record("compiled_sha256", fresh)

    def discard(self) -> None:
        """Remove this entry (it failed the behaviour probe): the next `cached_ir` exports again."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _compiled_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _compiled_problem(directory: Path, manifest: dict[str, Any]) -> str | None:
    """Why the compiled blobs of an entry cannot be trusted, or None; blobs no sum covers are
    removed on the way (OpenVINO compiles them again)."""
    recorded = manifest.get("compiled_sha256") or {}
    if not isinstance(recorded, dict):
        return "its compiled_sha256 is not an object"
    for path in _compiled_files(directory / COMPILED):
        name = path.relative_to(directory / COMPILED).as_posix()
        if name not in recorded:
            path.unlink(missing_ok=True)
        elif sha256_of(path) != recorded[name]:
            return f"{COMPILED}/{name} does not match the sum in {MANIFEST}"
    return None


def _export_graph(model: Any) -> Any:
    """`model` with each nearest `UpSampling2D` computed by a nearest-neighbour resize, same weights.

    The same function (an integer-factor nearest resize repeats each pixel, as `UpSampling2D`
    does; outputs are identical), but Keras implements UpSampling2D with `repeat`, which the
    converter turns into slow reference Tile/Transpose kernels, while a resize becomes one
    optimised Interpolate: the ResUNet runs ~15 % faster. Models without such a layer, or that
    cannot be cloned, are returned as they are.
    """
    import keras
    import tensorflow as tf

    layers = getattr(model, "layers", [])
    if not any(isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation == "nearest"
               and layer.data_format == "channels_last" for layer in layers):
        return model

    class NearestResize(keras.layers.Layer):
        def __init__(self, size: tuple[int, int], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.size = tuple(int(v) for v in size)

        def call(self, x):
            shape = tf.shape(x)
            return tf.image.resize(x, (shape[1] * self.size[0], shape[2] * self.size[1]), method="nearest")

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation == "nearest":
            return NearestResize(layer.size, name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(layer.get_config())

    try:
        rewritten = keras.models.clone_model(model, clone_function=clone)
        rewritten.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as exc:  # e.g. a subclassed model
        log.info("exporting %s as it is (%s)", getattr(model, "name", "the model"), exc)
        return model
    return rewritten


def export_ir(model: Any, xml: Path) -> None:
    """Convert `model` to IR files `xml` (+ `.bin`): inference mode, float32 weights, dynamic batch.

    Not `model.export(format="openvino")`: that traces the model without `training=False`, and a
    nested backbone called without an explicit flag (the from-scratch classifier) is then traced
    with batch statistics in its BatchNormalization layers - a different function from Keras'
    `predict`. It also keeps the weights in float32 (`save_model` would halve them to float16),
    and upsampling layers are exported as resizes (`_export_graph`). A model trained under a
    mixed policy is exported as its float32 rebuild (`as_float32_model`, as the release stores
    it): the casts of a bf16-trained ResNet50 encoder do not compile on OpenVINO's CPU plugin
    ("Unsupported operation of type: Convert"), and the hint (f32, bf16) sets the precision anyway.
    """
    import openvino as ov
    import tensorflow as tf

    from pipeline.models.precision import as_float32_model

    shape = tuple(model.input_shape)
    spec = tf.TensorSpec((None, *shape[1:]), tf.float32, name="image")
    graph = _export_graph(as_float32_model(model))
    function = tf.function(lambda x: graph(x, training=False), input_signature=[spec])
    ov.save_model(ov.convert_model(function.get_concrete_function()), str(xml), compress_to_fp16=False)


def _problem(directory: Path, sha256: str, versions: dict[str, str]) -> str | None:
    """Why `directory` cannot be used for the model `sha256`, or None when it can."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable {MANIFEST} ({type(exc).__name__})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is not an object"
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r}, this code writes {FORMAT}"
    if manifest.get("model_sha256") != sha256:
        return f"it was exported from model {str(manifest.get('model_sha256'))[:12]}..., not {sha256[:12]}..."
    if manifest.get("openvino") != versions["openvino"]:
        return f"exported with OpenVINO {manifest.get('openvino')}, this is {versions['openvino']}"
    for name in (IR_XML, IR_BIN):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != manifest.get("ir_sha256", {}).get(name):
            return f"{name} does not match the sum in {MANIFEST}"
    return _compiled_problem(directory, manifest)


def _load(directory: Path) -> IREntry:
    return IREntry(directory, json.loads((directory / MANIFEST).read_text(encoding="utf-8")))


def cached_ir(model: Any, sha256: str, root: str | os.PathLike | None = None) -> tuple[IREntry, bool]:
    """The cache entry of `model` (whose `.keras` file has `sha256`), exporting it if needed.

    Returns (entry, exported): `exported` is True when the IR was (re)built by this call.
    """
    versions = _versions()
    root = cache_root(root)
    directory = root / f"{sha256[:32]}-ov{versions['openvino']}"
    if directory.exists():
        problem = _problem(directory, sha256, versions)
        if problem is None:
            return _load(directory), False
        log.warning("OpenVINO cache %s is not used: %s; exporting the model again", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        export_ir(model, tmp / IR_XML)
        manifest = {
            "format": FORMAT,
            "model_sha256": sha256,
            **versions,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "ir_sha256": {name: sha256_of(tmp / name) for name in (IR_XML, IR_BIN)},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process put a complete entry there first: use that one
            if _problem(directory, sha256, versions) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to OpenVINO IR in %s", sha256[:12], directory)
    return _load(directory), True
