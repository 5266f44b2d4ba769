"""Helpers for the data-layer tests: expected counts of the synthetic set and ways to damage it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from tests.synthetic import DEFAULT_CASES


def expected_counts(cases=DEFAULT_CASES) -> dict[str, int]:
    """What `summarize` must report for a dataset written by `tests.synthetic.write_dataset(cases=...)`."""
    tumour = [(0 if r is None else r[1] - r[0] + 1) for _, _, r in cases]
    return {
        "patients": len({"_".join(c.split("_")[:3]) for c, _, _ in cases}),
        "slices": sum(n for _, n, _ in cases),
        "tumor_slices": sum(tumour),
        "tumor_patients": sum(1 for t in tumour if t),
    }


def slice_paths(root: Path, case_number: int = 0, slice_number: int = 1) -> tuple[Path, Path]:
    """(image, mask) paths of one slice of the `case_number`-th default case."""
    case = DEFAULT_CASES[case_number][0]
    return root / case / f"{case}_{slice_number}.tif", root / case / f"{case}_{slice_number}_mask.tif"


def write_tiff(path: Path, array: np.ndarray) -> Path:
    """Write `array` as a TIFF (RGB when it has 3 channels), replacing what was there."""
    photometric = "rgb" if array.ndim == 3 and array.shape[-1] == 3 else "minisblack"
    tifffile.imwrite(path, array, photometric=photometric, compression="zlib")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut `path` to a `keep` fraction of its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
