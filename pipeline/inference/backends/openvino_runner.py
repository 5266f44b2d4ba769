"""The OpenVINO backend: a Keras model's cached IR, compiled per static batch shape, on the CPU.

Why static shapes: the IR Keras exports has a dynamic batch dimension, which the CPU plugin
runs at less than half the speed of a fixed one. The runner compiles one reshaped copy per
part size it meets (at most `batch_size / streams` of them; a fraction of a second each, and
OpenVINO's `CACHE_DIR` keeps the compiled blobs between runs), so unlike Keras it takes batches
of any length unpadded (`pads_batches = False`).

Why several requests: the CPU plugin is compiled with `NUM_STREAMS` streams (`default_streams`:
as many as the plugin allows on this machine, at most `MAX_STREAMS`), a batch is split into that
many equal parts, which run side by side (asynchronous requests release the GIL) and are joined
in order. On 2 cores that is ~15-25 % faster than one request on the whole batch.

Variants: each model runs as `f32` or `bf16` (the `INFERENCE_PRECISION_HINT` of the cached IR) or
`int8` (the pair's INT8 IR, `pair_artifact.int8_irs`). `precision="auto"` (`choose_variant`):
* the pair's variant record for this CPU class (`pipeline.models.variant_record`, written by
  `variant_check`: each variant against Keras on real validation slices) names the candidates:
  f32 always, bf16 and int8 where they passed (bf16 only where the CPU runs it natively, and it
  must also pass this IR's own agreement check). One candidate runs as it is; among several the
  fastest is kept: each is timed once on this machine (`variant_rates`, `_rate`) and the choice
  recorded per CPU (`cpu_key`) in the cache manifest (`variant_by_cpu`), read by later runs while
  the candidates are the same;
* without a record for this CPU class: never the INT8 IR (checked where it was made is not
  checked here); f32 without native bfloat16 (OpenVINO's `OPTIMIZATION_CAPABILITIES` lacks BF16);
  else bf16 only when it agrees with Keras on the synthetic probe within half the tolerance
  (`_auto_agrees`, as real slices drift further), then with AMX bf16, and with AVX512-BF16 alone
  both timed once and bf16 kept only when >= `BF16_MARGIN` faster (`precision_by_cpu` in the
  manifest).
`f32` / `bf16` / `int8` force a variant; one the pair's record marks failed on this CPU class is
refused (BackendError naming the check and the drift). Every precision hint is checked against
Keras (`agreement`) the first time it is used with a model; a disagreement raises BackendError.

INT8 IRs run on one stream (`INT8_STREAMS`). Measured (2-core AVX2 EPYC, OpenVINO 2026.4.1, the
0.3.1 segmenter's INT8 IR): compiled with two streams while other processes kept the cores busy,
it gave wrong maps in 4 of 5 compiles (up to 0.55 from float32, masks 27x too large), the same on
every later batch of that compile, with no error; on an idle CPU, and with one stream under the same
load (6 of 6), it matched. float32 with two streams under that load matched (5 of 5).

Measured on the release classifier (2-core AMX Xeon, OpenVINO 2026.4.1): bf16 drifts up to 0.021
from Keras on the validation slices, and keeping the head (pooling, dense, sigmoid), the last
stage, or the stem in f32 (the model split in two compiled parts) left it at 0.018-0.027, so no
partial-f32 variant is offered: that drift is spread over the backbone.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference.backends.base import AUTO, INT8, OPENVINO, PRECISIONS, VARIANTS, BackendError
from pipeline.inference.backends.ir_cache import IREntry, cached_ir, model_fingerprint
from pipeline.models.agreement import PROBABILITY_TOL, agreement, check_agreement, model_probe
from pipeline.models.variant_record import failure

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "OpenVINORunner", "choose_variant", "cpu_key", "int8_runner", "openvino_runner",
           "variant_rates", "variant_runner"]

BF16_MARGIN = 1.10
AUTO_PROBABILITY_MARGIN = 0.5
LOAD_PROBE_SLICES = 2  # the behaviour probe of an IR loaded from the cache: a short one
LOAD_DRIFT_FACTOR = 2.0  # its outputs may drift this many times what the export check measured
LOAD_DRIFT_FLOOR = 1e-3  # ... and at least this much (another batch shape rounds differently)
MAX_STREAMS = 4  # more parts would make each too small to use a core well at batch 16
INT8_STREAMS = 1  # module docstring: two streams on a loaded CPU gave wrong INT8 maps
TIMING_REPEATS = 3
_CORE: Any = None


def core() -> Any:
    """The process's one `openvino.Core` (plugins load once)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def native_bf16() -> bool:
    """True when OpenVINO's CPU plugin runs bfloat16 natively on this machine."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def has_amx() -> bool:
    """True when /proc/cpuinfo lists AMX-BF16."""
    from pipeline.models.precision import cpu_flags

    return "amx_bf16" in cpu_flags()


def cpu_key() -> str:
    """This CPU, for the per-CPU precision record: model name and the flags that matter."""
    from pipeline.models.precision import cpu_flags

    name = core().get_property("CPU", "FULL_DEVICE_NAME") or platform.processor()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"})
    return f"{name} [{' '.join(flags)}] x{os.cpu_count()}"


def default_streams() -> int:
    """Streams (parallel requests) for this CPU: the plugin's upper bound, at most MAX_STREAMS."""
    low_high = core().get_property("CPU", "RANGE_FOR_STREAMS")
    return max(1, min(MAX_STREAMS, int(low_high[-1])))


class OpenVINORunner:
    """`predict_on_batch` through OpenVINO: float32 (B, H, W, 3) -> float32 outputs.

    xml: the IR file; precision: the hint, `f32` or `bf16`; compiled_dir: OpenVINO's blob cache
    (or None); streams: parallel requests per batch (default `default_streams()`); label: what
    `precision` reports instead of the hint (`int8` for a quantized IR).
    """

    name = OPENVINO
    pads_batches = False  # any batch length: one static shape per part size, compiled once

    def __init__(self, xml: str | os.PathLike, precision: str = "f32",
                 compiled_dir: str | os.PathLike | None = None, streams: int | None = None,
                 label: str | None = None, entry: IREntry | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown OpenVINO precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.xml = Path(xml)
        self.hint = precision
        self.precision = label or precision
        self.compiled_dir = Path(compiled_dir) if compiled_dir else None
        self.entry = entry  # the cache entry whose compiled blobs get their sums recorded
        self._model: Any = None
        self._compiled: dict[tuple[int, ...], list[Any]] = {}
        self.streams = int(streams) if streams else default_streams()

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.hint, "NUM_STREAMS": self.streams}
        if self.compiled_dir is not None:
            config["CACHE_DIR"] = str(self.compiled_dir)
        return config

    def _requests(self, shape: tuple[int, ...]) -> list[Any]:
        if shape not in self._compiled:
            if self._model is None:
                self._model = core().read_model(str(self.xml))
            model = self._model.clone()
            model.reshape(list(shape))
            compiled = core().compile_model(model, "CPU", self._config())
            self._compiled[shape] = [compiled.create_infer_request() for _ in range(self.streams)]
            if self.entry is not None and self.compiled_dir is not None:
                self.entry.record_compiled()  # the blob this compile wrote, under a sum
        return self._compiled[shape]

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        n = len(x)
        if n == 0:
            raise ValueError("predict_on_batch needs at least one slice")
        parts = min(self.streams, n)
        part = math.ceil(n / parts)
        if part * parts != n:  # equal parts keep one compiled shape per bucket
            x = np.concatenate([x, np.zeros((part * parts - n, *x.shape[1:]), np.float32)])
        requests = self._requests((part, *x.shape[1:]))
        for i in range(parts):
            requests[i].start_async({0: x[i * part : (i + 1) * part]})
        outs = []
        for i in range(parts):
            requests[i].wait()
            outs.append(np.array(requests[i].get_output_tensor(0).data, np.float32))
        return np.concatenate(outs)[:n]


def _rate(runner: OpenVINORunner, x: np.ndarray) -> float:
    runner.predict_on_batch(x)  # compile and warm up
    start = time.perf_counter()
    for _ in range(TIMING_REPEATS):
        runner.predict_on_batch(x)
    return TIMING_REPEATS * len(x) / (time.perf_counter() - start)


def _agreement(entry: IREntry, model: Any, precision: str) -> dict[str, Any]:
    """The agreement of `precision` with Keras on `model`, checked once and kept in the manifest."""
    known = entry.manifest.get("agreement", {}).get(precision)
    if isinstance(known, dict) and "ok" in known:
        return known
    runner = variant_runner(entry, precision)
    result = check_agreement(model, runner.predict_on_batch)
    entry.record("agreement", {precision: result})
    return result


def _auto_agrees(result: dict[str, Any]) -> bool:
    """Whether `auto` may pick bf16 for a pair without a variant record for this CPU class: the
    agreement check passed, and for probabilities with headroom (`AUTO_PROBABILITY_MARGIN`): on
    real slices the release classifier's bf16 drift was 1.8x its drift on the synthetic probe
    (0.0148 against 0.0084), past the 1e-2 tolerance."""
    if not result.get("ok"):
        return False
    if result.get("kind") == "probability":
        return result["max_abs_diff"] <= AUTO_PROBABILITY_MARGIN * PROBABILITY_TOL
    return True


def _unrecorded_choice(entry: IREntry, model: Any) -> str:
    """f32 or bf16 for a model the pair has no variant record of on this CPU class (module
    docstring: the synthetic probe with headroom; AMX -> bf16; AVX512-BF16 timed), recorded per
    CPU in the manifest (`precision_by_cpu`)."""
    if not native_bf16():
        return "f32"
    key = cpu_key()
    known = entry.manifest.get("precision_by_cpu", {}).get(key)
    if isinstance(known, dict) and known.get("chosen") in PRECISIONS:
        return known["chosen"]
    record: dict[str, Any] = {}
    if not _auto_agrees(_agreement(entry, model, "bf16")):
        chosen, record["reason"] = "f32", "bf16 too far from Keras on the probe"
    elif has_amx():
        chosen, record["reason"] = "bf16", "AMX"
    else:
        x = model_probe(model)
        rates = {p: _rate(variant_runner(entry, p), x)
                 for p in PRECISIONS}
        chosen = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["f32"] else "f32"
        record["slices_per_s"] = {p: round(r, 1) for p, r in rates.items()}
        record["reason"] = "timed"
    record["chosen"] = chosen
    entry.record("precision_by_cpu", {key: record})
    log.info("OpenVINO precision of %s on %s: %s (%s)", entry.manifest.get("model_sha256", "?")[:12], key,
             chosen, record)
    return chosen


def int8_runner(xml: str | os.PathLike, compiled_dir: str | os.PathLike | None = None,
                entry: IREntry | None = None) -> OpenVINORunner:
    """The runner of an INT8 IR `xml`: its quantized layers in 8 bits whatever the hint (f32
    elsewhere), on `INT8_STREAMS` streams (module docstring), reporting precision `int8`."""
    return OpenVINORunner(Path(xml), "f32", compiled_dir, streams=INT8_STREAMS, label=INT8, entry=entry)


def variant_runner(entry: IREntry, variant: str, int8_xml: str | os.PathLike | None = None) -> OpenVINORunner:
    """The runner of one variant: the cached IR under the `f32` / `bf16` hint, or for `int8` the
    pair's INT8 IR `int8_xml` (its quantized layers run in 8 bits whatever the hint; f32 elsewhere)."""
    if variant == INT8:
        if int8_xml is None:
            raise ValueError("the int8 variant needs the pair's INT8 IR (int8_xml)")
        return int8_runner(int8_xml, entry.compiled_dir, entry)
    return OpenVINORunner(entry.xml, variant, entry.compiled_dir, entry=entry)


def variant_rates(entry: IREntry, model: Any, candidates: list[str],
                  int8_xml: str | os.PathLike | None = None) -> dict[str, float]:
    """{variant: slices/s} of each candidate on the model's probe (`_rate`: warm-up, then
    TIMING_REPEATS timed batches). The one place `auto` times variants (tests replace it)."""
    x = model_probe(model)
    return {v: _rate(variant_runner(entry, v, int8_xml), x) for v in candidates}


def _candidates(entry: IREntry, model: Any, record: Mapping[str, Any],
                int8_xml: str | os.PathLike | None) -> list[str]:
    """The variants `auto` may run: f32, and those the pair's `record` (this CPU class) marks ok
    that can run here - bf16 only where the CPU runs it natively and it also passes the IR's
    own agreement check (`_agreement`, the synthetic probe), int8 only where the pair ships it and
    its record includes the run under load (`variant_check`; records before 0.3.2 lack it)."""
    out = ["f32"]
    if record.get("bf16", {}).get("ok") and native_bf16() and _agreement(entry, model, "bf16")["ok"]:
        out.append("bf16")
    int8 = record.get(INT8, {})
    if int8.get("ok") and "under_load" in int8 and int8_xml is not None:
        out.append(INT8)
    return out


def _fastest(entry: IREntry, model: Any, candidates: list[str], record: Mapping[str, Any],
             int8_xml: str | os.PathLike | None) -> str:
    """The fastest of `candidates` on this CPU: read from the manifest's `variant_by_cpu` record
    when it was timed on the same candidates (and INT8 files), else timed now and recorded."""
    key = cpu_key()
    wanted = {"candidates": list(candidates), "int8_files": (record.get(INT8) or {}).get("files_sha256")}
    known = entry.manifest.get("variant_by_cpu", {}).get(key)
    if (isinstance(known, dict) and known.get("chosen") in candidates
            and all(known.get(k) == v for k, v in wanted.items())):
        return known["chosen"]
    rates = variant_rates(entry, model, candidates, int8_xml)
    chosen = max(candidates, key=lambda v: rates[v])
    entry.record("variant_by_cpu", {key: {**wanted, "chosen": chosen, "reason": "fastest that passed",
                                          "slices_per_s": {v: round(r, 1) for v, r in rates.items()}}})
    log.info("OpenVINO variant of %s on %s: %s (slices/s %s)", entry.manifest.get("model_sha256", "?")[:12],
             key, chosen, rates)
    return chosen


def choose_variant(entry: IREntry, model: Any, requested: str = AUTO, record: Mapping[str, Any] | None = None,
                   int8_xml: str | os.PathLike | None = None) -> str:
    """The variant (`f32`, `bf16`, `int8`) that runs `model` on this CPU (module docstring).

    `record`: the pair's variant record of this model on this CPU class ({variant: result},
    `variant_record.applicable`); `int8_xml`: the pair's INT8 IR of the model. A forced
    `requested` variant the record marks failed is refused (BackendError saying which check
    failed and by how much); `int8` forced on a model without an INT8 IR runs f32.
    """
    record = dict(record or {})
    if requested != AUTO:
        if requested not in VARIANTS:
            raise ValueError(f"unknown OpenVINO precision {requested!r}; "
                             f"valid: {AUTO}, {', '.join(VARIANTS)}")
        result = record.get(requested)
        if result is not None and not result.get("ok"):
            raise BackendError(
                f"--precision {requested} is refused for {getattr(model, 'name', 'the model')}: the pair's "
                f"variant check on this CPU class ({result.get('cpu')}) failed, {failure(result)}; use "
                f"--precision auto (the fastest variant that passed) or f32")
        if requested == INT8 and int8_xml is None:
            log.info("no INT8 IR of %s in the pair: it runs f32", getattr(model, "name", "the model"))
            return "f32"
        return requested
    if not record:  # no check on this CPU class: never INT8 (module docstring)
        return _unrecorded_choice(entry, model)
    candidates = _candidates(entry, model, record, int8_xml)
    return candidates[0] if len(candidates) == 1 else _fastest(entry, model, candidates, record, int8_xml)


def probe_on_load(runner: OpenVINORunner, model: Any, entry: IREntry) -> dict[str, Any]:
    """Whether a runner on an IR taken from the cache still computes what the Keras `model` does,
    on the first `LOAD_PROBE_SLICES` of the export check's probe: bytes can match a manifest edited
    with them, behaviour cannot. The agreement (`pipeline.models.agreement`), and stricter than it:
    outputs no further from Keras than the export check measured (`LOAD_DRIFT_FACTOR` times, at
    least `LOAD_DRIFT_FLOOR`), and probabilities in [0, 1] where Keras' are (a sigmoid turned into
    a ReLU keeps masks on the same side of 0.5 but gives "probabilities" of 30)."""
    x = model_probe(model)[:LOAD_PROBE_SLICES]
    reference = np.asarray(model(x, training=False), np.float32)  # eager: no tracing for 2 slices
    candidate = runner.predict_on_batch(x)
    result = agreement(reference, candidate)
    recorded = (entry.manifest.get("agreement") or {}).get(runner.hint) or {}
    if isinstance(recorded.get("max_abs_diff"), int | float):
        limit = max(LOAD_DRIFT_FACTOR * recorded["max_abs_diff"], LOAD_DRIFT_FLOOR)
        if result["max_abs_diff"] > limit:
            result.update(ok=False, reason=f"drift {result['max_abs_diff']:.3g} > {limit:.3g} at export")
    if reference.min() >= 0.0 and reference.max() <= 1.0 and not (
            candidate.min() >= -LOAD_DRIFT_FLOOR and candidate.max() <= 1.0 + LOAD_DRIFT_FLOOR):
        low, high = float(candidate.min()), float(candidate.max())
        result.update(ok=False, reason=f"outputs in [{low:.3g}, {high:.3g}], not [0, 1]")
    return result


def openvino_runner(model: Any, *, sha256: str | None = None, precision: str = AUTO,
                    cache_dir: str | os.PathLike | None = None, check: bool = True,
                    int8_xml: str | os.PathLike | None = None,
                    variants: Mapping[str, Any] | None = None) -> OpenVINORunner:
    """An `OpenVINORunner` for the Keras `model` (see `pipeline.inference.backends.make_runner`).

    Exports the IR into the cache on first use, chooses the variant (`choose_variant`, from the
    pair's variant record `variants` of this model on this CPU class and its INT8 IR `int8_xml`,
    `pair_artifact.int8_irs`), and checks agreement with Keras once per precision hint (recorded
    in the manifest; an INT8 IR was checked on real slices where it was made and by
    `variant_check`, not on the synthetic probe, which lies outside its calibration statistics).
    An IR taken from the cache is probed against Keras on every load (`probe_on_load`) and
    exported again, with a warning, when it disagrees. Raises BackendError when the export fails,
    the float IR disagrees with Keras beyond the tolerances of `pipeline.models.agreement`, or a
    forced variant failed the pair's check.
    """
    key = sha256 or model_fingerprint(model)
    entry, exported = _cached(model, key, cache_dir)
    chosen = choose_variant(entry, model, precision, variants, int8_xml)
    if chosen == INT8:
        return variant_runner(entry, INT8, int8_xml)
    runner = variant_runner(entry, chosen)
    if check and not exported:  # `check=False` (benchmarks) skips the probe with the export check
        probe = probe_on_load(runner, model, entry)
        if not probe["ok"]:
            log.warning("OpenVINO cache %s is not used: its IR disagrees with the Keras model on the "
                        "load probe (%s); exporting the model again", entry.directory, probe)
            entry.discard()
            entry, _ = _cached(model, key, cache_dir)
            chosen = choose_variant(entry, model, precision, variants, None)
            runner = variant_runner(entry, chosen)
    if check:
        result = _agreement(entry, model, chosen)
        if not result["ok"]:
            name = getattr(model, "name", "the model")
            raise BackendError(f"OpenVINO ({chosen}) disagrees with Keras on {name}: {result} "
                               f"(cache {entry.directory})")
    return runner


def _cached(model: Any, key: str, cache_dir: str | os.PathLike | None) -> tuple[IREntry, bool]:
    """`ir_cache.cached_ir`, any converter failure as BackendError."""
    try:
        return cached_ir(model, key, cache_dir)
    except Exception as exc:  # noqa: BLE001 - any converter failure means: this model cannot run here
        raise BackendError(f"cannot export {getattr(model, 'name', 'the model')} to OpenVINO IR: "
                           f"{type(exc).__name__}: {exc}") from exc
