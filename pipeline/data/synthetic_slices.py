"""Brain-like synthetic slices: for benchmarks and backend checks when no real slice is at hand."""

from __future__ import annotations

import numpy as np

__all__ = ["TUMOUR_SHARE", "probe_batch", "synthetic_slices"]

TUMOUR_SHARE = 1 / 3  # about the share of tumour slices in the LGG dataset


def synthetic_slices(
    n: int, size: int = 256, seed: int = 0, tumour_share: float = TUMOUR_SHARE
) -> tuple[list[np.ndarray], int]:
    """n uint8 (size, size, 3) slices, round(n * tumour_share) with a tumour -> (slices shuffled, n_tumour).

    Each is a noisy disc (the head, three channel levels) on a zero background; a tumour slice
    adds a bright ellipse to the FLAIR channel (channel 1), as FLAIR abnormalities look.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    brain = ((yy - c) ** 2 + (xx - c) ** 2) < (0.42 * size) ** 2
    n_tumour = round(n * tumour_share)
    images = []
    for i in range(n):
        image = np.zeros((size, size, 3), np.float32)
        for ch, level in enumerate((70, 90, 80)):
            image[..., ch] = brain * (level + rng.normal(0, 6, brain.shape))
        if i < n_tumour:
            cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
            ry, rx = rng.uniform(0.05 * size, 0.15 * size, 2)
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            image[blob, 1] += 110
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    order = rng.permutation(n)
    return [images[i] for i in order], n_tumour


def probe_batch(n: int = 8, size: int = 256, seed: int = 0) -> np.ndarray:
    """Deterministic synthetic MRI-like slices -> uint8 (n, size, size, 3), file channel order.

    The probe on which the float16-stored release is compared with the run's models
    (`pipeline.models.release`). Each slice is a noisy head disc
    (per-channel grey levels near those of the LGG FLAIR series); every other slice carries a
    FLAIR-bright ellipse (a "tumour") of varying size. Contrast varies from slice to slice so the
    models' outputs are spread out rather than all in one saturated corner.
    """
    if n < 1 or size < 8:
        raise ValueError(f"probe batch needs n >= 1 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        c = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
        radius = rng.uniform(0.3, 0.45) * size
        head = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2) < radius**2
        scale = rng.uniform(0.6, 1.4)
        image = np.zeros((size, size, 3), np.float32)
        for ch, level in enumerate((70.0, 90.0, 80.0)):
            image[..., ch] = head * (scale * level + rng.normal(0, 8, (size, size)))
        if i % 2 == 1:
            cy, cx = c + rng.uniform(-0.15, 0.15, 2) * size
            ry, rx = rng.uniform(0.04, 0.15, 2) * size
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            image[blob, 1] += rng.uniform(60, 130)  # FLAIR hyperintensity
            image[blob, 2] += rng.uniform(10, 50)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images
