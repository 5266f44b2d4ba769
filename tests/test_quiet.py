"""Quiet by default: a command prints no TensorFlow/absl start-up chatter (`pipeline.quiet`)."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.paths import PROJECT_ROOT
from tests.inference_helpers import slice_images

CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard")


def test_a_real_command_prints_no_framework_chatter(tiny_pair, synthetic_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    image = slice_images(synthetic_root)[0]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "diagnose", str(image), "--out", str(tmp_path / "out"),
         "--models", str(tiny_pair), "--backend", "keras", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(c in line for c in CHATTER)], proc.stderr
    assert "1 slice(s)" in proc.stdout


def test_the_hook_steps_aside_after_tensorflow_and_verbose_installs_nothing(monkeypatch):
    from pipeline import quiet

    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    quiet.quiet_frameworks(verbose=True)
    assert not any(isinstance(f, quiet._QuietFinder) for f in sys.meta_path)
    finder = quiet._QuietFinder()
    sys.meta_path.insert(0, finder)
    assert finder.find_spec("numpy") is None and finder in sys.meta_path  # other modules: untouched
    spec = finder.find_spec("tensorflow")
    assert finder not in sys.meta_path and isinstance(spec.loader, quiet._QuietLoader)
