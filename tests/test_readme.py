"""The README's promises: its Python example and `make diagnose` work on the committed release.

These use the real models in `models/` (no training), as a newcomer on a fresh clone would.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from tests.synthetic import make_slice

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RELEASE = ROOT / "models"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _write_slice(path: Path, seed: int, tumor: bool) -> Path:
    image, _ = make_slice(np.random.default_rng(seed), 256, tumor)
    tifffile.imwrite(path, image, photometric="rgb")
    return path


@pytest.fixture
def in_release_workdir(tmp_path, monkeypatch) -> Path:
    """A working folder where `models` is the committed release, as in a fresh clone's root."""
    (tmp_path / "models").symlink_to(RELEASE, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_release_and_its_model_card_describe_the_same_files():
    from pipeline.models.release import verify_release

    listed = verify_release(RELEASE)  # every file present and matching SHA256SUMS / pipeline.json
    assert {"classifier.keras", "segmenter.keras", "pipeline.json", "splits.csv"} <= set(listed)
    card = (RELEASE / "README.md").read_text(encoding="utf-8")
    for name in ("classifier.keras", "segmenter.keras"):  # the card describes these very files
        assert listed[name] in card, f"models/README.md does not name the sha256 of {name}"


def test_the_readme_python_example_runs_on_the_committed_release(in_release_workdir):
    blocks = [b for b in _python_blocks(README.read_text(encoding="utf-8")) if "TumorPipeline" in b]
    assert len(blocks) == 1
    names = re.findall(r'load_slice\("([^"]+)"\)', blocks[0])
    assert names, "the example should load a slice by file name"
    for name in names:
        _write_slice(in_release_workdir / name, seed=1, tumor=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    printed = out.getvalue().split()
    assert 0.0 <= float(printed[0]) <= 1.0 and printed[1] in ("True", "False")


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"\bmake ([a-z]+)\b", README.read_text(encoding="utf-8")))
    assert named and named <= targets, sorted(named - targets)


def test_make_diagnose_runs_the_diagnose_command():
    dry = subprocess.run(
        ["make", "-n", "diagnose", "INPUT=scans/", "OUT=somewhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-m pipeline diagnose scans/ --out somewhere" in dry


@pytest.mark.slow
def test_diagnose_works_on_the_committed_release_without_training(in_release_workdir):
    scans = in_release_workdir / "scans"
    scans.mkdir()
    for i, tumor in enumerate((True, False, True)):
        _write_slice(scans / f"TCGA_ZZ_0001_20000101_{i + 1}.tif", seed=10 + i, tumor=tumor)
    (scans / "broken.tif").write_bytes(b"not a tiff")
    out = in_release_workdir / "diagnosis"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "diagnose", str(scans), "--out", str(out), "--quiet"],
        cwd=in_release_workdir,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # one input failed: the exit code says so
    report = pd.read_csv(out / "report.csv")
    assert len(report) == 4
    broken = report[report["path"].str.endswith("broken.tif")]
    assert broken["error"].notna().all()
    ok = report[~report["path"].str.endswith("broken.tif")]
    assert ok["error"].isna().all() and ok["probability"].between(0, 1).all()
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["summary"]["inputs"] == 4 and report_json["summary"]["failed"] == 1
    assert len(report_json["rows"]) == 4
