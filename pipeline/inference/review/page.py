"""OUT/index.html: the review page of a diagnosis, one file that opens from disk by itself.

Written atomically at the end of every `diagnose` run (and so refreshed on resume) from the
same rows as report.csv. No server and no network: the styles and script are inline, the
overlays are the PNGs in OUT (relative links), and each study's 3D view loads, when its card is
opened, `review/niivue.umd.js` (copied once from the provisioned NiiVue, `review.niivue`) and
`review/<name>.volumes.js` (`review.viewer_data`). Every string that comes from a file name or
an error message is HTML-escaped; links are percent-encoded paths inside OUT.

Sections: the summary (inputs, flagged, found, failed; models, backend, operating point), the
failed inputs with their messages, one card per study or patient (tumour volume in mL or px,
slice range, the largest slice's overlay, the 3D view), and the table of every row of
report.csv, sortable and filterable (decision, probability, area, error), its thumbnails opening
the full overlay.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import DataError
from pipeline.inference.outputs import (
    FLAGGED_EMPTY,
    NO_TUMOUR,
    TUMOUR,
    OutputWriter,
    group_volumes,
    output_name,
)
from pipeline.inference.review import niivue
from pipeline.inference.review.viewer_data import REVIEW_DIR, write_stack_volumes, write_study_volumes
from pipeline.io_utils import atomic_write

log = logging.getLogger(__name__)

INDEX_HTML = "index.html"
_HERE = Path(__file__).resolve().parent


def esc(value: Any) -> str:
    """HTML text (and attribute value) for any value: None as empty, everything escaped."""
    return "" if value is None else html.escape(str(value), quote=True)


def href(relative: str | None) -> str:
    """A percent-encoded, escaped link to a file inside OUT (`relative` as the reports store it)."""
    return esc(quote(relative, safe="/")) if relative else ""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Card:
    """One study or patient: what its card shows."""

    title: str
    kind: str  # "study" (NIfTI/DICOM), "patient folder" (Kaggle slices stacked), "patient"
    rows: list[dict[str, Any]]
    source: str = ""
    volume: str = ""  # "12.3 mL (13,483 voxels)" or "5,210 px"
    slice_range: str = ""
    error: str | None = None
    warning: str | None = None  # diagnosed, but the input needs a look (outliers clipped, oblique)
    volumes_js: Path | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def largest(self) -> dict[str, Any] | None:
        ok = [r for r in self.rows if not r["error"] and r.get("overlay_path") and (r["area_px"] or 0) > 0]
        return max(ok, key=lambda r: r["area_px"], default=None)


def _slice_label(row: dict[str, Any]) -> str:
    """The slice number of a row: its `slice` (studies), else the `_<n>` of a Kaggle file name."""
    from pipeline.data.readers import SLICE_PATTERN

    if row.get("slice") is not None:
        return str(row["slice"])
    match = SLICE_PATTERN.match(Path(row["path"]).stem)
    return match["slice"] if match is not None and not match["mask"] else ""


def _range(rows: Sequence[dict[str, Any]]) -> str:
    found = [int(s) for r in rows if (r["area_px"] or 0) > 0 and (s := _slice_label(r)).isdigit()]
    return f"{min(found)} to {max(found)}" if found else "none"


def build_cards(
    out: Path,
    rows: Sequence[dict[str, Any]],
    studies: Sequence[tuple[dict[str, Any], list]],
    slice_paths: Sequence[Path],
    study_inputs: Sequence[Any],
    with_3d: bool,
    guard: Any = None,
) -> list[Card]:
    """One card per volume study, per Kaggle patient folder (stacked for 3D) and per other patient."""
    cards: list[Card] = []
    by_path = dict(zip(slice_paths, rows, strict=True))
    grouped: set[Path] = set()
    for unit in group_volumes(list(slice_paths)):
        if len(unit) < 2:
            continue
        grouped.update(unit)
        unit_rows = [by_path[p] for p in unit]
        title = next((r["patient_id"] for r in unit_rows if r["patient_id"]), None) or unit[0].parent.name
        card = Card(title=title, kind="patient folder", rows=unit_rows, source=str(unit[0].parent))
        card.volume = f"{sum(int(r['area_px'] or 0) for r in unit_rows):,} px"
        card.slice_range = _range(unit_rows)
        if with_3d:
            key = output_name(unit[0].parent)
            try:
                if guard is not None:
                    guard(f"{REVIEW_DIR}/{key}.volumes.js")
                card.volumes_js = write_stack_volumes(out, key, unit, unit_rows)
            except Exception:  # noqa: BLE001 - the page goes on without this 3D view
                log.warning("no 3D view for %s", unit[0].parent, exc_info=True)
        cards.append(card)
    patients: dict[str, list[dict[str, Any]]] = {}
    for path, row in by_path.items():
        if path not in grouped and row["patient_id"]:
            patients.setdefault(row["patient_id"], []).append(row)
    for patient, patient_rows in sorted(patients.items()):
        card = Card(title=patient, kind="patient", rows=patient_rows)
        card.volume = f"{sum(int(r['area_px'] or 0) for r in patient_rows):,} px"
        card.slice_range = _range(patient_rows)
        cards.append(card)
    for (record, study_rows), study in zip(studies, study_inputs, strict=True):
        card = Card(
            title=record["study_id"],
            kind="study",
            rows=study_rows,
            source=record["source"] or "",
            error=record["error"],
            warning=record.get("warning"),
        )
        if not record["error"]:
            ml = record["tumour_volume_ml"]
            voxels = f"{record['tumour_voxels']:,} voxels"
            card.volume = f"{ml:.2f} mL ({voxels})" if ml is not None else voxels
            sr = record["slice_range"]
            card.slice_range = f"{sr[0]} to {sr[1] - 1}" if sr else "none"
            card.facts = [
                ("format", record["format"] or ""),
                ("shape", " x ".join(map(str, record["shape"] or []))),
                (
                    "spacing",
                    " x ".join(f"{v:g}" for v in record["spacing_mm"]) + " mm"
                    if record["spacing_mm"]
                    else "none recorded",
                ),
            ]
            if with_3d:
                try:
                    if guard is not None:
                        guard(f"{REVIEW_DIR}/{study.output_name()}.volumes.js")
                    card.volumes_js = write_study_volumes(out, study.output_name(), study, record)
                except Exception:  # noqa: BLE001 - the page goes on without this 3D view
                    log.warning("no 3D view for %s", record["source"], exc_info=True)
        cards.append(card)
    return cards


def _card_html(card: Card, out: Path, viewer_ok: bool) -> str:
    found = sum(1 for r in card.rows if (r["area_px"] or 0) > 0)
    parts = [
        f'<article class="card{" failed" if card.error else ""}" data-card="{esc(card.title)}">',
        f"<h3>{esc(card.title)}</h3>",
        f'<div class="muted">{esc(card.kind)}'
        + (
            f' &middot; <span title="{esc(card.source)}">{esc(Path(card.source).name)}</span>'
            if card.source
            else ""
        )
        + "</div>",
    ]
    if card.error:
        parts.append(f'<p class="error">failed: {esc(card.error)}</p></article>')
        return "".join(parts)
    facts = [
        ("tumour", card.volume),
        ("slices", f"{len(card.rows)}, {found} with tumour outlined"),
        ("tumour slices", card.slice_range),
        *card.facts,
    ]
    parts.append("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>")
    if card.warning:
        parts.append(f'<p class="warning">warning: {esc(card.warning)}</p>')
    largest = card.largest
    if largest is not None:
        parts.append(
            f'<a href="{href(largest["overlay_path"])}" target="_blank">'
            f'<img class="largest" loading="lazy" alt="largest tumour slice" '
            f'src="{href(largest["overlay_path"])}"></a>'
            f'<div class="muted">largest slice: {esc(_slice_label(largest))} '
            f"({largest['area_px']:,} px)</div>"
        )
    if card.kind != "patient":
        if card.volumes_js is not None and viewer_ok:
            size = card.volumes_js.stat().st_size
            relative = card.volumes_js.relative_to(out).as_posix()
            key = card.volumes_js.name.removesuffix(".volumes.js")
            parts.append(VIEWER_HTML.format(volumes=href(relative), key=esc(key), size=_size(size)))
        elif card.volumes_js is not None or not viewer_ok:
            parts.append(
                f'<p class="note">3D view unavailable: the NiiVue viewer is not provisioned. Run '
                f"<code>{esc(niivue.MAKE_COMMAND)}</code> and this diagnosis again (finished inputs "
                "are resumed, only the page is rewritten).</p>"
            )
    parts.append("</article>")
    return "".join(parts)


VIEWER_HTML = (
    '<details class="viewer" data-volumes="{volumes}" data-key="{key}">'
    "<summary>3D view ({size} of volumes, loads when opened)</summary>"
    '<div class="viewer-body"><div class="viewer-controls"><label>mask opacity '
    '<input class="opacity" type="range" min="0" max="1" step="0.05" value="0.7"></label>'
    '<label>view <select class="layout">'
    '<option value="3" selected>axial, coronal, sagittal + 3D</option><option value="0">axial</option>'
    '<option value="1">coronal</option><option value="2">sagittal</option><option value="4">3D</option>'
    "</select></label></div>"
    '<div class="canvas-box"><canvas></canvas></div><div class="viewer-status"></div></div></details>'
)
DECISION_CLASS = {"tumour": "d-tumour", "flagged, nothing outlined": "d-flagged", "no tumour": "d-none"}


def _row_html(row: dict[str, Any]) -> str:
    decision = row["decision"] or ("failed" if row["error"] else "")
    name = Path(row["path"]).name
    thumb = row.get("overlay_path")
    cells = [
        (
            f'<a href="{href(thumb)}" target="_blank">'
            f'<img loading="lazy" alt="overlay" src="{href(thumb)}"></a>'
            if thumb
            else ""
        ),
        f'<td class="name" title="{esc(row["path"])}">{esc(name)}</td>',
        f"<td>{esc(row['patient_id'])}</td>",
        f'<td class="num" data-value="{esc(_slice_label(row))}">{esc(_slice_label(row))}</td>',
        f'<td class="{DECISION_CLASS.get(decision, "")}">{esc(decision)}</td>',
        f'<td class="num" data-value="{_fmt(row["probability"], 6)}">{_fmt(row["probability"])}</td>',
        f'<td class="num" data-value="{esc(row["area_px"])}">{esc(row["area_px"])}</td>',
        f'<td class="error">{esc(row["error"])}</td>' if row["error"] or not row.get("warning")
        else f'<td class="warning">warning: {esc(row["warning"])}</td>',
    ]
    cells[0] = f"<td>{cells[0]}</td>"
    words = (row["path"], row["patient_id"], decision, row["error"], row.get("warning"))
    search = " ".join(str(v) for v in words if v).lower()
    return (
        f'<tr class="{"failed" if row["error"] else ""}" data-decision="{esc(decision)}" '
        f'data-search="{esc(search)}">' + "".join(cells) + "</tr>"
    )


def _summary_html(out: Path, all_rows: Sequence[dict[str, Any]], failed: list[dict[str, Any]],
                  settings: dict[str, Any], cards: Sequence[Card], viewer_script: str | None,
                  created: str) -> list[str]:
    """The page's head and its summary section (counts, models, operating point, sizes)."""
    counts = {d: sum(1 for r in all_rows if r["decision"] == d) for d in (TUMOUR, FLAGGED_EMPTY, NO_TUMOUR)}
    stats = [
        ("inputs", len(all_rows), ""),
        ("flagged", counts[TUMOUR] + counts[FLAGGED_EMPTY], ""),
        ("tumour found", counts[TUMOUR], ""),
        ("flagged, nothing outlined", counts[FLAGGED_EMPTY], ""),
        ("no tumour", counts[NO_TUMOUR], ""),
        ("failed", len(failed), " bad" if failed else ""),
    ]
    keys = (
        ("models", "models"),
        ("backend", "backend"),
        ("threshold", "threshold"),
        ("mask threshold", "seg_threshold"),
        ("min component px", "min_component_px"),
        ("min volume px", "min_volume_px"),
        ("neighbour weight", "neighbour_weight"),
        ("volume-aware", "volumes"),
    )
    volume_bytes = sum(c.volumes_js.stat().st_size for c in cards if c.volumes_js is not None)
    sizes = ""
    if volume_bytes:
        sizes += f"{_size(volume_bytes)} of 3D volumes in review/, each loaded only when its card is opened"
    if viewer_script:
        sizes += f"; the NiiVue viewer, {_size(niivue.script_path().stat().st_size)}"
    head = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Diagnosis review</title>",
        f"<style>{(_HERE / 'review.css').read_text(encoding='utf-8')}</style></head><body>",
        "<header><h1>Diagnosis review</h1>",
        f'<p class="muted">{esc(out)} &middot; written {esc(created)} &middot; the same rows as '
        '<a href="report.csv">report.csv</a>, <a href="patients.csv">patients.csv</a>, '
        '<a href="report.json">report.json</a></p></header>',
        '<section id="summary"><div class="summary">'
        + "".join(f'<div class="stat{cls}"><b>{n:,}</b>{esc(label)}</div>' for label, n, cls in stats)
        + "</div>",
        '<div class="settings">'
        + " ".join(
            f"<span>{esc(label)}: <code>{esc(settings.get(key))}</code></span>"
            for label, key in keys
            if key in settings
        )
        + "</div>",
        f'<p class="note">"tumour": the final mask outlines something; "{esc(FLAGGED_EMPTY)}": the '
        "classifier flagged the slice but the mask is empty after post-processing. Page size: "
        f"<span id=page-size></span>{sizes}.</p>",
        "</section>",
    ]
    return head


def _body_html(out: Path, all_rows: Sequence[dict[str, Any]], failed: list[dict[str, Any]],
               cards: Sequence[Card], with_viewer: bool) -> list[str]:
    """The failed inputs, the study and patient cards and the slice table."""
    body: list[str] = []
    if failed:
        body.append(f'<section id="failed"><h2>Failed inputs ({len(failed)})</h2><ul class="failed-list">')
        body += [
            f'<li><b title="{esc(r["path"])}">{esc(Path(r["path"]).name)}</b>: '
            f'<span class="message">{esc(r["error"])}</span></li>'
            for r in failed
        ]
        body.append("</ul></section>")
    if cards:
        body.append(f'<section><h2>Studies and patients ({len(cards)})</h2><div class="cards">')
        body += [_card_html(c, out, with_viewer) for c in cards]
        body.append("</div></section>")
    options = "".join(
        f'<option value="{esc(v)}">{esc(v)}</option>' for v in (TUMOUR, FLAGGED_EMPTY, NO_TUMOUR, "failed")
    )
    headers = [
        ("", ""),
        ("input", "text"),
        ("patient", "text"),
        ("slice", "num"),
        ("decision", "text"),
        ("probability", "num"),
        ("area px", "num"),
        ("error / warning", "text"),
    ]
    body += [
        f'<section><h2>Slices ({len(all_rows)})</h2><div class="controls">'
        '<input id="filter-text" type="search" placeholder="filter: file name, patient, error, warning ...">'
        f'<select id="filter-decision"><option value="">every decision</option>{options}</select>'
        '<span id="shown" class="muted"></span></div>',
        '<table id="slices"><thead><tr>'
        + "".join(f'<th data-type="{t}">{esc(h)}</th>' if t else "<th></th>" for h, t in headers)
        + "</tr></thead><tbody>",
        *(_row_html(r) for r in all_rows),
        "</tbody></table></section>",
    ]
    return body


def render_page(
    out: Path,
    all_rows: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    cards: Sequence[Card],
    viewer_script: str | None,
    created: str,
) -> str:
    """The page's HTML text: the summary, the failed inputs, the cards, the slice table, the scripts."""
    failed = [r for r in all_rows if r["error"]]
    head = _summary_html(out, all_rows, failed, settings, cards, viewer_script, created)
    body = _body_html(out, all_rows, failed, cards, viewer_script is not None)
    config = json.dumps({"niivue": viewer_script}).replace("<", "\\u003c")
    tail = [
        f'<script type="application/json" id="lgg-config">{config}</script>',
        f"<script>{(_HERE / 'review.js').read_text(encoding='utf-8')}</script>",
        "<script>document.getElementById('page-size').textContent = "
        "(document.documentElement.outerHTML.length / 1024).toFixed(0) + ' KB of HTML; ';</script>",
        "</body></html>",
    ]
    return "\n".join(head + body + tail) + "\n"


def write_review_page(
    out: str | Path,
    rows: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    studies: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]] = (),
    *,
    slice_paths: Sequence[Path] = (),
    study_inputs: Sequence[Any] = (),
) -> Path:
    """Write OUT/index.html (atomically) for the slice-file `rows` (aligned with `slice_paths`) and the
    volume `studies` ((record, rows) aligned with `study_inputs`); returns its path.

    Copies NiiVue into OUT/review/ once when it is provisioned and writes each study's
    `review/<name>.volumes.js` when missing or stale; without NiiVue the page has no 3D views
    and says how to enable them.
    """
    out = Path(out)
    # every file goes where diagnose's own outputs may go: inside OUT, never onto an input
    guard = OutputWriter(out, [*slice_paths, *(s.path for s in study_inputs)])._target
    guard(INDEX_HTML)
    try:
        for name in (niivue.SCRIPT_NAME, niivue.LICENSE_NAME):
            guard(f"{REVIEW_DIR}/{name}")
        script = niivue.copy_into(out / REVIEW_DIR)
    except DataError as exc:
        log.warning("review page without 3D views: %s", exc)
        script = None
    if script is None:
        log.info("NiiVue is not provisioned (%s): the review page has no 3D views", niivue.MAKE_COMMAND)
    cards = build_cards(
        out, rows, studies, slice_paths, study_inputs, with_3d=script is not None, guard=guard
    )
    all_rows = [*rows, *(r for _, srows in studies for r in srows)]
    created = datetime.now(UTC).isoformat(timespec="seconds")
    viewer = f"{REVIEW_DIR}/{niivue.SCRIPT_NAME}" if script is not None else None
    text = render_page(out, all_rows, settings, cards, viewer, created)
    with atomic_write(out / INDEX_HTML, "w", encoding="utf-8") as fh:
        fh.write(text)
    return out / INDEX_HTML
