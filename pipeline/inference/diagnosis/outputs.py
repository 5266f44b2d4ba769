"""Where a diagnosis writes: checking OUT and the inputs, and a flagged slice's mask, overlay and
Grad-CAM. Names and the safe writer are `pipeline.inference.outputs`."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, OutputInUseError
from pipeline.inference.diagnosis.schema import GRADCAM_DIR, LOCK, MASK_DIR, OVERLAY_DIR, VOLUME_DIR
from pipeline.inference.outputs import OutputWriter, within
from pipeline.inference.overlays import PREDICTION_COLOR, heatmap_overlay, overlay
from pipeline.io_utils import exclusive_lock, is_leftover_temporary
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


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold OUT's lock (OUT/`LOCK`) while the block runs: one diagnosis per output folder at a time.

    OutputInUseError at once when another process holds it; the lock dies with its process.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(out / LOCK))
        except BlockingIOError:
            raise OutputInUseError(
                "another diagnose is writing into this output folder; wait for it to finish or "
                "choose another --out", out) from None
        yield


OUTPUT_FOLDERS = (MASK_DIR, OVERLAY_DIR, GRADCAM_DIR, VOLUME_DIR, "review")


def remove_leftovers(out: Path) -> int:
    """Remove the temporary files a killed run left in OUT and its output folders
    (`io_utils.is_leftover_temporary`, e.g. `.x_mask.png.ab12.tmp`). Called under OUT's lock, so
    no live writer's file is touched. Returns how many were removed."""
    removed = 0
    for folder in (out, *(out / name for name in OUTPUT_FOLDERS)):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if is_leftover_temporary(path.name) and (path.is_symlink() or path.is_file()):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    if removed:
        log.info("removed %d temporary file(s) an interrupted run left in %s", removed, out)
    return removed


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
