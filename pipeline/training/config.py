"""Training configuration: a frozen dataclass tree loaded from YAML, presets and `--set` overrides.

Resolution order (later wins):

1. the base file (``configs/default.yaml``),
2. an optional preset file layered on top (``--quick`` = ``configs/quick.yaml``),
3. command-line overrides ``section.key=value`` (values parsed as YAML, so ``64``, ``1e-4``,
   ``true``, ``null`` and ``[0.7, 0.15, 0.15]`` have their natural types).

Every layer is checked against the dataclasses: an unknown section or key raises
`ConfigError` naming the key, the file it came from and the valid keys. String options
with a fixed set of values (`CHOICES`) are checked the same way. `dump_config` writes the
resolved tree as YAML; `load_config(that_file)` gives an equal object back.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write
from pipeline.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
QUICK_PRESET = CONFIG_DIR / "quick.yaml"


class ConfigError(DataError):
    """A config file or override is invalid; the message names the key and the valid choices."""


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from and how patients are split."""

    data_dir: str | None = None  # None: pipeline.paths.resolve_data_dir (flag > $LGG_DATA_DIR > default)
    cache_dir: str | None = None  # None: pipeline.paths.resolve_cache_dir
    splits: str = "models/splits.csv"  # relative paths are under the project root
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    skip_bad: bool = False
    # Cross-validation: with `fold` set, the train and validation patients of `splits` are dealt
    # into `folds` folds (pipeline.data.splits.make_folds); fold `fold` validates, the rest train.
    # The test patients never enter a fold. ``all``: every fold trains and none validates (the final
    # model retrained on all of them, with the epoch count and operating point the folds chose).
    fold: int | str | None = None
    folds: int = 5


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage 1: ResNet50 slice classifier (head-only phase on cached features, then fine-tuning)."""

    image_size: int = 128
    weights: str = "imagenet"  # "imagenet", "none" (from scratch) or a path to a weights file
    dropout: float = 0.3
    dense_units: int = 256
    batch_size: int = 32
    head_epochs: int = 30
    head_lr: float = 1e-3
    finetune_epochs: int = 8
    finetune_lr: float = 1e-4
    finetune_mode: str | int = 2  # "all" or the number of top ResNet stages to unfreeze
    class_weighting: bool = True
    augment: bool = True
    steps_per_epoch: int | None = None  # None: one full pass over the training slices


@dataclass(frozen=True)
class LossConfig:
    """Segmentation loss: a name known to `pipeline.losses.get_loss` and its keyword arguments."""

    name: str = "bce_dice"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"batch_dice": True})


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation of the segmenter: on/off plus `pipeline.data.augment.AugmentParams` fields."""

    enabled: bool = True
    # AugmentParams overrides; elastic warps are the slowest transform on a CPU, hence 0.2
    params: dict[str, Any] = field(default_factory=lambda: {"p_elastic": 0.2, "max_rotation": 15.0})


@dataclass(frozen=True)
class CropMixConfig:
    """Shares of the segmenter's training crops by kind (`pipeline.data.crop_sampler`); normalised."""

    tumor: float = 0.5  # a tumour slice, crop around the tumour
    random: float = 0.25  # any slice, crop around a random head pixel
    empty: float = 0.25  # a slice without tumour, hard negatives preferred


@dataclass(frozen=True)
class HardNegativeConfig:
    """How `empty` crops prefer the normal slices the pipeline would get wrong."""

    reference: str | None = "models"  # pair whose segmenter's false positives place empty crops; null: none
    weight: float = 4.0  # sampling weight 1 + weight * (classifier probability + reference fires)


@dataclass(frozen=True)
class SegmenterConfig:
    """Stage 2: ResUNet trained on a mix of tumour, random and hard-negative crops."""

    # resunet: the course ResUNet from scratch (base_filters, depth) | resnet50: ImageNet ResNet50
    # encoder with a residual decoder (pipeline.models.resnet_unet: encoder_*, decoder_filters)
    encoder: str = "resunet"
    base_filters: int = 16
    depth: int = 4
    encoder_weights: str = "imagenet"  # "imagenet", "none" or a weights file (resnet50 only)
    encoder_stages: int = 4  # ResNet50 stages used (3..5); the deepest skip has stride 2**encoder_stages
    encoder_trainable: int = 1  # top encoder stages fine-tuned (0: encoder frozen; BN always frozen)
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32)  # one width per level, deepest first
    batch_size: int = 16
    epochs: int = 80
    lr: float = 1e-3
    loss: LossConfig = field(default_factory=LossConfig)
    # mix: crops by `crop_mix` (tumour / random / empty); tumor: tumour slices only; all: every slice
    train_on: str = "mix"
    crop_mix: CropMixConfig = field(default_factory=CropMixConfig)
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    monitor: str = "val_patient_dice"  # selection metric, see pipeline.training.selection
    # validate every N-th epoch and the last (selection on every slice costs about as much as 80
    # training steps of the ResNet50 U-Net); the epochs between log NaN, and the patiences of early
    # stopping and of the plateau count validations, not epochs
    validate_every: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    steps_per_epoch: int | None = None
    crop_size: int | None = 128  # train on random crops (validation and inference stay full size)


@dataclass(frozen=True)
class BudgetConfig:
    """Wall-clock minutes per phase; a phase stops after the epoch that would overrun it."""

    classifier_head: float = 5.0
    classifier_finetune: float = 22.0
    segmenter: float = 48.0


@dataclass(frozen=True)
class TrainingConfig:
    """Settings shared by both stages."""

    policy: str = "auto"  # dtype policy for pipeline.models.precision.apply_policy
    seed: int = 42
    strategy: str = "auto"  # auto | default | mirrored | multi_worker (see pipeline.training.distribute)
    patience: int = 8  # EarlyStopping patience (epochs without validation improvement)
    lr_schedule: str = "plateau"  # plateau (ReduceLROnPlateau) | cosine (CosineDecay over the phase)
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_lr: float = 1e-6
    budget_minutes: BudgetConfig = field(default_factory=BudgetConfig)
    verbose: int = 0  # Keras fit output; the trainer logs one line per epoch whatever this says
    run_eagerly: bool = False  # skip tf.function graphs: slower per step, no tracing (tiny smoke runs)


@dataclass(frozen=True)
class CalibrationConfig:
    """Grid searched on the validation patients for the end-to-end pipeline."""

    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
    min_component_px: tuple[int, ...] = (0, 10, 30, 60)
    min_volume_px: tuple[int, ...] = (0, 50, 100, 200, 400, 800)
    neighbour_weights: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0)
    # segmenter probability -> mask; a list is searched too (each value keeps one mask array per
    # min_component_px of every validation slice in memory: ~50 MB per 800 slices)
    mask_threshold: float | tuple[float, ...] = 0.5
    # An operating point used as it is instead of the grid search (the `OperatingPoint` fields);
    # required when no patient validates (data.fold: all), e.g. the one the folds chose.
    fixed: dict[str, float] | None = None


@dataclass(frozen=True)
class OutputConfig:
    """Where runs are written."""

    runs_dir: str = "runs"  # relative paths are under the project root


@dataclass(frozen=True)
class Config:
    """The whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Fixed-choice string options: dotted key -> valid values (a typo names them).
CHOICES: dict[str, tuple[str, ...]] = {
    "segmenter.encoder": ("resunet", "resnet50"),
    "segmenter.train_on": ("mix", "tumor", "all"),
    "segmenter.monitor": ("val_patient_dice", "val_dice", "val_tumor_slice_dice"),
    "training.strategy": ("auto", "default", "mirrored", "multi_worker"),
    "training.lr_schedule": ("plateau", "cosine"),
    "training.policy": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
}


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain dicts


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}", [source])
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null", [source])
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc).splitlines()[0])
        raise ConfigError(f"{key}: {value!r} matches none of {tp} ({'; '.join(errors)})", [source])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}", [source])
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}", [source])
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", [source])
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}", [source])
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}", [source])
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}", [source])
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}", [source])
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str):
    """Build dataclass `cls` from `values`, rejecting unknown keys and checking types and choices."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in {where}; valid keys: {', '.join(names)}",
            [source],
        )
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key = _join(prefix, name)
        value = _coerce(values[name], hints[name], key, source)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}", [source])
        kwargs[name] = value
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate(config: Config, source: str) -> Config:
    """Cross-field checks the types cannot express."""
    c = config.classifier
    if isinstance(c.finetune_mode, str) and c.finetune_mode not in ("all", "frozen"):
        raise ConfigError(
            f"classifier.finetune_mode: {c.finetune_mode!r} is not 'all', 'frozen' or a number of stages",
            [source],
        )
    fr = config.data.fractions
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[1] <= 0:
        raise ConfigError(
            f"data.fractions: {fr} must be non-negative, sum to 1 and give a validation share", [source]
        )
    for key, value in (
        ("classifier.image_size", c.image_size),
        ("classifier.batch_size", c.batch_size),
        ("segmenter.batch_size", config.segmenter.batch_size),
        ("segmenter.base_filters", config.segmenter.base_filters),
        ("segmenter.depth", config.segmenter.depth),
    ):
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}", [source])
    for key, value in (
        ("classifier.head_epochs", c.head_epochs),
        ("classifier.finetune_epochs", c.finetune_epochs),
        ("segmenter.epochs", config.segmenter.epochs),
    ):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}", [source])
    _check_augment_params(config.segmenter.augment.params, source)
    _check_folds(config, source)
    _check_validate_every(config, source)
    s = config.segmenter
    bad = (s.encoder_stages not in (3, 4, 5) or len(s.decoder_filters) != s.encoder_stages
           or not 0 <= s.encoder_trainable < s.encoder_stages)
    if s.encoder == "resnet50" and bad:
        raise ConfigError(f"segmenter: encoder_stages {s.encoder_stages} must be 3..5 with one "
                          "decoder_filters "
                          f"width per stage (got {list(s.decoder_filters)}) and encoder_trainable in "
                          f"0..{s.encoder_stages - 1} (got {s.encoder_trainable})", [source])
    if any(not 0.0 < t < 1.0 for t in config.calibration.thresholds) or not config.calibration.thresholds:
        raise ConfigError("calibration.thresholds: need at least one value, each in (0, 1)", [source])
    cal = config.calibration
    if any(w < 0 or w > 1 for w in cal.neighbour_weights) or not cal.neighbour_weights:
        raise ConfigError("calibration.neighbour_weights: need at least one value, each in [0, 1]", [source])
    if any(v < 0 for v in (*cal.min_volume_px, *cal.min_component_px)) or not cal.min_volume_px:
        raise ConfigError("calibration.min_volume_px / min_component_px: values must be >= 0", [source])
    masks = mask_thresholds(cal.mask_threshold)
    if any(not 0.0 < t < 1.0 for t in masks) or not masks:
        raise ConfigError("calibration.mask_threshold: a value or a list of at least one, each in (0, 1)",
                          [source])
    return config


def mask_thresholds(value: float | Iterable[float]) -> tuple[float, ...]:
    """A mask threshold or several (`calibration.mask_threshold`) as the sorted tuple of distinct values."""
    values = value if isinstance(value, Iterable) else (value,)
    return tuple(sorted({float(t) for t in values}))


def _check_folds(config: Config, source: str) -> None:
    """data.fold is None, 0..folds-1 or 'all'; 'all' (no validation patients) needs calibration.fixed."""
    d, fixed = config.data, config.calibration.fixed
    numbered = isinstance(d.fold, int) and 0 <= d.fold < d.folds
    if d.folds < 2 or not (d.fold is None or d.fold == "all" or numbered):
        raise ConfigError(f"data.fold / data.folds: need folds >= 2 and fold 0..folds-1 or 'all', "
                          f"got fold={d.fold!r}, folds={d.folds}", [source])
    if d.fold == "all" and fixed is None:
        raise ConfigError("data.fold 'all' leaves no validation patient to calibrate on: set "
                          "calibration.fixed to the operating point the folds chose", [source])
    if fixed is not None:
        from pipeline.postprocessing import OperatingPoint  # lazy, like AugmentParams below

        try:
            OperatingPoint(**fixed)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibration.fixed: {exc}", [source]) from exc


def _check_validate_every(config: Config, source: str) -> None:
    """segmenter.validate_every: >= 1, and above 1 only where the pipeline selection validates."""
    s = config.segmenter
    if s.validate_every < 1:
        raise ConfigError(f"segmenter.validate_every: must be >= 1, got {s.validate_every}", [source])
    if s.validate_every > 1 and s.monitor == "val_dice" and s.train_on != "mix":
        raise ConfigError("segmenter.validate_every > 1 needs the pipeline selection (train_on: mix, or a "
                          f"monitor other than val_dice); got train_on={s.train_on!r}", [source])


def _check_augment_params(params: Mapping[str, Any], source: str) -> None:
    from pipeline.data.augment import AugmentParams  # lazy: keeps `import config` free of OpenCV

    valid = [f.name for f in dataclasses.fields(AugmentParams)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown config key 'segmenter.augment.params.{unknown[0]}'; valid keys: {', '.join(valid)}",
            [source],
        )
    try:
        AugmentParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"segmenter.augment.params: {exc}", [source]) from exc


# ---------------------------------------------------------------------------------------------
# layering files and overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", [path]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML: {exc}", [path]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of sections", [path])
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "kwargs":
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (["section", "key"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value", ["--set"])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts) or len(parts) < 2:
        raise ConfigError(f"override {text!r}: key must be dotted, e.g. classifier.image_size=64", ["--set"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}", ["--set"]) from exc
    return parts, value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(
    path: str | os.PathLike | None = DEFAULT_CONFIG,
    presets: Iterable[str | os.PathLike] = (),
    overrides: Iterable[str] = (),
) -> Config:
    """Resolve a `Config` from a base YAML file, preset files layered on top, then ``key=value`` overrides.

    `path=None` starts from the dataclass defaults. Each layer is checked as it is applied, so
    an error names the file (or ``--set key=value``) that introduced the bad key or value.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    layers += [(str(p), _read_yaml(Path(p))) for p in presets]
    return _apply_layers({}, layers, overrides)


def _apply_layers(
    merged: dict[str, Any], layers: list[tuple[str, dict[str, Any]]], overrides: Iterable[str]
) -> Config:
    layers = list(layers)
    for text in overrides:
        parts, value = parse_override(text)
        layers.append((f"--set {text}", _nest(parts, value)))
    source = "defaults"
    config = _build(Config, merged, "", source)
    for source, layer in layers:
        merged = _merge(merged, layer)
        config = _build(Config, merged, "", source)
    return _validate(config, source)


def replace_in(config: Any, dotted: str, value: Any) -> Any:
    """Return a copy of `config` with one dotted key replaced (e.g. ``data.data_dir``); no validation."""
    if "." not in dotted:
        return dataclasses.replace(config, **{dotted: value})
    head, rest = dotted.split(".", 1)
    return dataclasses.replace(config, **{head: replace_in(getattr(config, head), rest, value)})


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists) ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def dump_config(config: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML to `path` atomically; `load_config(path)` returns an equal Config."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("# Resolved training config of this run (defaults + preset + overrides).\n")
        yaml.safe_dump(config_to_dict(config), fh, sort_keys=False, default_flow_style=None)
    return path


def project_path(value: str | os.PathLike) -> Path:
    """A config path: absolute as given, relative ones under the project root."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
