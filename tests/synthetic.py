"""A tiny synthetic dataset in the exact Kaggle layout, written as real TIFF files.

Used by the tests (through the `synthetic_root` fixture) and by the notebook test.
Tumours are bright ellipses on the FLAIR channel inside a darker "brain" disc.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

# (case folder, number of slices, slices with tumour as (first, last) 1-based or None)
DEFAULT_CASES = (
    ("TCGA_AA_0001_19990101", 8, (3, 6)),
    ("TCGA_AA_0002_19990202", 8, (2, 5)),
    ("TCGA_BB_0003_20000303", 6, None),  # a patient with no tumour at all
    ("TCGA_BB_0004_20000404", 12, (4, 11)),  # 12 slices: `_10` must sort after `_9`
    ("TCGA_CC_0005_20010505", 8, (1, 3)),
    ("TCGA_CC_0006_20010606", 8, (5, 8)),
)


def make_slice(rng: np.random.Generator, size: int, tumor: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return one synthetic slice: image uint8 (size, size, 3) and mask uint8 (size, size) in {0, 255}."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    brain = ((yy - c) ** 2 + (xx - c) ** 2) < (0.42 * size) ** 2
    image = np.zeros((size, size, 3), np.float32)
    for ch, level in enumerate((70, 90, 80)):
        image[..., ch] = brain * (level + rng.normal(0, 6, (size, size)))
    mask = np.zeros((size, size), np.uint8)
    if tumor:
        cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
        ry, rx = rng.uniform(0.08 * size, 0.18 * size, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image[blob, 1] += 110  # FLAIR hyperintensity
        image[blob, 2] += 40
        mask[blob] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_dataset(root: str | Path, size: int = 64, cases=DEFAULT_CASES, seed: int = 0) -> Path:
    """Write a Kaggle-layout dataset under `root` (plus a `data.csv`) and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["Patient,RNASeqCluster"]
    for case, n_slices, tumor_range in cases:
        folder = root / case
        folder.mkdir(exist_ok=True)
        for n in range(1, n_slices + 1):
            tumor = tumor_range is not None and tumor_range[0] <= n <= tumor_range[1]
            image, mask = make_slice(rng, size, tumor)
            tifffile.imwrite(folder / f"{case}_{n}.tif", image, photometric="rgb", compression="zlib")
            tifffile.imwrite(folder / f"{case}_{n}_mask.tif", mask, compression="zlib")
        rows.append(f"{'_'.join(case.split('_')[:3])},1")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root
