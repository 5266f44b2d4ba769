"""`training.policy: auto` on a CPU whose flags do not settle it: both policies timed, the faster kept
and remembered per CPU and design; elsewhere the flag rule, untimed."""

from __future__ import annotations

import json

import pytest

from pipeline.training import policy_probe
from pipeline.training.config import QUICK_PRESET, load_config, replace_in


def _config(*overrides: str):
    return load_config(presets=[QUICK_PRESET], overrides=["training.run_eagerly=false", *overrides])


class Timer:
    """A stand-in for the timing workers: fixed rates, and a count of what was timed."""

    def __init__(self, rates: dict[tuple[str, str], float]) -> None:
        self.rates, self.calls = rates, []

    def __call__(self, spec, policy):
        self.calls.append((spec["stage"], policy))
        return self.rates[(spec["stage"], policy)]


def never(spec, policy):
    raise AssertionError(f"timed {spec['stage']} under {policy} although nothing needed timing")


def test_bf16_needs_a_margin_and_the_models_count_together():
    assert policy_probe.choose({"float32": [10.0], "mixed_bfloat16": [15.0]}) == "mixed_bfloat16"
    assert policy_probe.choose({"float32": [10.0], "mixed_bfloat16": [10.5]}) == "float32"  # a tie: float32
    # faster in bf16 for one model and slower for the other: the summed time per image decides
    assert policy_probe.choose({"float32": [12.0, 35.0], "mixed_bfloat16": [18.6, 31.2]}) == "mixed_bfloat16"
    assert policy_probe.choose({"float32": [12.0, 10.0], "mixed_bfloat16": [13.0, 5.0]}) == "float32"


def test_the_faster_policy_is_timed_once_and_remembered(monkeypatch, tmp_path):
    monkeypatch.setattr(policy_probe, "needs_timing", lambda: True)
    timer = Timer({("segmenter", "float32"): 12.3, ("segmenter", "mixed_bfloat16"): 18.6})
    config = _config("segmenter.encoder=resnet50")
    assert policy_probe.training_policy(config, "segmenter", tmp_path, measure=timer) == "mixed_bfloat16"
    assert sorted(timer.calls) == [("segmenter", "float32"), ("segmenter", "mixed_bfloat16")]
    entry, = json.loads((tmp_path / policy_probe.CACHE_FILE).read_text()).values()
    assert entry["policy"] == "mixed_bfloat16" and entry["train_images_per_s"]["float32"] == [12.3]
    # the same CPU and design later: read back, not timed again
    assert policy_probe.training_policy(config, "segmenter", tmp_path, measure=never) == "mixed_bfloat16"
    # another design is another entry: timed
    slower = Timer({("segmenter", "float32"): 35.0, ("segmenter", "mixed_bfloat16"): 31.2})
    assert policy_probe.training_policy(_config(), "segmenter", tmp_path, measure=slower) == "float32"
    assert len(slower.calls) == 2 and len(json.loads((tmp_path / policy_probe.CACHE_FILE).read_text())) == 2


def test_a_run_of_both_stages_times_both_models(monkeypatch, tmp_path):
    monkeypatch.setattr(policy_probe, "needs_timing", lambda: True)
    timer = Timer({("classifier", "float32"): 50.0, ("classifier", "mixed_bfloat16"): 40.0,
                   ("segmenter", "float32"): 30.0, ("segmenter", "mixed_bfloat16"): 29.0})
    assert policy_probe.training_policy(_config(), "all", tmp_path, measure=timer) == "float32"
    assert {stage for stage, _ in timer.calls} == {"classifier", "segmenter"}


def test_a_damaged_cache_is_timed_again(monkeypatch, tmp_path):
    monkeypatch.setattr(policy_probe, "needs_timing", lambda: True)
    (tmp_path / policy_probe.CACHE_FILE).write_text("{not json")
    timer = Timer({("segmenter", "float32"): 20.0, ("segmenter", "mixed_bfloat16"): 10.0})
    assert policy_probe.training_policy(_config(), "segmenter", tmp_path, measure=timer) == "float32"
    assert len(timer.calls) == 2


def test_a_failed_probe_falls_back_to_the_flag_rule_and_is_not_remembered(monkeypatch, tmp_path):
    from pipeline.models.precision import resolve_policy

    monkeypatch.setattr(policy_probe, "needs_timing", lambda: True)

    def broken(spec, policy):
        raise RuntimeError("worker timing segmenter under float32 failed (exit -9)")

    policy = policy_probe.training_policy(_config(), "segmenter", tmp_path, measure=broken)
    assert policy == resolve_policy("auto")
    assert not (tmp_path / policy_probe.CACHE_FILE).exists()


@pytest.mark.parametrize("overrides, kwargs", [
    (("training.policy=float32",), {}),                 # asked for explicitly
    (("training.policy=mixed_bfloat16",), {}),
    ((), {"several_workers": True}),                     # trains in float32 across workers anyway
    (("training.run_eagerly=true",), {}),                # smoke run: eager steps say nothing
])
def test_nothing_is_timed_when_the_policy_is_settled(monkeypatch, tmp_path, overrides, kwargs):
    monkeypatch.setattr(policy_probe, "needs_timing", lambda: True)
    config = _config(*overrides)
    policy = policy_probe.training_policy(config, "segmenter", tmp_path, measure=never, **kwargs)
    assert policy in ("float32", "mixed_bfloat16")
    if "policy" in " ".join(overrides):
        assert policy == overrides[0].partition("=")[2]
    assert not (tmp_path / policy_probe.CACHE_FILE).exists()


def test_the_flag_rule_decides_where_it_can(monkeypatch, tmp_path):
    from pipeline.models import precision

    monkeypatch.setattr(policy_probe, "needs_timing", lambda: False)
    expected = precision.resolve_policy("auto")
    assert policy_probe.training_policy(_config(), "segmenter", tmp_path, measure=never) == expected
    monkeypatch.setattr(precision, "gpu_available", lambda: False)
    assert precision.needs_timing({"avx2", "avx512f", "avx512_bf16"})       # AVX512-BF16 alone: timed
    assert not precision.needs_timing({"avx2", "avx512_bf16", "amx_bf16"})  # AMX: bf16 by the flags
    assert not precision.needs_timing({"avx2", "fma"})                       # no native bfloat16


def test_the_worker_times_real_training_steps():
    """One real timing worker: a fresh process builds the configured segmenter and trains it."""
    config = replace_in(_config(), "segmenter.batch_size", 2)
    spec, = policy_probe.model_specs(config, "segmenter")
    assert spec["encoder"] == "resunet" and spec["size"] == config.segmenter.crop_size
    assert policy_probe._measure(spec, "float32") > 0
