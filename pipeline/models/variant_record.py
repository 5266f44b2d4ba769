"""Which variants of a pair's models give Keras' answers, on which CPU class: the `variants` record.

A variant is one model run one way on the OpenVINO backend: `f32`, `bf16` (the precision hints)
or `int8` (the pair's INT8 IR, `pair_artifact.int8_irs`). `python -m pipeline variants`
(`pipeline.inference.backends.variant_check`) runs each against Keras on real validation slices
and stores the outcome in the pair's `pipeline.json`:

    "variants": {role: {cpu class: {variant: {
        "ok": bool, "kind": "probability" | "map", "max_abs_diff": float,
        "mask_agreement": float (maps), "mask_dice": float (maps, from 0.3.0's record on),
        "n_slices": int, "cpu": the class again,
        "files_sha256": {pair file: sum} the variant ran (`.keras`, and the INT8 files for int8),
        "threshold": the pair's gate (classifier) or mask threshold (segmenter, where its masks
        were compared) when checked,
        "ok_idle": bool, "under_load": {the same fields, "busy_processes": int} (from 0.3.2 on: the
        run compiled again while other processes kept the cores busy; `ok` needs both),
        ... (gate_flips, openvino, checked: kept as written)}}}}

role: `classifier` or `segmenter`; cpu class: `CPU_CLASSES` (`pipeline.models.precision.cpu_class`);
`ok` applies the tolerances of `pipeline.models.agreement`. A record counts only while every sum in
its `files_sha256` is the pair's (`applicable`): a retrained model or a new INT8 file is unchecked
again. `check_variants` validates the record (`PairArtifact.from_dict` calls it, so a malformed
record is a DataError naming `pipeline.json`).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CPU_CLASSES",
    "CPU_CLASS_FLAGS",
    "VARIANTS",
    "VARIANTS_KEY",
    "applicable",
    "check_variants",
    "failure",
    "merge_variants",
]

VARIANTS_KEY = "variants"
VARIANTS = ("f32", "bf16", "int8")
ROLES = ("classifier", "segmenter")
KINDS = ("probability", "map")
# (class, any of these /proc/cpuinfo flags), best first (`precision.cpu_class`); the last needs none
CPU_CLASS_FLAGS = (
    ("amx", frozenset({"amx_bf16"})),
    ("avx512_bf16", frozenset({"avx512_bf16"})),
    ("vnni", frozenset({"avx512_vnni", "avx_vnni"})),
    ("avx2", frozenset({"avx2"})),
)
CPU_CLASSES = (*(name for name, _ in CPU_CLASS_FLAGS), "baseline")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _number(where: str, value: Any, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{where} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{where} must be in [{low}, {high if high is not None else 'inf'}], got {value!r}")


def _check_result(where: str, result: Any, cpu: str) -> None:
    if not isinstance(result, Mapping):
        raise ValueError(f"{where} must be an object, got {type(result).__name__}")
    if not isinstance(result.get("ok"), bool):
        raise ValueError(f"{where}.ok must be true or false, got {result.get('ok')!r}")
    if result.get("kind") not in KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(KINDS)}, got {result.get('kind')!r}")
    _number(f"{where}.max_abs_diff", result.get("max_abs_diff"), 0.0)
    if result["kind"] == "map":
        _number(f"{where}.mask_agreement", result.get("mask_agreement"), 0.0, 1.0)
        if "mask_dice" in result:  # records written before it have none
            _number(f"{where}.mask_dice", result["mask_dice"], 0.0, 1.0)
    n = result.get("n_slices")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}.n_slices must be an integer >= 1, got {n!r}")
    if result.get("cpu") != cpu:
        raise ValueError(f"{where}.cpu is {result.get('cpu')!r}, but the record is filed under {cpu!r}")
    sums = result.get("files_sha256")
    if not isinstance(sums, Mapping) or not sums or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in sums.items()):
        raise ValueError(f"{where}.files_sha256 must map the pair's file names to 64-digit hex sums")
    if "under_load" in result:  # records written before 0.3.2 have none
        loaded = result["under_load"]
        _check_result(f"{where}.under_load", loaded, cpu)
        if result["ok"] and not loaded["ok"]:
            raise ValueError(f"{where}.ok is true, but its run under load failed")


def _level(where: str, value: Any, valid: tuple[str, ...], what: str) -> Mapping[str, Any]:
    """`value` as one level of the record: an object whose keys are all in `valid` (ValueError else)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")
    for key in value:
        if key not in valid:
            raise ValueError(f"{where} has an unknown {what} {key!r}; valid: {', '.join(valid)}")
    return value


def check_variants(value: Any) -> dict[str, Any]:
    """Validate a `variants` record (module docstring) -> it, as a dict; ValueError naming the key."""
    for role, by_cpu in _level(f"'{VARIANTS_KEY}'", value, ROLES, "role").items():
        for cpu, by_variant in _level(f"{VARIANTS_KEY}.{role}", by_cpu, CPU_CLASSES, "CPU class").items():
            for variant, result in _level(f"{VARIANTS_KEY}.{role}.{cpu}", by_variant, VARIANTS,
                                          "variant").items():
                _check_result(f"{VARIANTS_KEY}.{role}.{cpu}.{variant}", result, cpu)
    return {role: {cpu: dict(v) for cpu, v in by_cpu.items()} for role, by_cpu in value.items()}


def applicable(variants: Mapping[str, Any] | None, role: str, cpu: str,
               sha256: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{variant: result} recorded for `role` on the CPU class `cpu` whose `files_sha256` are all
    in the pair's `sha256` map (records of other files are stale: left out). {} when none."""
    by_variant = ((variants or {}).get(role) or {}).get(cpu) or {}
    return {variant: dict(result) for variant, result in by_variant.items()
            if all(sha256.get(name) == digest for name, digest in result["files_sha256"].items())}


def merge_variants(variants: Mapping[str, Any] | None,
                   results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """`variants` with `results` ({role: {variant: result}}, each result naming its `cpu`) filed in:
    a role's results replace that role's record on their CPU class; other classes are kept."""
    merged = {role: {cpu: dict(v) for cpu, v in by_cpu.items()} for role, by_cpu in (variants or {}).items()}
    for role, by_variant in results.items():
        for cpu in {result["cpu"] for result in by_variant.values()}:
            merged.setdefault(role, {})[cpu] = {v: dict(r) for v, r in by_variant.items() if r["cpu"] == cpu}
    return check_variants(merged)


def failure(result: Mapping[str, Any]) -> str:
    """What a failed `result` missed and by how much, for messages ('' when it passed)."""
    from pipeline.models.agreement import MASK_AGREEMENT, MASK_DICE, PROBABILITY_TOL

    if result.get("ok"):
        return ""
    loaded = result.get("under_load")
    if result.get("ok_idle") and isinstance(loaded, Mapping) and not loaded.get("ok"):
        return (f"on a CPU kept busy by {loaded.get('busy_processes', '?')} other processes, "
                f"{failure(loaded)} (idle it passed)")
    n = result.get("n_slices")
    if (result.get("kind") == "map" and result["mask_agreement"] >= MASK_AGREEMENT
            and result.get("mask_dice", 1.0) < MASK_DICE):
        return (f"its masks reach a Dice of {result['mask_dice']:.3f} against Keras' on {n} slices, "
                f"below {MASK_DICE:g} (though {100 * result['mask_agreement']:.2f} % of the pixels agree)")
    if result.get("kind") == "map":
        return (f"its masks agree with Keras on {100 * result['mask_agreement']:.2f} % of the pixels of "
                f"{n} slices, below {100 * MASK_AGREEMENT:.1f} %")
    return (f"its probabilities differ from Keras by up to {result['max_abs_diff']:.4g} on {n} slices, "
            f"beyond {PROBABILITY_TOL:g}")
