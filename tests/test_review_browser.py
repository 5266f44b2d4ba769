"""The review page in a real browser: headless Chromium opens OUT/index.html from disk.

Skipped where Chromium is not installed (`.ci/run` installs Debian's `chromium`); the 3D-view
test also needs NiiVue (`make viewer`, which `.ci/run` runs). The screenshots are read back.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.inference.review import niivue
from pipeline.inference.review.chromium import Browser, find_chromium
from tests.review_helpers import diagnosis

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)"
)
SCREENSHOTS_ENV = "LGG_REVIEW_SCREENSHOTS"  # a folder: the tests also save their screenshots there


@pytest.fixture(scope="module")
def diagnosed(synthetic_root, tmp_path_factory):
    return diagnosis(synthetic_root, tmp_path_factory.mktemp("review"))


@pytest.fixture(scope="module")
def browser():
    with Browser(width=1280, height=900) as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, diagnosed):
    _, out = diagnosed
    return browser.open(out / "index.html")


def _visible(page) -> int:
    return page.evaluate(
        "Array.from(document.querySelectorAll('#slices tbody tr')).filter(r => !r.hidden).length"
    )


def _save(name: str, png: bytes) -> None:
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


def test_the_page_opens_from_disk_without_errors_and_lists_every_row(page, diagnosed):
    result, out = diagnosed
    assert page.errors == []
    report = pd.read_csv(out / "report.csv")
    assert page.evaluate("document.querySelectorAll('#slices tbody tr').length") == len(report)
    assert _visible(page) == len(report)
    summary = page.evaluate("Array.from(document.querySelectorAll('.stat')).map(s => s.textContent)")
    assert f"{result.n_found}tumour found" in summary and f"{result.n_failed}failed" in summary
    _save("review_page.png", page.screenshot())


def _set(page, element: str, value: str, event: str) -> None:
    """Set a control's value as a person would and fire its event."""
    page.evaluate(
        f"(() => {{ const e = document.getElementById({json.dumps(element)}); e.value = {json.dumps(value)};"
        f" e.dispatchEvent(new Event({json.dumps(event)})); }})()"
    )


def test_filters_hide_the_right_rows(page, diagnosed):
    _, out = diagnosed
    report = pd.read_csv(out / "report.csv")
    for decision in ("tumour", "no tumour"):
        _set(page, "filter-decision", decision, "change")
        assert _visible(page) == int((report["decision"] == decision).sum())
        shown = page.evaluate(
            "Array.from(document.querySelectorAll('#slices tbody tr')).filter(r => !r.hidden)"
            ".map(r => r.dataset.decision)"
        )
        assert set(shown) == {decision}
    _set(page, "filter-decision", "", "change")
    _set(page, "filter-text", "TCGA_VV_0001", "input")
    assert _visible(page) == int(report["path"].str.contains("TCGA_VV_0001").sum()) == 8
    _set(page, "filter-text", "", "input")
    assert _visible(page) == len(report)


def test_sorting_by_probability_orders_the_rows(page):
    page.evaluate("document.querySelectorAll('#slices thead th')[5].click()")
    values = page.evaluate(
        "Array.from(document.querySelectorAll('#slices tbody tr')).map(r => r.cells[5].dataset.value)"
    )
    numbers = [float(v) if v else -np.inf for v in values]
    assert numbers == sorted(numbers)


def test_a_failed_input_shows_its_message(page, diagnosed):
    result, _ = diagnosed
    failed = [r for r in result.rows if r["error"]]
    shown = page.evaluate("Array.from(document.querySelectorAll('#failed li')).map(li => li.textContent)")
    assert len(shown) == len(failed) == 2
    for row in failed:
        assert any(row["error"] in text and Path(row["path"]).name in text for text in shown)
    # the file name that is HTML stays text: no element came from it
    assert page.evaluate("document.querySelectorAll('img[src=y]').length") == 0
    assert page.evaluate("document.querySelectorAll('#slices tr.failed').length") == 2


def _red_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


@pytest.mark.skipif(
    niivue.script_path() is None, reason=f"NiiVue is not provisioned (`{niivue.MAKE_COMMAND}`)"
)
@pytest.mark.parametrize("card", ["TCGA_VV_0001", "TCGA_CC_0005"])  # a NIfTI study, a Kaggle folder stacked
def test_the_3d_view_draws_the_mask_over_the_flair(browser, diagnosed, card):
    _, out = diagnosed
    page = browser.open(out / "index.html")
    selector = f"[data-card={json.dumps(card)}] details.viewer"
    assert (
        page.evaluate(f"document.querySelector({json.dumps(selector)}).dataset.state") is None
    )  # not loaded yet
    assert page.evaluate("typeof window.niivue") == "undefined"
    page.evaluate(
        f"(() => {{ const d = document.querySelector({json.dumps(selector)}); d.open = true;"
        " d.scrollIntoView(); })()"
    )
    page.wait_for(f"document.querySelector({json.dumps(selector)}).dataset.state !== 'loading'", timeout=60)
    assert page.evaluate(f"document.querySelector({json.dumps(selector)}).dataset.state") == "ready"
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    box = page.evaluate(
        f"(() => {{ const r = document.querySelector({json.dumps(selector + ' canvas')})"
        ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY,"
        " width: r.width, height: r.height}; })()"
    )
    shot = page.screenshot(clip=box)
    assert _red_pixels(shot) > 200, "no mask-coloured pixels in the viewer"
    # the mask off: its colour goes
    page.evaluate(f"document.querySelector({json.dumps(selector)}).viewer.setOpacity(1, 0)")
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    assert _red_pixels(page.screenshot(clip=box)) < 20
    assert page.errors == []
    _save(f"review_3d_{card}.png", shot)


def test_without_niivue_the_page_works_and_says_how_to_enable_3d(
    browser, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.setenv(niivue.DIR_ENV, str(tmp_path / "no-niivue"))
    _, out = diagnosis(synthetic_root, tmp_path)
    page = browser.open(out / "index.html")
    assert page.errors == []
    assert page.evaluate("document.querySelectorAll('details.viewer').length") == 0
    notes = page.evaluate("Array.from(document.querySelectorAll('.card .note')).map(n => n.textContent)")
    assert len(notes) == 2 and all(niivue.MAKE_COMMAND in n for n in notes)
    assert _visible(page) == len(pd.read_csv(out / "report.csv"))


def test_the_evaluation_report_html_sorts_its_per_patient_table(browser, tmp_path):
    from tests.evaluation_helpers import evaluate_hand_built

    _, result = evaluate_hand_built(tmp_path, n_boot=20)
    page = browser.open(result.files["report_html"])
    assert page.errors == []
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 100)")
    assert page.evaluate("document.images.length") == len(result.report["figures"])
    table = (
        "Array.from(document.querySelectorAll('table')).find(t => t.tHead.rows[0].cells[0].textContent"
        " === 'patient' && t.tHead.rows[0].cells[1].textContent === 'slices')"
    )
    patients = f"Array.from(({table}).tBodies[0].rows).map(r => r.cells[0].textContent)"
    before = page.evaluate(patients)
    assert sorted(before) == ["TCGA_HB_0001", "TCGA_HB_0002", "TCGA_HB_0003"]
    page.evaluate(f"({table}).tHead.rows[0].cells[0].click()")
    assert page.evaluate(patients) == sorted(before)
    page.evaluate(f"({table}).tHead.rows[0].cells[0].click()")
    assert page.evaluate(patients) == sorted(before, reverse=True)
    dice = f"Array.from(({table}).tBodies[0].rows).map(r => Number(r.cells[4].textContent))"
    page.evaluate(f"({table}).tHead.rows[0].cells[4].click()")
    assert page.evaluate(dice) == sorted(page.evaluate(dice))
