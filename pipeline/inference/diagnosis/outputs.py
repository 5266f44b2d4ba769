"""Where a diagnosis writes: checking OUT and the inputs, and a flagged slice's mask, overlay and
Grad-CAM. Names and the safe writer are `pipeline.inference.outputs`."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.inference.diagnosis.schema import GRADCAM_DIR, MASK_DIR, OVERLAY_DIR
from pipeline.inference.outputs import OutputWriter, within
from pipeline.inference.overlays import PREDICTION_COLOR, heatmap_overlay, overlay
from pipeline.paths import safe_resolve

log = logging.getLogger(__name__)


def prepare_out(out: Path) -> None:
    """Create OUT and check that a file can be written in it; DataError saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        parent = next((q for q in out.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            reason += f"; {parent} is a file"
        raise DataError(f"cannot create or write to the output folder ({reason})", [out]) from exc


def check_locations(items: Sequence[str | os.PathLike], out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError("the output path exists and is not a folder", [out])
    root = safe_resolve(out)
    inside = [
        str(item)
        for item in items
        if Path(item).expanduser().exists() and within(Path(item).expanduser(), root)
    ]
    if inside:
        raise DataError(
            f"input lies inside the output folder {root}; choose another --out so that no input "
            "can be overwritten",
            inside,
        )


def write_slice_outputs(
    writer: OutputWriter, name: str, row: dict[str, Any], image: np.ndarray, result: Any, pipeline: Any,
    explain: bool,
) -> bool:
    """Write the mask, overlay and (with `explain`) Grad-CAM of a flagged slice, filling `row`'s
    paths. Returns True when Grad-CAM is impossible for this classifier (not tried again)."""
    row["mask_path"] = writer.png(f"{MASK_DIR}/{name}_mask.png", result.mask * 255)
    row["overlay_path"] = writer.png(
        f"{OVERLAY_DIR}/{name}_overlay.png", overlay(image, {"prediction": (result.mask, PREDICTION_COLOR)})
    )
    if not explain:
        return False
    from pipeline.inference.gradcam import grad_cam

    try:
        heatmap = grad_cam(pipeline.classifier, image)
    except ValueError as exc:  # a classifier Grad-CAM cannot take apart
        log.warning("no Grad-CAM: %s", exc)
        return True
    row["gradcam_path"] = writer.png(f"{GRADCAM_DIR}/{name}_gradcam.png", heatmap_overlay(image, heatmap))
    return False
