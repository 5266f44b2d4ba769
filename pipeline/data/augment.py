"""Train-time augmentation of (image, mask) pairs in numpy/OpenCV, seeded and identical for both.

Geometry (flips, rotation + scaling + shift, elastic deformation) is applied to image and mask
with the same sampling grid; the image is resampled bilinearly, the mask with nearest
neighbour so it stays 0/1. Brightness, contrast and gamma touch the image only.

The elastic deformation follows the U-Net paper (Ronneberger et al., 2015) in the form of
Simard et al. (2003): a random displacement field, smoothed by a Gaussian, scaled by `alpha`.
When both an affine and an elastic warp are drawn they are composed into one sampling map, so
the image is interpolated once, not twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["AugmentParams", "augment_pair"]

_BORDERS = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}
_REFERENCE_SIZE = 256.0  # elastic alpha/sigma are given for 256 px slices


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of each augmentation (probabilities in [0, 1]).

    Flips: `p_hflip` left-right (anatomically plausible: hemispheres swap), `p_vflip`
    up-down (off by default: a face at the bottom never occurs at test time).
    Affine (`p_affine`): rotation uniform in +-`max_rotation` degrees, isotropic scale in
    `scale_range`, shift up to +-`max_shift` of the image size.
    Elastic (`p_elastic`): displacement = `elastic_alpha` * Gaussian(`elastic_sigma`)-smoothed
    uniform(-1, 1) noise, both in pixels for a 256 px slice; for other sizes sigma scales with
    the size and alpha with its square, so the warp looks the same. Defaults give displacements
    of ~3 px RMS, smooth over ~20 px.
    Intensity, image only: brightness shift up to +-`max_brightness` (fraction of 255),
    contrast factor in `contrast_range` around the image mean, gamma in `gamma_range`.
    `border`: "constant" (black, like the scanner background) or "reflect".
    """

    p_hflip: float = 0.5
    p_vflip: float = 0.0
    p_affine: float = 0.5
    max_rotation: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.05
    p_elastic: float = 0.3
    elastic_alpha: float = 400.0
    elastic_sigma: float = 20.0
    p_brightness: float = 0.3
    max_brightness: float = 0.1
    p_contrast: float = 0.3
    contrast_range: tuple[float, float] = (0.85, 1.15)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.8, 1.25)
    border: str = "constant"

    def __post_init__(self) -> None:
        for name in ("p_hflip", "p_vflip", "p_affine", "p_elastic", "p_brightness", "p_contrast", "p_gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.border not in _BORDERS:
            raise ValueError(f"border must be one of {sorted(_BORDERS)}, got {self.border!r}")
        if self.elastic_sigma <= 0:
            raise ValueError("elastic_sigma must be > 0")

    @classmethod
    def geometry_only(cls, **overrides) -> AugmentParams:
        """Same defaults with every intensity augmentation off (useful for checking alignment)."""
        return cls(**{"p_brightness": 0.0, "p_contrast": 0.0, "p_gamma": 0.0, **overrides})

    @classmethod
    def none(cls) -> AugmentParams:
        """Every augmentation off: `augment_pair` returns copies of its inputs."""
        return cls(
            p_hflip=0.0,
            p_vflip=0.0,
            p_affine=0.0,
            p_elastic=0.0,
            p_brightness=0.0,
            p_contrast=0.0,
            p_gamma=0.0,
        )


def _affine_matrix(rng: np.random.Generator, params: AugmentParams, height: int, width: int) -> np.ndarray:
    """Forward 2x3 affine (rotation about the centre, scale, shift) as cv2.getRotationMatrix2D builds it."""
    angle = rng.uniform(-params.max_rotation, params.max_rotation)
    scale = rng.uniform(*params.scale_range)
    shift = rng.uniform(-params.max_shift, params.max_shift, size=2) * (width, height)
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, scale)
    matrix[:, 2] += shift
    return matrix


def _elastic_field(rng: np.random.Generator, params: AugmentParams, height: int, width: int) -> np.ndarray:
    """Smoothed random displacement field (2, H, W) float32 in pixels."""
    factor = max(height, width) / _REFERENCE_SIZE
    sigma = params.elastic_sigma * factor
    alpha = params.elastic_alpha * factor * factor
    # The field is smooth at scale sigma, so draw and blur it on a grid ~sigma/4 coarser and
    # upsample: the same field to the eye at a fraction of the cost of a 160-tap blur.
    step = max(1, int(sigma // 4))
    small = (max(2, -(-height // step)), max(2, -(-width // step)))
    field = np.empty((2, height, width), np.float32)
    for axis in range(2):
        noise = rng.uniform(-1.0, 1.0, size=small).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma / step, borderType=cv2.BORDER_REFLECT_101)
        # Coarse white noise has `step` times fewer samples per blur footprint; divide to keep
        # the displacement amplitude that full-resolution noise would give.
        field[axis] = cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR) * (alpha / step)
    return field


def _warp(
    image: np.ndarray,
    mask: np.ndarray,
    matrix: np.ndarray | None,
    field: np.ndarray | None,
    border: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample image (bilinear) and mask (nearest) with one shared map: affine, elastic or both."""
    height, width = mask.shape
    if field is None:
        assert matrix is not None
        warp = lambda a, interp: cv2.warpAffine(  # noqa: E731
            a, matrix, (width, height), flags=interp, borderMode=border, borderValue=0
        )
        return warp(image, cv2.INTER_LINEAR), warp(mask, cv2.INTER_NEAREST)
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    # Elastic first in output space: the output pixel p samples the affine output at p + d(p).
    xs += field[0]
    ys += field[1]
    if matrix is not None:
        inverse = cv2.invertAffineTransform(matrix)
        xs, ys = (
            inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2],
            inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2],
        )
    xs, ys = xs.astype(np.float32), ys.astype(np.float32)
    image = cv2.remap(image, xs, ys, interpolation=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    mask = cv2.remap(mask, xs, ys, interpolation=cv2.INTER_NEAREST, borderMode=border, borderValue=0)
    return image, mask


def _intensity(image: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Brightness, contrast and gamma folded into one 256-entry lookup table applied to the image."""
    do_brightness = rng.random() < params.p_brightness
    shift = rng.uniform(-params.max_brightness, params.max_brightness) * 255.0
    do_contrast = rng.random() < params.p_contrast
    factor = rng.uniform(*params.contrast_range)
    do_gamma = rng.random() < params.p_gamma
    gamma = rng.uniform(*params.gamma_range)
    if not (do_brightness or do_contrast or do_gamma):
        return image
    values = np.arange(256, dtype=np.float32)
    if do_brightness:
        values = values + shift
    if do_contrast:
        mean = float(image.mean())
        values = (values - mean) * factor + mean
    if do_gamma:
        values = 255.0 * (np.clip(values, 0.0, 255.0) / 255.0) ** gamma
    table = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    params: AugmentParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly augment one slice and its mask the same way.

    image: uint8 (H, W, 3); mask: uint8 (H, W) 0/1; rng: the only source of randomness, so the
    same generator state gives the same result. Returns new arrays (image uint8 (H, W, 3),
    mask uint8 (H, W) 0/1); the inputs (possibly read-only memory maps) are never modified.
    Every random number is drawn whether or not its transform fires, so changing one
    probability does not reshuffle the others.
    """
    params = params or AugmentParams()
    if image.ndim != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"image (H, W, 3) and mask (H, W) must match, got {image.shape} and {mask.shape}")
    height, width = mask.shape

    hflip, vflip, affine, elastic = rng.random(4) < (
        params.p_hflip,
        params.p_vflip,
        params.p_affine,
        params.p_elastic,
    )
    matrix = _affine_matrix(rng, params, height, width)
    field_rng = np.random.default_rng(rng.integers(0, 2**63))  # fixed draw count whether or not used
    if hflip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if vflip:
        image, mask = image[::-1], mask[::-1]
    # Copies: contiguous for OpenCV, and the caller's arrays (often read-only memmaps) stay intact.
    image = np.array(image, dtype=np.uint8, order="C", copy=True)
    mask = np.array(mask, dtype=np.uint8, order="C", copy=True)
    if affine or elastic:
        field = _elastic_field(field_rng, params, height, width) if elastic else None
        image, mask = _warp(image, mask, matrix if affine else None, field, _BORDERS[params.border])
    image = _intensity(image, rng, params)
    return image, mask


def random_crop(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator, p_tumor: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a `size` x `size` window from an (H, W, C) image and its (H, W) mask.

    With probability `p_tumor` (and when the mask has tumour) the window is centred on a
    random tumour pixel, clamped to the slice; otherwise it is placed uniformly. Training the
    fully convolutional segmenter on crops costs a quarter of the compute per sample at
    128 of 256 px, so the CPU budget buys four times the steps; inference stays full size.
    """
    height, width = mask.shape
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the slice size {height}x{width}")
    ys, xs = np.nonzero(mask)
    if ys.size and rng.random() < p_tumor:
        k = rng.integers(ys.size)
        y0 = int(np.clip(ys[k] - size // 2, 0, height - size))
        x0 = int(np.clip(xs[k] - size // 2, 0, width - size))
    else:
        y0 = int(rng.integers(0, height - size + 1))
        x0 = int(rng.integers(0, width - size + 1))
    return image[y0 : y0 + size, x0 : x0 + size], mask[y0 : y0 + size, x0 : x0 + size]
