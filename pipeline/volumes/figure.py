"""Check a written mask NIfTI over its scan in three orthogonal views, as a viewer would show it.

`volume_figure(scan, mask_nifti, out_png)` reads the mask back with nibabel and lays it on the
scan *through each file's own affine* (both are reoriented to the same world orientation
independently, so a wrong affine in the mask shows as a misplaced outline): axial, coronal and
sagittal slices through the tumour's centre, FLAIR in grey, the mask's outline in red, each
view drawn with its true millimetre aspect. It stands in for opening the two files in 3D Slicer
or ITK-SNAP.

    python -m pipeline.volumes.figure SCAN MASK.nii.gz OUT.png [--title TEXT]

SCAN is any study path `pipeline.volumes.readers.read_volume` takes (a 4D NIfTI, a channel folder).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.preprocessing import FLAIR_CHANNEL
from pipeline.volumes.domain import MODEL_AXCODES, to_8bit
from pipeline.volumes.volume import Volume

__all__ = ["volume_figure"]


def _oriented(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`array` (X, Y, Z) reoriented to MODEL_AXCODES through `affine`, and its spacing there."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(MODEL_AXCODES))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out_spacing = np.zeros(3)
    for axis, (target, _) in enumerate(transform):
        out_spacing[int(target)] = spacing[axis]
    return nib.orientations.apply_orientation(array, transform), out_spacing


def volume_figure(
    scan: str | os.PathLike | Volume,
    mask_nifti: str | os.PathLike,
    out_png: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw the mask NIfTI over the scan's FLAIR in three orthogonal views -> `out_png`."""
    import matplotlib.pyplot as plt
    import nibabel as nib

    from pipeline.io_utils import atomic_save
    from pipeline.volumes.readers import read_volume

    volume = scan if isinstance(scan, Volume) else read_volume(scan)
    mask_image = nib.load(str(mask_nifti))
    if tuple(mask_image.shape[:3]) != volume.shape:
        raise DataError(f"mask shape {mask_image.shape} is not the scan's {volume.shape}", [mask_nifti])
    flair, spacing = _oriented(to_8bit(volume.data[..., FLAIR_CHANNEL]), volume.affine)
    mask, _ = _oriented(np.asarray(mask_image.dataobj) > 0, mask_image.affine)
    if mask.any():
        centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)]
    else:
        centre = [n // 2 for n in mask.shape]
    r, c, k = centre
    # (image, mask, pixel height mm, pixel width mm, label); superior at the top of the side views
    views = [
        (flair[:, :, k], mask[:, :, k], spacing[0], spacing[1], f"axial, slice {k}"),
        (flair[r, :, :].T[::-1], mask[r, :, :].T[::-1], spacing[2], spacing[1], f"coronal, row {r}"),
        (flair[:, c, :].T[::-1], mask[:, c, :].T[::-1], spacing[2], spacing[0], f"sagittal, column {c}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (image, outline, height, width, label) in zip(axes, views, strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, aspect=height / width, interpolation="nearest")
        if outline.any():
            ax.contour(outline.astype(float), levels=[0.5], colors=["#ff4040"], linewidths=1.0)
        ax.set_title(label, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(title or f"{volume.study_id}: predicted mask (red) read back from {Path(mask_nifti).name}",
                 fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_save(out_png, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.volumes.figure", description=__doc__.splitlines()[0]
    )
    parser.add_argument("scan", help="the study the mask was predicted on (NIfTI, channel folder, ...)")
    parser.add_argument("mask", help="the mask NIfTI written by diagnose (OUT/volumes/<name>_mask.nii.gz)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    print(volume_figure(args.scan, args.mask, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
