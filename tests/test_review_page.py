"""The review page without a browser: decision words, what the page holds, escaping, NiiVue provisioning."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pytest

from pipeline.commands import diagnose as command
from pipeline.errors import DataError
from pipeline.inference import diagnosis as diagnose
from pipeline.inference.diagnosis import FLAGGED_EMPTY, JOURNAL, NO_TUMOUR, TUMOUR, run_diagnosis
from pipeline.inference.review import niivue
from pipeline.inference.review.page import esc
from tests.inference_helpers import stub_pipeline
from tests.review_helpers import CASE, HOSTILE, diagnosis


@pytest.fixture
def no_niivue(tmp_path, monkeypatch):
    """NiiVue not provisioned: an empty asset folder."""
    monkeypatch.setenv(niivue.DIR_ENV, str(tmp_path / "no-niivue"))


def test_decision_says_what_was_found():
    assert diagnose.decision(False, 0) == NO_TUMOUR
    assert diagnose.decision(True, 12) == TUMOUR
    assert diagnose.decision(True, 0) == FLAGGED_EMPTY


def test_flagged_slices_with_empty_masks_get_their_own_word_everywhere(synthetic_root, tmp_path, no_niivue):
    case = synthetic_root / CASE  # slices 1-3 with tumour
    out = tmp_path / "out"
    # every component is dropped: the classifier flags 3 slices, nothing is outlined
    result = run_diagnosis([case], out, pipeline=stub_pipeline(min_component_px=10**6), progress=False)
    assert [r["decision"] for r in result.rows] == [FLAGGED_EMPTY] * 3 + [NO_TUMOUR] * 5
    assert (result.n_flagged, result.n_found) == (3, 0)
    patients = pd.read_csv(out / "patients.csv").set_index("patient_id")
    assert patients.loc["TCGA_CC_0005", "slices_flagged"] == 3
    assert patients.loc["TCGA_CC_0005", "slices_tumour"] == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert (summary["flagged"], summary["found"], summary["flagged_nothing_outlined"]) == (3, 0, 3)
    assert pd.read_csv(out / "report.csv")["decision"].tolist() == [r["decision"] for r in result.rows]

    # a journal of an earlier version said `tumour` for those: resumed rows get today's word
    lines = (out / JOURNAL).read_text().replace(f'"{FLAGGED_EMPTY}"', f'"{TUMOUR}"')
    (out / JOURNAL).write_text(lines)
    resumed = run_diagnosis([case], out, pipeline=stub_pipeline(min_component_px=10**6), progress=False)
    assert resumed.resumed == 8
    assert [r["decision"] for r in resumed.rows] == [FLAGGED_EMPTY] * 3 + [NO_TUMOUR] * 5


def test_console_summary_counts_found_and_flagged_apart(
    synthetic_root, tmp_path, capsys, monkeypatch, no_niivue
):
    pipe = stub_pipeline(min_component_px=10**6)
    monkeypatch.setattr("pipeline.inference.tumor_pipeline.TumorPipeline.from_dir", lambda *a, **k: pipe)
    code = command.main([str(synthetic_root / CASE), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "8 slice(s): 0 with tumour, 3 flagged with nothing outlined, 5 without, 0 failed" in printed
    assert "index.html" in printed


def test_the_page_holds_every_row_the_summary_and_the_failures_escaped(synthetic_root, tmp_path, no_niivue):
    result, out = diagnosis(synthetic_root, tmp_path)
    page = (out / "index.html").read_text(encoding="utf-8")
    report = pd.read_csv(out / "report.csv")
    assert page.count('<tr class="') == len(report) == len(result.rows) == 8 + 8 + 2
    assert HOSTILE not in page and esc(HOSTILE) in page  # the file name is text, not markup
    assert "onerror=alert(1)>" not in page
    failed = [r for r in result.rows if r["error"]]
    assert len(failed) == 2 and 'id="failed"' in page
    for row in failed:
        assert f'<span class="message">{esc(row["error"])}</span>' in page
    # cards: the patient folder (px) and the NIfTI study (mL); no 3D view without NiiVue, and why
    assert 'data-card="TCGA_CC_0005"' in page and 'data-card="TCGA_VV_0001"' in page
    study = result.studies[0]
    assert f"{study['tumour_volume_ml']:.2f} mL" in page
    assert niivue.MAKE_COMMAND in page and 'details class="viewer"' not in page
    assert not (out / "review" / niivue.SCRIPT_NAME).exists()
    # no network: nothing but relative links and inline code
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_the_page_is_refreshed_on_resume_and_written_atomically(synthetic_root, tmp_path, no_niivue):
    case = synthetic_root / CASE
    out = tmp_path / "out"
    run_diagnosis([case], out, pipeline=stub_pipeline(), progress=False)
    (out / "index.html").write_text("stale")
    resumed = run_diagnosis([case], out, pipeline=stub_pipeline(), progress=False)
    assert resumed.resumed == 8
    assert (out / "index.html").read_text().startswith("<!doctype html>")
    assert not [p for p in out.iterdir() if p.name.startswith(".index.html")]  # no temporary left


def _tarball(path, member: str, data: bytes):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_niivue_provisioning_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path):
    fake = _tarball(tmp_path / niivue.TARBALL_NAME, niivue.SCRIPT_MEMBER, b"window.niivue = {};")
    with pytest.raises(DataError, match="checksum mismatch"):
        niivue.provision(tarball=fake, out_dir=tmp_path / "assets")
    assert not (tmp_path / "assets").exists()


def test_a_provisioned_script_that_was_changed_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv(niivue.DIR_ENV, str(tmp_path))
    (tmp_path / niivue.SCRIPT_NAME).write_text("tampered")
    assert niivue.script_path() is None and niivue.copy_into(tmp_path / "out") is None


def test_the_page_never_writes_outside_out(synthetic_root, tmp_path):
    """OUT/review as a symlink to a folder outside OUT: no 3D files there, the page still written."""
    if niivue.script_path() is None:
        pytest.skip(f"NiiVue is not provisioned (`{niivue.MAKE_COMMAND}`)")
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "review").symlink_to(outside, target_is_directory=True)
    run_diagnosis([synthetic_root / CASE], out, pipeline=stub_pipeline(), progress=False)
    assert list(outside.iterdir()) == []
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'data-card="TCGA_CC_0005"' in page and 'class="viewer"' not in page
