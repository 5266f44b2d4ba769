"""The one place that chooses the Keras dtype policy (float32 or mixed precision).

`auto` picks the fastest policy the hardware runs natively:

* a visible GPU                        -> ``mixed_float16`` (tensor cores)
* a CPU advertising ``amx_bf16``         -> ``mixed_bfloat16`` (AMX tiles: measured on a 2-core Xeon,
  the ResNet50-encoder U-Net trains at 13.5 img/s in bf16 against 8.0 in float32)
* anything else                          -> ``float32``. That includes AVX512-BF16 without AMX,
  where the flags do not settle it (`needs_timing`): the ResUNet trained slower in bf16 (Intel
  Xeon: 14.3 img/s against 20.2; AMD EPYC: 31.2 against 35.0) but the ResNet50-encoder U-Net
  faster (AMD EPYC: 18.6 against 12.3). A training run times both there
  (`pipeline.training.policy_probe`); inference and the benchmarks keep this rule.

Under a mixed policy layers compute in 16 bits and keep float32 variables. The models keep
their first layer (normalisation) and their sigmoid output layers in float32, and the
losses are computed in float32, so probabilities and loss values are never rounded to 16 bits.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.models.resnet_classifier import OUTPUT_NAME as CLASSIFIER_OUTPUT
from pipeline.models.resnet_classifier import RESIZE_NAME
from pipeline.models.resunet import OUTPUT_NAME as SEGMENTER_OUTPUT
from pipeline.models.variant_record import CPU_CLASS_FLAGS, CPU_CLASSES

log = logging.getLogger(__name__)

AUTO = "auto"
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
VALID_NAMES = (AUTO, *POLICIES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FAST_BF16_CPU_FLAGS = ("amx_bf16",)  # where `auto` picks mixed_bfloat16 (module docstring)
CPUINFO = Path("/proc/cpuinfo")
# Layers built with an explicit float32 dtype (probabilities, the classifier's resize): they stay
# float32 under any policy (`with_policy`).
FLOAT32_LAYERS = (CLASSIFIER_OUTPUT, SEGMENTER_OUTPUT, RESIZE_NAME)
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy")
_16_BIT_DTYPES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def gpu_available() -> bool:
    """True when TensorFlow sees at least one GPU."""
    import tensorflow as tf  # imported here: Keras already loaded it, this only names it

    return bool(tf.config.list_physical_devices("GPU"))


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU feature flags listed in `/proc/cpuinfo` (empty set when the file is unreadable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from `/proc/cpuinfo` (`platform.processor()` where it does not say)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def cpu_class(flags: set[str] | None = None) -> str:
    """The CPU's capability class for the pair's variant record (`pipeline.models.variant_record`):
    `amx`, `avx512_bf16`, `vnni`, `avx2` or `baseline`, the first whose flag `flags` (default
    `cpu_flags()`) lists. Variants that pass on one class are trusted on every CPU of that class:
    the class decides which kernels (and so which roundings) OpenVINO runs."""
    flags = cpu_flags() if flags is None else set(flags)
    for name, needed in CPU_CLASS_FLAGS:
        if flags & needed:
            return name
    return CPU_CLASSES[-1]


def cpu_supports_bfloat16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def needs_timing(flags: set[str] | None = None) -> bool:
    """True where `auto` cannot choose by the CPU's flags (`flags`, default `cpu_flags()`): native
    bfloat16 (AVX512-BF16) without AMX and no GPU; whether bf16 trains faster there depends on
    the model (module docstring)."""
    flags = cpu_flags() if flags is None else set(flags)
    return "avx512_bf16" in flags and not flags & set(FAST_BF16_CPU_FLAGS) and not gpu_available()


def resolve_policy(name: str = AUTO) -> str:
    """Policy name (`auto`, `float32`, `mixed_float16`, `mixed_bfloat16`) -> concrete Keras policy name.

    Explicit names pass through unchanged; `auto` inspects the hardware (see module docstring).
    Raises ValueError naming the valid choices for anything else.
    """
    key = str(name).strip().lower()
    if key not in VALID_NAMES:
        raise ValueError(f"unknown dtype policy {name!r}; valid: {', '.join(VALID_NAMES)}")
    if key != AUTO:
        return key
    if gpu_available():
        return "mixed_float16"
    if cpu_flags() & set(FAST_BF16_CPU_FLAGS):
        return "mixed_bfloat16"
    return "float32"


def apply_policy(name: str = AUTO) -> str:
    """Resolve `name`, set it as Keras's global dtype policy and return the concrete name.

    Models built afterwards use it; models already built keep the policy they were built with
    (it is stored per layer, also in `.keras` files).
    """
    policy = resolve_policy(name)
    keras.mixed_precision.set_global_policy(policy)
    log.info("dtype policy: %s (requested %s)", policy, name)
    return policy


def _config_with_policy(node: Any, policy: str, keep: tuple[str, ...]) -> tuple[Any, bool]:
    """A copy of a model config with every layer's dtype policy set to `policy` (layers named in
    `keep` and an input's plain "float32" untouched), and whether any changed."""
    if isinstance(node, list):
        items = [_config_with_policy(v, policy, keep) for v in node]
        return [v for v, _ in items], any(c for _, c in items)
    if not isinstance(node, dict):
        return node, False
    if node.get("class_name") in _POLICY_CLASSES and isinstance(node.get("config"), dict):
        if node["config"].get("name") == policy:
            return node, False
        return {**node, "config": {**node["config"], "name": policy}}, True
    if isinstance(node.get("config"), dict) and node["config"].get("name") in keep:
        return node, False
    out, changed = {}, False
    for key, value in node.items():
        if key == "dtype" and value in _16_BIT_DTYPES and value != policy:  # an older plain-string policy
            out[key], c = policy, True
        else:
            out[key], c = _config_with_policy(value, policy, keep)
        changed |= c
    return out, changed


def with_policy(model: keras.Model, policy: str, keep: tuple[str, ...] = FLOAT32_LAYERS) -> keras.Model:
    """`model` rebuilt from its config with every layer under the dtype `policy` (but `keep`), its
    weights copied in (as float32 arrays); `model` itself when nothing changes.

    A saved layer keeps the policy it was saved under, so this is how a float32 release runs
    under `mixed_bfloat16` (the bench) and a mixed-precision run becomes a float32 release.
    Works for nested models (a classifier's backbone, an ensemble's members).
    """
    config, changed = _config_with_policy(model.get_config(), policy, keep)
    if not changed:
        return model
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights([np.asarray(w, np.float32) if np.issubdtype(np.asarray(w).dtype, np.floating)
                         else w for w in model.get_weights()])
    return rebuilt


def as_float32_model(model: keras.Model) -> keras.Model:
    """`model` itself when every layer computes in float32, else a float32 rebuild with its weights.

    A run trained under a mixed policy (GPU `mixed_float16`, CPU `mixed_bfloat16`) has layers that
    compute in 16 bits. The release runs everywhere, so it computes in float32, and so does an
    OpenVINO export (OpenVINO's CPU plugin cannot compile the casts of a bf16-trained encoder).
    """
    return with_policy(model, "float32", keep=())
