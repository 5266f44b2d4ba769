"""A channel volume's intensities to the models' 8 bits, so that outliers cannot decide the scale.

The rule, per channel over the whole volume (the measurements behind it: `data/README.md`):

* `uint8` is used as stored: the models' own range (a Kaggle study stacked into a uint8 NIfTI
  gives exactly its slices). `bool` is 0/255.
* Any other dtype is mapped linearly from `low..high` to 0..255, where `low` and `high` are the
  channel's minimum and maximum *among the voxels inside its fences*. Without outliers that is
  the channel's own minimum..maximum, what the dataset's 8-bit volumes show (minimum 0, maximum
  reached by a single voxel), so clean studies keep their exact masks.
* The fences stand `FENCE` typical ranges beyond the typical range. The typical range is taken
  per stored slice (the 0.5 and 99.5 percentiles of each slice along the file's third axis),
  then the median over the slices (the upper percentile over slices holding more than
  background), so neither one hot voxel nor one whole slice of garbage moves it. Voxels beyond
  the fences (a scanner spike at 32767, a corrupt byte at -32768) are clipped to 0 or 255 and
  the channel gets a warning saying how many and where the scale runs instead.
* A stored slice whose own typical range lies beyond the fences (random bytes in one DICOM
  file's pixel data) is not an outlier but corrupt data: a `DataError` naming the slice (and its
  file, for DICOM).

Arithmetic is done in float64 on halves (`x/2 - low/2`), so values near the float64 limit
(data scaled by 1e300) cannot overflow; NaN and infinite voxels are refused before any of it
(`pipeline.volumes.volume.check_finite`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError

__all__ = ["FENCE", "PERCENTILES", "IntensityScale", "intensity_scale", "to_uint8"]

PERCENTILES = (0.5, 99.5)  # a slice's typical range: robust to a few hundred odd voxels
FENCE = 3.0  # typical ranges beyond the typical range: far above any tissue of an MRI study
_SAMPLE = 1 << 14  # voxels per slice looked at for its percentiles (a strided sample)


@dataclass(frozen=True)
class IntensityScale:
    """The linear map of one channel: `low..high` -> 0..255 (None: uint8, used as stored).

    raw_low, raw_high: the channel's own minimum and maximum.
    below, above: voxels beyond the fences, left out of the scale (clipped to 0 or 255).
    """

    low: float | None
    high: float | None
    raw_low: float = 0.0
    raw_high: float = 0.0
    below: int = 0
    above: int = 0

    @property
    def clipped(self) -> bool:
        return bool(self.below or self.above)

    def warning(self, what: str) -> str | None:
        """A row warning when outliers were left out of the scale, else None."""
        if not self.clipped:
            return None
        parts = []
        if self.above:
            parts.append(f"{self.above:,} voxel(s) far above the rest (up to {self.raw_high:.6g})")
        if self.below:
            parts.append(f"{self.below:,} voxel(s) far below the rest (down to {self.raw_low:.6g})")
        return (
            f"{what}: {' and '.join(parts)} left out of the 8-bit scale, which runs "
            f"{self.low:.6g}..{self.high:.6g} instead of {self.raw_low:.6g}..{self.raw_high:.6g}"
        )

    def apply(self, values: np.ndarray) -> np.ndarray:
        """`values` (any part of the channel) -> float32 in 0..255, unrounded."""
        if self.low is None:
            return np.asarray(values, np.float32)
        low, high = np.float64(self.low) / 2, np.float64(self.high) / 2
        if not high > low:  # a constant channel
            return np.zeros(np.shape(values), np.float32)
        out = np.asarray(values, np.float64) / 2 - low
        out *= 255.0 / (high - low)
        return np.clip(out, 0.0, 255.0).astype(np.float32)


def _slice_ranges(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per stored slice (third axis): (percentile low, percentile high, minimum, maximum), float64."""
    n = channel.shape[2]
    lows, highs, mins, maxs = (np.empty(n) for _ in range(4))
    plane = channel.shape[0] * channel.shape[1]
    step = max(1, int(np.ceil(np.sqrt(plane / _SAMPLE))))
    for k in range(n):
        one = channel[:, :, k]
        sample = np.asarray(one[::step, ::step], np.float64).ravel()
        lows[k], highs[k] = np.percentile(sample, PERCENTILES)
        mins[k], maxs[k] = float(one.min()), float(one.max())
    return lows, highs, mins, maxs


def _fences(lows: np.ndarray, highs: np.ndarray) -> tuple[float, float, float, float]:
    """(typical low, typical high, low fence, high fence) from the slices' percentile ranges."""
    low = float(np.median(lows))
    content = highs[highs > low]  # slices holding more than background
    if content.size == 0:
        return low, low, -np.inf, np.inf  # no typical range to judge by: the raw min..max
    high = float(np.median(content))
    spread = high / 2 - low / 2  # halves: no overflow near the float64 limit
    with np.errstate(over="ignore"):
        return low, high, low - 2 * FENCE * spread, high + 2 * FENCE * spread


def _corrupt_slices(
    lows: np.ndarray, highs: np.ndarray, fences: tuple[float, float, float, float],
    what: str, files: Sequence[str | os.PathLike], slice_files: Sequence[str | os.PathLike] | None,
) -> None:
    low, high, low_fence, high_fence = fences
    bad = np.flatnonzero((highs > high_fence) | (lows < low_fence))
    if bad.size == 0:
        return
    named = []
    for k in bad[:5]:
        name = f" ({os.path.basename(os.fspath(slice_files[k]))})" if slice_files else ""
        where = f"stored slice {k}{name}"
        named.append(f"{where}: {lows[k]:.6g}..{highs[k]:.6g}")
    more = f" and {bad.size - 5} more" if bad.size > 5 else ""
    raise DataError(
        f"{what}: {bad.size} slice(s) whose typical intensities lie far outside the study's "
        f"{low:.6g}..{high:.6g} ({'; '.join(named)}{more}): corrupt pixel data",
        [*(slice_files[k] for k in bad[:5] if slice_files), *files],
    )


def intensity_scale(
    channel: np.ndarray, files: Sequence[str | os.PathLike] = (), what: str = "channel",
    slice_files: Sequence[str | os.PathLike] | None = None,
) -> IntensityScale:
    """The robust 8-bit scale of one channel volume (X, Y, Z) (module docstring).

    slice_files: the file of each stored slice (DICOM), named when a slice is corrupt.
    Raises DataError naming `files` for a corrupt slice.
    """
    channel = np.asarray(channel)
    if channel.dtype == np.uint8:
        return IntensityScale(None, None)
    if channel.dtype == bool:
        return IntensityScale(0.0, 1.0, 0.0, 1.0)
    if channel.ndim != 3:
        raise ValueError(f"a channel volume is (X, Y, Z), got {channel.shape}")
    if not (np.issubdtype(channel.dtype, np.integer) or np.issubdtype(channel.dtype, np.floating)):
        raise DataError(f"{what} has voxels of type {channel.dtype}; expected real intensities", files)
    lows, highs, mins, maxs = _slice_ranges(channel)
    raw_low, raw_high = float(mins.min()), float(maxs.max())
    fences = _fences(lows, highs)
    _corrupt_slices(lows, highs, fences, what, files, slice_files)
    low_fence, high_fence = fences[2:]
    if raw_low >= low_fence and raw_high <= high_fence:
        return IntensityScale(raw_low, raw_high, raw_low, raw_high)
    low, high, below, above = np.inf, -np.inf, 0, 0
    for k in range(channel.shape[2]):  # a second pass, slice by slice: no copy of the volume
        one = np.asarray(channel[:, :, k], np.float64)
        inside = (one >= low_fence) & (one <= high_fence)
        below += int(np.count_nonzero(one < low_fence))
        above += int(np.count_nonzero(one > high_fence))
        if inside.any():
            low, high = min(low, float(one[inside].min())), max(high, float(one[inside].max()))
    return IntensityScale(low, high, raw_low, raw_high, below, above)


def to_uint8(channel: np.ndarray, scale: IntensityScale, out: np.ndarray | None = None) -> np.ndarray:
    """`channel` (X, Y, Z) -> uint8 (X, Y, Z) with `scale`, rounded, slice by slice into `out`."""
    out = np.empty(channel.shape, np.uint8) if out is None else out
    for k in range(channel.shape[2]):
        out[:, :, k] = np.rint(scale.apply(channel[:, :, k]))
    return out
