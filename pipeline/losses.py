"""Training losses for the segmenter, plus U-Net border weight maps.

The classifier does not use this module: it trains with Keras's own `BinaryCrossentropy`
(`pipeline.training.classifier_training`).

Every loss is a registered `keras.losses.Loss`, so a compiled `.keras` file reloads with
`keras.models.load_model(path)` (safe mode, no `custom_objects`) once this module is imported.
All arithmetic is float32: inputs are cast first, because under `mixed_bfloat16` a bfloat16
sum over 65k pixels keeps only ~3 significant digits.

Shapes: `y_true` and `y_pred` are (B, H, W, 1) masks/probabilities; the cross-entropy losses
also accept (B, 1) labels/probabilities.

- Cross-entropy losses (`BCELoss`, `BorderWeightedBCE`) return a **per-pixel** loss
  (B, H, W) (the mean over the last, channel axis), so a per-pixel `sample_weight` of shape
  (B, H, W) - e.g. the border weight map the dataset yields - multiplies each pixel before
  Keras averages over all of them.
- Overlap losses (`DiceLoss`, `TverskyLoss`, `FocalTverskyLoss`, `BCEDiceLoss`) are computed
  **per sample** over all its (H, W, C) pixels and return (B,); Keras then averages over the
  batch. A per-pixel `sample_weight` does not apply to them.
- `smooth` (default 1.0) is added to the numerator and denominator of the overlap ratios:
  it keeps the loss defined (and 0) when a slice and its prediction are both empty, and
  keeps gradients finite. With `smooth` small compared with the tumour area it changes the
  value very little.

Use `get_loss(name, **kwargs)` to build one from a config string (`LOSSES` lists the names).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops
from scipy import ndimage

__all__ = [
    "LOSSES",
    "BCEDiceLoss",
    "BCELoss",
    "BorderWeightedBCE",
    "DiceLoss",
    "FocalTverskyLoss",
    "TverskyLoss",
    "border_weight_map",
    "get_loss",
]

_EPS = 1e-7  # keeps (1 - TI) ** gamma differentiable at a perfect prediction


def _to_float32(y_true, y_pred):
    """Cast both tensors to float32 (the model may run a mixed bfloat16/float16 policy)."""
    return ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")


def _sample_axes(x) -> tuple[int, ...]:
    """Every axis but the batch axis: one overlap ratio per sample over (H, W, C)."""
    return tuple(range(1, len(x.shape)))


def _pixel_bce(y_true, y_pred):
    """Per-element BCE (probabilities clipped to [eps, 1-eps] by Keras), averaged over the last axis."""
    return ops.mean(ops.binary_crossentropy(y_true, y_pred, from_logits=False), axis=-1)


def _soft_counts(y_true, y_pred):
    """Soft TP, FP, FN per sample, shape (B,)."""
    axes = _sample_axes(y_pred)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    return tp, fp, fn


def _soft_dice_loss(y_true, y_pred, smooth: float):
    """1 - (2 TP + smooth) / (sum(p) + sum(t) + smooth), per sample (B,)."""
    axes = _sample_axes(y_pred)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def _tversky_index(y_true, y_pred, alpha: float, beta: float, smooth: float):
    """TI = (TP + smooth) / (TP + alpha FP + beta FN + smooth), per sample (B,)."""
    tp, fp, fn = _soft_counts(y_true, y_pred)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


class _PipelineLoss(keras.losses.Loss):
    """Base: float32 computation regardless of the global dtype policy."""

    def __init__(self, name: str | None = None, reduction: str | None = "sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction, dtype="float32")

    def call(self, y_true, y_pred):
        y_true, y_pred = _to_float32(y_true, y_pred)
        return self._compute(y_true, y_pred)

    def _compute(self, y_true, y_pred):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="pipeline")
class BCELoss(_PipelineLoss):
    """Binary cross-entropy on probabilities; per-pixel (B, H, W) for masks, (B,) for (B, 1) labels."""

    def __init__(self, name: str = "bce", reduction: str | None = "sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction)

    def _compute(self, y_true, y_pred):
        return _pixel_bce(y_true, y_pred)


@keras.saving.register_keras_serializable(package="pipeline")
class BorderWeightedBCE(BCELoss):
    """The U-Net paper's weighted cross-entropy: per-pixel BCE (B, H, W) times a weight map.

    The weights arrive as Keras's per-pixel `sample_weight` (B, H, W), built for each mask
    by `border_weight_map` (use `loss.weight_map(mask)`, which applies this loss's `w0` and
    `sigma`). Without `sample_weight` it equals plain `BCELoss`. With the default reduction
    the weighted pixel losses are summed and divided by the number of pixels; since the
    class-balancing part of the map has mean 1, the loss stays on the scale of plain BCE.
    """

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        name: str = "border_bce",
        reduction: str | None = "sum_over_batch_size",
    ):
        super().__init__(name=name, reduction=reduction)
        self.w0 = float(w0)
        self.sigma = float(sigma)

    def weight_map(self, mask: np.ndarray) -> np.ndarray:
        """`border_weight_map(mask, w0=self.w0, sigma=self.sigma)`: float32 (H, W)."""
        return border_weight_map(mask, w0=self.w0, sigma=self.sigma)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "w0": self.w0, "sigma": self.sigma}


@keras.saving.register_keras_serializable(package="pipeline")
class DiceLoss(_PipelineLoss):
    """Soft Dice loss `1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`.

    Computed per sample over its (H, W, C) pixels, returned as (B,) and averaged over the
    batch by Keras (not one Dice over the whole batch), so a slice with a small tumour
    counts as much as one with a large tumour.
    """

    def __init__(self, smooth: float = 1.0, name: str = "dice_loss",
                 reduction: str | None = "sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction)
        self.smooth = float(smooth)

    def _compute(self, y_true, y_pred):
        return _soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="pipeline")
class TverskyLoss(_PipelineLoss):
    """Tversky loss `1 - TI`, TI = (TP + smooth) / (TP + alpha FP + beta FN + smooth), per sample.

    Convention of Salehi et al. (2017): **alpha weights false positives, beta false
    negatives**. The defaults (0.3, 0.7) penalise missed tumour more than false alarms
    (Abraham & Khan write the same choice as alpha = 0.7 on false negatives). With
    alpha = beta = 0.5 and `smooth` = 0 it equals the soft Dice loss; with smoothing it
    equals `DiceLoss(smooth=2 * smooth)`.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0,
                 name: str = "tversky_loss", reduction: str | None = "sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.smooth = float(smooth)

    def _compute(self, y_true, y_pred):
        return 1.0 - _tversky_index(y_true, y_pred, self.alpha, self.beta, self.smooth)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="pipeline")
class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss `(1 - TI) ** gamma` (Abraham & Khan, 2019), per sample.

    Convention: the exponent here **is** `gamma`. The paper writes `(1 - TI) ** (1/gamma)`
    and recommends its gamma = 4/3, i.e. `gamma=0.75` here (the default). With gamma < 1
    the loss is larger than plain Tversky and, relative to it, largest on slices that are
    already fairly well segmented, so the gradient does not vanish as TI -> 1 (the paper
    reports better recall on small lesions); gamma = 1 is plain Tversky, and gamma > 1
    down-weights well-segmented slices instead.
    `1 - TI` is floored at 1e-7 so the gradient stays finite at a perfect prediction.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75, smooth: float = 1.0,
                 name: str = "focal_tversky_loss", reduction: str | None = "sum_over_batch_size"):
        super().__init__(alpha=alpha, beta=beta, smooth=smooth, name=name, reduction=reduction)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def _compute(self, y_true, y_pred):
        ti = _tversky_index(y_true, y_pred, self.alpha, self.beta, self.smooth)
        return ops.power(ops.maximum(1.0 - ti, _EPS), self.gamma)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="pipeline")
class BCEDiceLoss(_PipelineLoss):
    """`bce_weight * BCE + dice_weight * soft Dice`, per sample (B,).

    The BCE term is the mean over the sample's pixels. The Dice term is per sample as in
    `DiceLoss`, or, with `batch_dice=True` (nnU-Net's "batch Dice"), one soft Dice over all
    pixels of the batch given to every sample. Per-sample Dice degenerates on an empty
    target: it is ``1 - smooth / (sum(p) + smooth)``, which saturates at 1 (gradient ~0) as
    soon as a few pixels fire, so empty crops teach it nothing beyond the BCE term. Batch
    Dice counts their false positives in the same ratio as the tumour pixels of the other
    crops, so they are penalised on the scale that matters for a patient's Dice.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 batch_dice: bool = False, name: str = "bce_dice_loss",
                 reduction: str | None = "sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.batch_dice = bool(batch_dice)

    def _compute(self, y_true, y_pred):
        bce = _pixel_bce(y_true, y_pred)  # (B, H, W) or (B,) for rank-2 inputs
        bce_axes = tuple(range(1, len(bce.shape)))
        bce = ops.mean(bce, axis=bce_axes) if bce_axes else bce
        if self.batch_dice:
            intersection = ops.sum(y_true * y_pred)
            total = ops.sum(y_true) + ops.sum(y_pred)
            dice = 1.0 - (2.0 * intersection + self.smooth) / (total + self.smooth)
            dice = ops.zeros_like(bce) + dice  # the same value for every sample
        else:
            dice = _soft_dice_loss(y_true, y_pred, self.smooth)
        return self.bce_weight * bce + self.dice_weight * dice

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bce_weight": self.bce_weight, "dice_weight": self.dice_weight,
                "smooth": self.smooth, "batch_dice": self.batch_dice}


# Config name -> loss class. Keys are what `train` configs and `get_loss` accept.
LOSSES: dict[str, type[keras.losses.Loss]] = {
    "bce": BCELoss,
    "dice": DiceLoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
    "bce_dice": BCEDiceLoss,
    "border_bce": BorderWeightedBCE,
}


def get_loss(name: str, **kwargs: Any) -> keras.losses.Loss:
    """Build the loss registered under `name` (case-insensitive, '-' == '_') with `kwargs`.

    Raises ValueError naming the valid names when `name` is unknown.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[key](**kwargs)


# 8-connectivity: pixels touching diagonally belong to the same tumour component.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def border_weight_map(
    mask: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: tuple[float, float] | None = None,
) -> np.ndarray:
    """U-Net (Ronneberger et al., 2015) pixel weights for one mask.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    - `mask`: (H, W) uint8 0/1, bool, or 0/255; any value > 0 is tumour.
    - w_c balances the class frequencies of this mask: w_c = 0.5 / freq(class of x), so each
      class carries half of the total weight and the mean of w_c over the image is exactly 1.
      `class_weights=(w_background, w_tumour)` replaces it with fixed weights (e.g. from
      dataset-wide frequencies, which avoids very large tumour weights on slices with a
      tiny tumour).
    - d1, d2: Euclidean distances (pixels) to the nearest and second-nearest tumour
      component (8-connected components from `scipy.ndimage.label`; one
      `distance_transform_edt` per component). The border term is added only on background
      pixels and only when the mask has at least two components, as in the paper, so it
      peaks in narrow gaps between separate tumour parts.
    - An empty mask (and a mask that is tumour everywhere) gets all ones.

    Returns float32 (H, W).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"border_weight_map expects a 2-D (H, W) mask, got shape {mask.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    tumour = mask > 0
    n_tumour = int(tumour.sum())
    if n_tumour == 0 or n_tumour == tumour.size:
        return np.ones(mask.shape, dtype=np.float32)

    if class_weights is None:
        freq_tumour = n_tumour / tumour.size
        w_background, w_tumour = 0.5 / (1.0 - freq_tumour), 0.5 / freq_tumour
    else:
        w_background, w_tumour = (float(w) for w in class_weights)
    weights = np.where(tumour, w_tumour, w_background)

    labels, n_components = ndimage.label(tumour, structure=_CONNECTIVITY)
    if n_components >= 2:
        # distance of every pixel to each component: EDT of "not this component"
        distances = np.stack([ndimage.distance_transform_edt(labels != k)
                              for k in range(1, n_components + 1)])
        nearest_two = np.partition(distances, 1, axis=0)[:2]
        d_sum = nearest_two[0] + nearest_two[1]
        border = w0 * np.exp(-(d_sum**2) / (2.0 * sigma**2))
        weights = weights + np.where(tumour, 0.0, border)
    return weights.astype(np.float32)
