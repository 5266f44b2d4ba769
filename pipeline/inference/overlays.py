"""Pictures for people: mask contours and Grad-CAM heatmaps drawn on the FLAIR channel.

Used by `diagnose` (one overlay per flagged slice) and by the evaluation's figures. The
slice is shown as greyscale (the FLAIR channel, where LGG abnormalities are visible);
each mask is drawn as its outline in its own colour, so several (ground truth, prediction)
stay readable on top of each other.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from pipeline.preprocessing import FLAIR_CHANNEL

__all__ = ["PREDICTION_COLOR", "TRUTH_COLOR", "encode_png", "flair_rgb", "heatmap_overlay", "overlay"]

Color = tuple[int, int, int]
PREDICTION_COLOR: Color = (255, 64, 64)  # red
TRUTH_COLOR: Color = (64, 255, 64)  # green


def flair_rgb(image: np.ndarray, channel: int = FLAIR_CHANNEL) -> np.ndarray:
    """Slice (H, W, 3) or greyscale (H, W) -> uint8 (H, W, 3) greyscale RGB of `channel`."""
    image = np.asarray(image)
    grey = image if image.ndim == 2 else image[..., channel]
    if grey.dtype != np.uint8:
        grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(
    image: np.ndarray,
    masks: Mapping[str, tuple[np.ndarray, Color]],
    channel: int = FLAIR_CHANNEL,
    thickness: int = 1,
    legend: bool = False,
) -> np.ndarray:
    """Draw each mask's contour on the greyscale `channel` of `image`.

    image: uint8 (H, W, 3) slice (or (H, W) greyscale).
    masks: label -> (mask (H, W), any values, non-zero = inside; RGB colour 0..255), drawn in order.
    thickness: contour line width in pixels.
    legend: write the labels in their colours in the top-left corner (readable from ~128 px).

    Returns uint8 (H, W, 3) RGB.
    """
    canvas = flair_rgb(image, channel).copy()
    for label, (mask, color) in masks.items():
        mask = np.asarray(mask)
        if mask.shape != canvas.shape[:2]:
            raise ValueError(f"mask {label!r} has shape {mask.shape}, image is {canvas.shape[:2]}")
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in color), thickness)
    if legend:
        scale = max(canvas.shape[0] / 512, 0.3)
        for row, (label, (_, color)) in enumerate(masks.items()):
            y = int((row + 1) * 22 * scale) + 2
            cv2.putText(
                canvas,
                str(label),
                (4, y),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                tuple(int(c) for c in color),
                1,
                cv2.LINE_AA,
            )
    return canvas


def heatmap_overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, channel: int = FLAIR_CHANNEL
) -> np.ndarray:
    """Blend a [0, 1] heatmap (H, W), coloured with the JET map, over the greyscale slice -> uint8 RGB."""
    heatmap = np.asarray(heatmap, np.float32)
    base = flair_rgb(image, channel)
    if heatmap.shape != base.shape[:2]:
        raise ValueError(f"heatmap has shape {heatmap.shape}, image is {base.shape[:2]}")
    colored = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colored, alpha, base, 1 - alpha, 0)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) greyscale or (H, W, 3) RGB -> PNG bytes (for `pipeline.io_utils.atomic_write_bytes`)."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as PNG")
    return buffer.tobytes()
