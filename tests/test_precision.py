"""Dtype policy selection: `auto` follows the hardware, explicit names pass through, typos fail."""

from __future__ import annotations

import keras
import pytest

from pipeline.models import precision


@pytest.fixture
def restore_policy():
    """Put Keras's global dtype policy back after the test (it is process-wide)."""
    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)


@pytest.fixture
def hardware(monkeypatch):
    """Pretend hardware: set `gpu` and `flags` on the returned object before resolving."""

    class Fake:
        gpu = False
        flags: set[str] = set()

    fake = Fake()
    monkeypatch.setattr(precision, "gpu_available", lambda: fake.gpu)
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=precision.CPUINFO: set(fake.flags))
    return fake


@pytest.mark.parametrize(
    ("gpu", "flags", "expected"),
    [
        (True, set(), "mixed_float16"),
        (True, {"avx512_bf16"}, "mixed_float16"),  # a GPU wins over CPU bf16
        (False, {"avx512_bf16", "avx2"}, "float32"),  # native bf16 without AMX measured slower
        (False, {"amx_bf16"}, "mixed_bfloat16"),
        (False, {"avx2", "fma", "avx512f"}, "float32"),  # AVX-512 without BF16 only emulates bf16
        (False, set(), "float32"),
    ],
)
def test_auto_follows_hardware(hardware, gpu, flags, expected):
    hardware.gpu, hardware.flags = gpu, flags
    assert precision.resolve_policy("auto") == expected
    assert precision.resolve_policy() == expected


@pytest.mark.parametrize("name", ["float32", "mixed_float16", "mixed_bfloat16", " Mixed_BFloat16 "])
def test_explicit_names_pass_through(hardware, name):
    hardware.gpu, hardware.flags = True, {"amx_bf16"}  # must not matter
    assert precision.resolve_policy(name) == name.strip().lower()


def test_unknown_name_lists_valid_choices():
    with pytest.raises(ValueError, match="mixed_bfloat16") as info:
        precision.resolve_policy("float16")
    for name in precision.VALID_NAMES:
        assert name in str(info.value)


def test_cpu_flags_are_parsed_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    assert {"avx2", "amx_bf16"} <= precision.cpu_flags(cpuinfo)
    assert precision.cpu_supports_bfloat16(cpuinfo)
    cpuinfo.write_text("flags\t: fpu sse avx2\n")
    assert not precision.cpu_supports_bfloat16(cpuinfo)
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_apply_policy_sets_the_global_policy(restore_policy, hardware):
    hardware.flags = {"avx512_bf16", "amx_bf16"}
    assert precision.apply_policy("auto") == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert precision.apply_policy("float32") == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
