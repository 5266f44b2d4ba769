"""report.html: `report.md` as one self-contained page, figures inline (base64), every table sortable.

The page is rendered from the very Markdown text `render_markdown` writes, so the two never
disagree. Only the subset that renderer emits is understood: `#`..`###` headings, paragraphs,
`- ` lists, pipe tables, `**bold**`, `` `code` ``, a paragraph wholly in `_..._`, and image lines
`![name](file.png)` naming a PNG beside the report (embedded as a data: URI). All text is
HTML-escaped first (patient ids and paths go in as text); nothing is fetched when it opens.
Clicking a column header sorts that table (numbers as numbers, `n/a` last).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 0 auto; padding: 1rem 1.5rem 3rem;
       color: #1d2330; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d8dce4; padding: .25rem .5rem; text-align: left; }
th { background: #f6f7f9; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f1f3f6; padding: 0 .25em; border-radius: 3px; }
figure { margin: 1rem 0; } figure img { max-width: 100%; } figcaption { color: #5b6475; font-size: .9rem; }
"""
_SCRIPT = """
(function () {
  "use strict";
  function value(cell) {
    const text = cell.textContent.trim();
    const number = Number(text);
    return text !== "" && !Number.isNaN(number) ? number : text;
  }
  for (const table of document.querySelectorAll("table")) {
    const head = table.tHead.rows[0];
    for (const th of head.cells) {
      th.addEventListener("click", () => {
        const ascending = th.getAttribute("aria-sort") !== "ascending";
        for (const other of head.cells) other.removeAttribute("aria-sort");
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const rows = Array.from(table.tBodies[0].rows);
        rows.sort((a, b) => {
          const x = value(a.cells[th.cellIndex]), y = value(b.cells[th.cellIndex]);
          const kx = typeof x === "number" ? 0 : 1, ky = typeof y === "number" ? 0 : 1;
          if (kx !== ky) return kx - ky;  // numbers before n/a, either way
          const c = kx === 0 ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
          return ascending ? c : -c;
        });
        for (const row of rows) table.tBodies[0].appendChild(row);
      });
    }
  }
})();
"""


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** (underscores stay: patient ids hold them)."""
    out = html.escape(text, quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table(lines: list[str]) -> str:
    header, body = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    parts = ["<table><thead><tr>", *(f"<th>{_inline(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in body:
        parts.append(
            "<tr>"
            + "".join(
                f'<td class="num">{_inline(c)}</td>' if _is_number(c) else f"<td>{_inline(c)}</td>"
                for c in row
            )
            + "</tr>"
        )
    parts.append("</tbody></table>")
    return "".join(parts)


def _figure(name: str, target: str, base: Path) -> str:
    path = base / target
    if path.suffix.lower() != ".png" or not path.is_file() or path.resolve().parent != base.resolve():
        return f"<p>[figure {_inline(name)}: {_inline(target)} not found]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(name, quote=True)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_inline(name)} ({_inline(target)})</figcaption></figure>"
    )


def render_html(markdown: str, base: str | Path, title: str = "Evaluation report") -> str:
    """The page for `markdown` (render_markdown's output); figures are read from `base`."""
    base = Path(base)
    blocks: list[list[str]] = []
    for line in markdown.splitlines():
        if line.strip():
            if not blocks or not blocks[-1]:
                blocks.append([])
            blocks[-1].append(line)
        elif blocks and blocks[-1]:
            blocks.append([])
    parts: list[str] = []
    for block in (b for b in blocks if b):
        first = block[0]
        if first.startswith("#"):
            level = min(len(first) - len(first.lstrip("#")), 3)
            parts.append(f"<h{level}>{_inline(first.lstrip('#').strip())}</h{level}>")
            block = block[1:]
            if not block:
                continue
            first = block[0]
        if first.startswith("|") and len(block) >= 2 and set(block[1].replace("|", "")) <= set("-: "):
            parts.append(_table(block))
        elif all(line.startswith("- ") for line in block):
            parts.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in block) + "</ul>")
        elif all(_IMAGE.match(line.strip()) for line in block):
            parts += [_figure(*_IMAGE.match(line.strip()).groups(), base) for line in block]
        else:
            text = " ".join(line.strip() for line in block)
            if len(text) > 2 and text.startswith("_") and text.endswith("_"):
                parts.append(f"<p><em>{_inline(text[1:-1])}</em></p>")
            else:
                parts.append(f"<p>{_inline(text)}</p>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
