"""How large the review page is and how fast it renders: `python -m pipeline.benchmarks.review_page`.

Builds the page the way a user gets it: `run_diagnosis` over 100 slices (whole Kaggle patient
folders in name order, the last one cut; each folder is stacked for its own 3D view) and one
volume study (the next patient stacked into a 4D int16 NIfTI, `x * 7 + 13`, at an assumed
0.94 x 0.94 x 5 mm, as in the README's example), with the pair `resolve_pair` picks
(`--backend keras` by default). Then, in headless Chromium (`review.chromium`), from file://:

* page: bytes of index.html, of the study's and the folders' 3D volumes (review/*.volumes.js)
  and of NiiVue; the overlays the page links to;
* render: first contentful paint and the load event after navigation (median of `--repeat`
  fresh tabs), the wall time from navigation to the load event;
* 3D: from opening the study's card to its viewer drawn (NiiVue and the volumes loaded,
  two animation frames), first open in a fresh tab.

Measurements, not tests: they depend on the machine and its load (printed). `--screenshots DIR`
also saves the page and the study's 3D view as PNGs (the README's, in docs/).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

N_SLICES = 100
STUDY_SPACING = (0.94, 0.94, 5.0)


def _inputs(data_dir: Path, work: Path, n_slices: int) -> tuple[Path, Path, str]:
    """(folder of `n_slices` slice links in patient folders, the study's NIfTI, its patient)."""
    import nibabel as nib
    import numpy as np

    from pipeline.data.index import index_dataset

    index = index_dataset(data_dir)
    slices = work / "slices"
    taken = 0
    cases = list(dict.fromkeys(index["case"]))
    for case in cases:
        rows = index[index["case"] == case]
        folder = slices / case
        folder.mkdir(parents=True)
        for path in rows["image_path"].iloc[: n_slices - taken]:
            (folder / Path(path).name).symlink_to(path)
            taken += 1
        if taken >= n_slices:
            break
    study_case = cases[cases.index(case) + 1]
    rows = index[index["case"] == study_case]
    from pipeline.data.tiff_io import read_image

    data = np.stack([read_image(p) for p in rows["image_path"]], axis=2).astype(np.int16) * 7 + 13
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, -STUDY_SPACING[0], 0)  # rows -> posterior, columns -> left, slices -> superior
    affine[:3, 1] = (-STUDY_SPACING[1], 0, 0)
    affine[:3, 2] = (0, 0, STUDY_SPACING[2])
    affine[3, 3] = 1
    study = work / "study" / f"{rows['patient_id'].iloc[0]}.nii.gz"
    study.parent.mkdir()
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(data, affine)), str(study))
    return slices, study, rows["patient_id"].iloc[0]


def _small_png(png: bytes, path: Path, width: int | None = None) -> None:
    """Save a screenshot as a palette PNG (a README figure, not a photograph), optionally scaled."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def measure(out: Path, study_key: str, repeat: int = 3, screenshots: Path | None = None) -> dict[str, Any]:
    """Sizes of the page in `out` and its render times in headless Chromium."""
    from pipeline.inference.review.chromium import Browser

    review = out / "review"
    volumes = {p.name: p.stat().st_size for p in sorted(review.glob("*.volumes.js"))}
    overlays = sorted((out / "overlays").glob("*.png"))
    result: dict[str, Any] = {
        "index_html_bytes": (out / "index.html").stat().st_size,
        "study_volumes_bytes": next((v for k, v in volumes.items() if k.startswith(study_key)), None),
        "all_volumes_bytes": sum(volumes.values()),
        "n_3d_views": len(volumes),
        "niivue_bytes": (review / "niivue.umd.js").stat().st_size
        if (review / "niivue.umd.js").is_file()
        else None,
        "overlays": len(overlays),
        "overlay_bytes": sum(p.stat().st_size for p in overlays),
    }
    paints, loads, walls = [], [], []
    with Browser(width=1280, height=900) as browser:
        for _ in range(repeat):
            page = browser.open(out / "index.html")
            timing = page.evaluate(
                "new Promise(done => { const n = performance.getEntriesByType('navigation')[0];"
                " const rows = document.querySelectorAll('#slices tbody tr').length;"
                " const finish = fcp => done({fcp, load: n.loadEventEnd, rows});"
                " new PerformanceObserver(list => { for (const e of list.getEntries())"
                " if (e.name === 'first-contentful-paint') finish(e.startTime); })"
                ".observe({type: 'paint', buffered: true}); setTimeout(() => finish(null), 10000); })"
            )
            paints.append(timing["fcp"])
            loads.append(timing["load"])
            walls.append((page.loaded - page.started) * 1000)
            result["rows"] = timing["rows"]
            assert not page.errors, page.errors
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            _small_png(page.screenshot(), screenshots / "review_page.png", width=1000)
        page = browser.open(out / "index.html")
        selector = json.dumps(f'details.viewer[data-key^="{study_key}"]')
        start = time.perf_counter()
        page.evaluate(
            f"(() => {{ const d = document.querySelector({selector}); d.open = true;"
            " d.scrollIntoView(); })()"
        )
        page.wait_for(f"document.querySelector({selector}).dataset.state !== 'loading'", timeout=120)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        result["viewer_ms"] = round((time.perf_counter() - start) * 1000)
        result["viewer_state"] = page.evaluate(f"document.querySelector({selector}).dataset.state")
        result["viewer_steps_ms"] = page.evaluate(f"document.querySelector({selector}).timings")
        if screenshots is not None:
            box = page.evaluate(
                f"(() => {{ const r = document.querySelector({selector})"
                ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY,"
                " width: r.width, height: r.height}; })()"
            )
            _small_png(page.screenshot(clip=box), screenshots / "review_3d.png", width=1000)
        assert not page.errors, page.errors
    result["first_contentful_paint_ms"] = round(statistics.median(paints))
    result["load_event_ms"] = round(statistics.median(loads))
    result["navigation_to_load_wall_ms"] = round(statistics.median(walls))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.review_page", description=__doc__)
    parser.add_argument("--data-dir", default=None, help="a Kaggle-layout root (default: as `index`)")
    parser.add_argument("--models", default=None, help="pair directory (default: resolve_pair's choice)")
    parser.add_argument("--backend", default="keras", help="what runs the models (default keras)")
    parser.add_argument("--n-slices", type=int, default=N_SLICES, help=f"slices (default {N_SLICES})")
    parser.add_argument("--repeat", type=int, default=3, help="page loads to take the median of (default 3)")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the diagnosis here (default: a temp dir)"
    )
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="save review_page.png, review_3d.png here"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="measure the page already in --out (written by an earlier run of this script)",
    )
    args = parser.parse_args(argv)
    if args.measure_only:
        report = json.loads((args.out / "report.json").read_text())
        key = Path(report["studies"][0]["mask_nifti"]).name.removesuffix("_mask.nii.gz")
        result = measure(args.out, key, args.repeat, args.screenshots)
        result["inputs"] = f"{len(report['rows']) - report['studies'][0]['slices']} slices + 1 study"
        return _print(result, args)

    from pipeline.inference.diagnosis import StudyInput, run_diagnosis
    from pipeline.paths import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "kaggle_3m"
    if not data_dir.is_dir() and shared.is_dir():
        data_dir = shared
    with tempfile.TemporaryDirectory(prefix="review-bench.") as tmp:
        slices, study, study_id = _inputs(data_dir, Path(tmp), args.n_slices)
        out = args.out or Path(tmp) / "out"
        start = time.perf_counter()
        diagnosis = run_diagnosis(
            [slices, study], out, models_dir=args.models, backend=args.backend, progress=False, resume=False
        )
        diagnose_s = time.perf_counter() - start
        result = measure(out, StudyInput(study).output_name(), args.repeat, args.screenshots)
    record = diagnosis.studies[0]
    result.update(
        inputs=f"{args.n_slices} slices + 1 study ({study_id}, {record['slices']} slices)",
        diagnose_s=round(diagnose_s, 1),
        load_average=[round(v, 2) for v in os.getloadavg()],
    )
    return _print(result, args)


def _print(r: dict[str, Any], args: argparse.Namespace) -> int:
    mb = 2**20
    print(f"review page for {r['inputs']}: {r['rows']} table rows, {r['n_3d_views']} 3D views")
    print(
        f"  index.html {r['index_html_bytes'] / 1024:.0f} KB; the study's 3D volumes "
        f"{(r['study_volumes_bytes'] or 0) / mb:.2f} MB; all 3D volumes {r['all_volumes_bytes'] / mb:.1f} MB;"
        f" NiiVue {(r['niivue_bytes'] or 0) / mb:.1f} MB; {r['overlays']} overlays"
        f" {r['overlay_bytes'] / mb:.1f} MB"
    )
    print(
        f"  first contentful paint {r['first_contentful_paint_ms']} ms, load event {r['load_event_ms']} ms "
        f"(median of {args.repeat}); the study's 3D view drawn {r['viewer_ms']} ms after opening its card "
        f"({r['viewer_state']}; steps, ms since opening: {r.get('viewer_steps_ms')})"
    )
    r.setdefault("load_average", [round(v, 2) for v in os.getloadavg()])
    print(f"  (diagnosis itself {r.get('diagnose_s', '-')} s; load average {r['load_average']})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
