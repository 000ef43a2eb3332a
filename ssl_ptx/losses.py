"""Losses for binary segmentation logits: Lovasz hinge (plain and symmetric), BCE, weighted
BCE, soft Dice, focal, a BCE for the image-level presence head, weighted sums (with the 1st,
4th and 5th places' mixes), and a by-name builder.

Conventions shared by every loss here:

* ``logits``: float ``[B, H, W]`` or ``[B, 1, H, W]`` (pre-sigmoid). Half-precision logits
  (AMP) are upcast to float32; float64 stays float64.
* ``targets``: the same pixels, ``[B, H, W]`` or ``[B, 1, H, W]``, values 0/1 (any dtype).
* The result is a scalar tensor (a mean), differentiable with respect to ``logits``.
* The loss modules (``nn.Module``) also accept a model's ``(mask_logits, presence_logits)``
  tuple (``UNetCBAM(presence_head=True)``): mask losses use the first element and
  :class:`PresenceBCELoss` the second, so ``loss(model(x), masks)`` works either way.

Lovasz hinge (Berman, Rannen Triki & Blaschko, 2018), per image: with signs s = 2y − 1 and
hinge errors e = 1 − z·s sorted in decreasing order, the loss is Σ_k relu(e_(k))·g_k, where
g is the gradient of the Lovasz extension of the Jaccard loss at the sorted labels. Here it is
computed for the whole batch at once: only pixels with e > 0 are sorted (relu(e) = 0 adds
nothing), by one radix sort of integer keys (image, descending error), and g comes in closed
form from the counts of positives and negatives ranked above each pixel. The symmetric form
½·[hinge(z, y) + hinge(−z, 1 − y)] of the 3rd place shares that sort: the second term's errors
1 − (−z)(2(1 − y) − 1) = 1 − z(2y − 1) are the same errors, only the Jaccard weights differ.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_TARGET",
    "LOSSES",
    "BinaryCrossEntropyLoss",
    "ComboLoss",
    "FocalLoss",
    "LovaszHingeLoss",
    "PresenceBCELoss",
    "SoftBCELoss",
    "SoftDiceLoss",
    "SymmetricLovaszLoss",
    "WeightedBCELoss",
    "bce",
    "build_loss",
    "focal",
    "lovasz_hinge",
    "presence_bce",
    "presence_targets",
    "soft_bce",
    "soft_dice_loss",
    "symmetric_lovasz",
    "weighted_bce",
]

Outputs = torch.Tensor | Sequence[torch.Tensor]
#: mask value of a pixel the loss leaves out (a pseudo label's confidence band); losses that
#: can leave pixels out have ``supports_ignore = True`` and take ``valid=``
IGNORE_TARGET = 255.0


def _flatten_pairs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, N]`` logits (float32 or float64) and targets of the same dtype."""
    if logits.ndim not in (3, 4) or (logits.ndim == 4 and logits.shape[1] != 1):
        raise ValueError(f"logits must be [B, H, W] or [B, 1, H, W], got {tuple(logits.shape)}")
    if targets.ndim == 4 and targets.shape[1] == 1:
        targets = targets[:, 0]
    image_shape = logits.shape[-2:]
    if tuple(targets.shape) != (logits.shape[0], *image_shape):
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}"
        )
    if logits.dtype != torch.float64:
        logits = logits.float()
    return logits.reshape(len(logits), -1), targets.reshape(len(targets), -1).to(logits.dtype)


# ------------------------------------------------------------------------------ Lovasz hinge


def _sort_keys(errors: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-negative int64 keys that sort ascending as ``errors`` (> 0 or NaN) sort descending.

    For positive IEEE floats the bit pattern, read as an integer, orders like the value; NaN
    (sign bit cleared) comes out larger than +inf, so it ranks first and poisons the loss.
    Returns the keys and their bit width (31 for float32, 63 for float64).
    """
    if errors.dtype == torch.float32:
        bits, width = errors.view(torch.int32).to(torch.int64), 31
    else:
        bits, width = errors.view(torch.int64), 63
    top = (1 << width) - 1
    return top - (bits & top), width


def _errors_from_keys(keys: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_sort_keys` (the low ``width`` bits of ``keys``)."""
    top = (1 << width) - 1
    bits = top - (keys & top)
    return bits.to(torch.int32).view(dtype) if width == 31 else bits.view(dtype)


def _sort_within_rows(
    errors: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort ``errors`` (> 0 or NaN) decreasingly within each row, keeping ``rows``
    (non-decreasing) grouped in place. Returns sorted errors and labels, and the permutation.

    Only stable integer sorts, which PyTorch runs as radix sorts: when the bits fit (float32),
    one sort of (row, error key, label) packed into an int64, from which the sorted errors and
    labels are read back without gathering; otherwise (float64) two, by error then by row.
    """
    keys, width = _sort_keys(errors)
    if (n_rows - 1).bit_length() + width + 1 <= 63:
        packed = (rows << (width + 1)) | (keys << 1) | labels
        packed, order = torch.sort(packed, stable=True)
        return _errors_from_keys(packed >> 1, width, errors.dtype), (packed & 1).bool(), order
    order = torch.sort(keys, stable=True).indices
    if n_rows > 1:
        order = order.index_select(0, torch.sort(rows.index_select(0, order), stable=True).indices)
    return errors.index_select(0, order), labels.index_select(0, order), order


def _lovasz_weights(
    labels: torch.Tensor,
    rows: torch.Tensor,
    n_positive: torch.Tensor,
    n_pixels: int,
    symmetric: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Lovasz-extension gradient g_k at every selected pixel.

    ``labels`` (bool) are in sorted order, ``rows`` the image of each: the selected pixels of
    image 0 by decreasing error, then those of image 1 …; image i has ``n_positive[i]``
    positives among its ``n_pixels``. With p_k, n_k the positives and negatives ranked at or
    above pixel k (0-based rank k in its image), G the image's positives and
    J_k = (p_k + n_k)/(G + n_k) the Jaccard loss of its top k + 1 pixels, g_k = J_k − J_{k−1}
    (J_{−1} = 0) is

        1/(G + n_k)                          for a positive pixel, or for k = 0;
        (G − p_k)/((G + n_k)(G + n_k − 1))   for a negative pixel with k ≥ 1,

    exact and free of the cancellation of differencing J. The term on (−z, 1 − y) swaps the
    roles: G' = N − G positives, p'_k = n_k, n'_k = p_k. Symmetric: the mean of the two.
    """
    counts = torch.bincount(rows, minlength=len(n_positive))
    starts = torch.cumsum(counts, 0) - counts
    first = torch.zeros_like(labels)
    first[starts[counts > 0]] = True
    # batch-wide running counts; p_k and n_k subtract those of the earlier images
    cum_positive = torch.cumsum(labels, 0)
    cum_negative = torch.arange(1, len(labels) + 1, device=labels.device) - cum_positive
    positive_before = torch.cat([cum_positive.new_zeros(1), cum_positive])[starts]
    negative_before = starts - positive_before
    p, n = cum_positive.to(dtype), cum_negative.to(dtype)

    def per_pixel(per_image: torch.Tensor) -> torch.Tensor:
        return per_image.to(dtype).index_select(0, rows)

    total = n_positive  # G + n_k, then G − p_k:
    weights = _jaccard_step(
        labels | first,
        n + per_pixel(total - negative_before),
        per_pixel(total + positive_before) - p,
    )
    if symmetric:
        total = n_pixels - n_positive  # G' + p_k, then G' − n_k:
        flipped = _jaccard_step(
            ~labels | first,
            p + per_pixel(total - positive_before),
            per_pixel(total + negative_before) - n,
        )
        weights = (weights + flipped) * 0.5
    return weights


def _jaccard_step(
    simple: torch.Tensor, denominator: torch.Tensor, numerator: torch.Tensor
) -> torch.Tensor:
    """1/d where ``simple``, else numerator/(d·(d − 1)); d ≥ 1 (and d ≥ 2 where used)."""
    step = numerator / (denominator * (denominator - 1).clamp_min(1))
    return torch.where(simple, denominator.reciprocal(), step)


class _LovaszHinge(torch.autograd.Function):
    """Mean over rows of the Lovasz hinge of ``z [R, N]`` against bool ``labels [R, N]``.

    The gradient — the Lovasz weight times −(2y − 1) at each pixel with a positive error, zero
    elsewhere — is written directly by ``backward``: no autograd through sorting or indexing.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, labels: torch.Tensor, symmetric: bool) -> torch.Tensor:
        n_rows, n_pixels = z.shape
        errors = torch.where(labels, -z, z).add_(1).view(-1)  # 1 − z·(2y − 1)
        selected = (~(errors <= 0)).nonzero().squeeze(1)  # NaN is kept: it reaches the loss
        rows = torch.div(selected, n_pixels, rounding_mode="floor")
        sorted_errors, sorted_labels, order = _sort_within_rows(
            errors.index_select(0, selected),
            labels.view(-1).index_select(0, selected),
            rows,
            n_rows,
        )
        weights = _lovasz_weights(sorted_labels, rows, labels.sum(1), n_pixels, symmetric, z.dtype)
        ctx.save_for_backward(selected, order, torch.where(sorted_labels, -weights, weights))
        ctx.shape = z.shape
        return (sorted_errors * weights).sum() / n_rows

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        selected, order, signed_weights = ctx.saved_tensors
        n_rows, n_pixels = ctx.shape
        scaled = signed_weights * (grad_output / n_rows)
        unsorted = torch.empty_like(scaled).index_copy_(0, order, scaled)
        grad = scaled.new_zeros(n_rows * n_pixels).index_copy_(0, selected, unsorted)
        return grad.view(n_rows, n_pixels), None, None


def _lovasz(
    logits: torch.Tensor,
    targets: torch.Tensor,
    per_image: bool,
    symmetric: bool,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    z, y = _flatten_pairs(logits, targets)
    labels = y > 0.5
    keep = None if valid is None else valid.reshape(z.shape).bool()
    if not per_image:
        z, labels = z.reshape(1, -1), labels.reshape(1, -1)
        keep = None if keep is None else keep.reshape(1, -1)
    if keep is None:
        return _LovaszHinge.apply(z.contiguous(), labels.contiguous(), symmetric)
    # a left-out pixel becomes a background pixel with a negative hinge error (logit −2): it
    # drops out of the sort and of every Jaccard count, i.e. the loss of the kept pixels alone;
    # the two halves of the symmetric loss need opposite stand-ins, so they are taken apart
    outside = z.new_tensor(-2.0)
    direct = _LovaszHinge.apply(
        torch.where(keep, z, outside).contiguous(), (labels & keep).contiguous(), False
    )
    if not symmetric:
        return direct
    flipped = _LovaszHinge.apply(
        torch.where(keep, -z, outside).contiguous(), (~labels & keep).contiguous(), False
    )
    return 0.5 * (direct + flipped)


def lovasz_hinge(
    logits: torch.Tensor,
    targets: torch.Tensor,
    per_image: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary Lovasz hinge (ReLU hinge), equal in value and gradient to Berman's reference.

    Args:
        logits: ``[B, H, W]`` or ``[B, 1, H, W]``.
        targets: 0/1 masks of the same pixels (thresholded at 0.5).
        per_image: mean over images of each image's loss (True), or one loss over the batch
            treated as a single image (False).
        valid: bool mask of the pixels to score (same shape as ``targets``), or None for all:
            the loss is then that of the kept pixels alone (a pseudo label's confidence band).

    Returns:
        Scalar tensor. **Empty mask** (y ≡ 0): the image's loss is relu(1 + max z), so only the
        highest logit gets a gradient. **Full mask**: mean(relu(1 − z)). NaN logits give NaN.
    """
    return _lovasz(logits, targets, per_image, symmetric=False, valid=valid)


def symmetric_lovasz(
    logits: torch.Tensor,
    targets: torch.Tensor,
    per_image: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """½·[lovasz_hinge(z, y) + lovasz_hinge(−z, 1 − y)], the 3rd place's loss, one sort.

    Same arguments as :func:`lovasz_hinge`. **Empty mask**: ½·[relu(1 + max z) +
    mean(relu(1 + z))] — the second term is an ordinary hinge over every pixel that pushes
    all logits below −1, which is what makes the Lovasz loss usable on negative images.
    """
    return _lovasz(logits, targets, per_image, symmetric=True, valid=valid)


# ------------------------------------------------------------------- pixel and image losses


def bce(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over all pixels of the batch (over the pixels
    where ``valid`` is true when it is given).

    Empty masks: a plain per-pixel term, log(1 + e^z) per pixel.
    """
    z, y = _flatten_pairs(logits, targets)
    if valid is None:
        return F.binary_cross_entropy_with_logits(z, y)
    keep = valid.reshape(z.shape).to(z.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    return (per_pixel * keep).sum() / keep.sum().clamp_min(1)


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, pos_frac: float = 0.1, neg_frac: float = 4.9
) -> torch.Tensor:
    """BCE with separate weights for foreground and background pixels (the 8th place's form).

    With ℓ the per-pixel BCE and sums over every pixel of the batch:
    pos_frac·Σ_{y=1} ℓ / N_pos + neg_frac·Σ_{y=0} ℓ / N_neg, where N_pos and N_neg count the
    batch's foreground and background pixels (targets thresholded at 0.5). Each class is
    averaged on its own, so the weights — not the pixel counts — set the balance (8th place:
    0.1 and 4.9, or 0.1 and 7.9).

    Empty masks (N_pos = 0): the foreground term is 0 and the loss is neg_frac · mean ℓ; an
    all-ones batch likewise gives pos_frac · mean ℓ.
    """
    if pos_frac < 0 or neg_frac < 0:
        raise ValueError(f"pos_frac and neg_frac must be >= 0, got {pos_frac} and {neg_frac}")
    z, y = _flatten_pairs(logits, targets)
    cross_entropy = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    positive = y > 0.5
    n_positive = positive.sum()
    n_negative = positive.numel() - n_positive
    positive_sum = torch.where(positive, cross_entropy, 0).sum()
    negative_sum = torch.where(positive, 0, cross_entropy).sum()
    return pos_frac * positive_sum / n_positive.clamp_min(1) + neg_frac * negative_sum / (
        n_negative.clamp_min(1)
    )


def soft_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE against soft targets q in [0, 1] (probability maps: the 10th place's soft pseudo
    labels) minus the targets' own entropy, mean over all pixels of the batch.

    Per pixel, with p = sigmoid(z): −q·log p − (1 − q)·log(1 − p) − H(q) = KL(q ‖ p), where
    H(q) = −q·log q − (1 − q)·log(1 − q) (0·log 0 = 0). The gradient is BCE's, p − q; the
    value is 0 when p = q, so a batch of soft targets reads like a batch of hard ones. For 0/1
    targets it equals :func:`bce`; empty masks give log(1 + e^z) per pixel.

    Raises:
        ValueError: a target outside [0, 1].
    """
    z, q = _flatten_pairs(logits, targets)
    if bool((q < 0).any()) or bool((q > 1).any()):
        raise ValueError("soft_bce targets must be probabilities in [0, 1]")
    cross_entropy = F.binary_cross_entropy_with_logits(z, q, reduction="none")
    entropy = -(torch.special.xlogy(q, q) + torch.special.xlogy(1 - q, 1 - q))
    return (cross_entropy - entropy).mean()


def soft_dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    per_image: bool = True,
    smooth: float = 1.0,
    positives_only: bool = False,
) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits), with additive smoothing, mean over images.

    Per image, with p = sigmoid(z): 1 − (2·Σ p·y + smooth)/(Σ p + Σ y + smooth).

    Args:
        per_image: Dice per image then mean (True), or one Dice over the batch (False).
        smooth: added to numerator and denominator (> 0).
        positives_only: average only over images whose mask is non-empty (0 if there is
            none), leaving negatives to other terms, as suggested for SIIM.

    Empty masks: the loss is S/(S + smooth) with S = Σ p — 0 for an all-background
    prediction, bounded by 1, and its gradient smooth/(S + smooth)² per pixel keeps pushing
    every probability down (no NaN, no division by zero).
    """
    if smooth <= 0:
        raise ValueError(f"smooth must be > 0, got {smooth}")
    z, y = _flatten_pairs(logits, targets)
    if not per_image:
        z, y = z.reshape(1, -1), y.reshape(1, -1)
    p = torch.sigmoid(z)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    losses = 1 - dice
    if not positives_only:
        return losses.mean()
    positive = (y.sum(1) > 0).to(losses.dtype)
    return (losses * positive).sum() / positive.sum().clamp_min(1)


def focal(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Binary focal loss (Lin et al.), mean over all pixels.

    Per pixel: α_t·(1 − p_t)^γ·BCE, with p_t the probability given to the true class and
    α_t = α for foreground, 1 − α for background (no weighting when ``alpha`` is None).
    Empty masks: a plain per-pixel term, as for :func:`bce`.
    """
    z, y = _flatten_pairs(logits, targets)
    cross_entropy = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    p_true = torch.exp(-cross_entropy)
    loss = (1 - p_true).pow(gamma) * cross_entropy
    if alpha is not None:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return loss.mean()


def presence_targets(masks: torch.Tensor) -> torch.Tensor:
    """Image-level labels from masks ``[B, H, W]`` or ``[B, 1, H, W]``: float ``[B, 1]``,
    1 where the mask has any foreground pixel (> 0.5)."""
    return (masks.reshape(len(masks), -1) > 0.5).any(1, keepdim=True).float()


def presence_bce(presence_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of the image-level "pneumothorax present" head, mean over images.

    Args:
        presence_logits: ``[B]`` or ``[B, 1]``.
        targets: masks ``[B, H, W]`` / ``[B, 1, H, W]`` (labels derived by
            :func:`presence_targets`) or 0/1 labels with as many elements as the logits.
    """
    logits = presence_logits.reshape(len(presence_logits), -1)
    if logits.shape[1] != 1:
        raise ValueError(
            f"presence logits must be [B] or [B, 1], got {tuple(presence_logits.shape)}"
        )
    labels = presence_targets(targets) if targets.ndim >= 3 else targets.reshape(-1, 1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(labels)} presence targets for {len(logits)} logits")
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# -------------------------------------------------------------------------------- modules


def _mask_logits(outputs: Outputs) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


class LovaszHingeLoss(nn.Module):
    """Module form of :func:`lovasz_hinge`."""

    def __init__(self, per_image: bool = True) -> None:
        super().__init__()
        self.per_image = per_image

    supports_ignore = True

    def forward(
        self, outputs: Outputs, targets: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return lovasz_hinge(_mask_logits(outputs), targets, self.per_image, valid)


class SymmetricLovaszLoss(LovaszHingeLoss):
    """Module form of :func:`symmetric_lovasz` (the 3rd place's loss)."""

    supports_ignore = True

    def forward(
        self, outputs: Outputs, targets: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return symmetric_lovasz(_mask_logits(outputs), targets, self.per_image, valid)


class BinaryCrossEntropyLoss(nn.Module):
    """Module form of :func:`bce`."""

    supports_ignore = True

    def forward(
        self, outputs: Outputs, targets: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return bce(_mask_logits(outputs), targets, valid)


class WeightedBCELoss(nn.Module):
    """Module form of :func:`weighted_bce`."""

    def __init__(self, pos_frac: float = 0.1, neg_frac: float = 4.9) -> None:
        super().__init__()
        self.pos_frac, self.neg_frac = pos_frac, neg_frac

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return weighted_bce(_mask_logits(outputs), targets, self.pos_frac, self.neg_frac)


class SoftBCELoss(nn.Module):
    """Module form of :func:`soft_bce`."""

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return soft_bce(_mask_logits(outputs), targets)


class SoftDiceLoss(nn.Module):
    """Module form of :func:`soft_dice_loss`."""

    def __init__(
        self, per_image: bool = True, smooth: float = 1.0, positives_only: bool = False
    ) -> None:
        super().__init__()
        self.per_image, self.smooth, self.positives_only = per_image, smooth, positives_only

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(
            _mask_logits(outputs), targets, self.per_image, self.smooth, self.positives_only
        )


class FocalLoss(nn.Module):
    """Module form of :func:`focal`."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return focal(_mask_logits(outputs), targets, self.gamma, self.alpha)


class PresenceBCELoss(nn.Module):
    """:func:`presence_bce` on the second element of a ``(mask_logits, presence_logits)``
    model output, with labels derived from the target masks."""

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or len(outputs) < 2:
            raise ValueError(
                "presence_bce needs the model output (mask_logits, presence_logits): "
                "build the model with presence_head=True"
            )
        return presence_bce(outputs[1], targets)


LOSSES: dict[str, type[nn.Module]] = {
    "symmetric_lovasz": SymmetricLovaszLoss,
    "lovasz": LovaszHingeLoss,
    "bce": BinaryCrossEntropyLoss,
    "dice": SoftDiceLoss,
    "focal": FocalLoss,
    "presence_bce": PresenceBCELoss,
    "weighted_bce": WeightedBCELoss,
    "soft_bce": SoftBCELoss,
}
_BATCH_DICE = {"per_image": False}  # the 1st and 4th places' Dice: one Dice over the batch
_COMBOS: dict[str, dict[str, float | dict[str, Any]]] = {
    "bce_dice": {"bce": 1.0, "dice": 1.0},
    # 1st place (sneddy): 3·BCE + 1·batch Dice + 4·focal (γ = 2)
    "bce_dice_focal": {"bce": 3.0, "dice": {"weight": 1.0, **_BATCH_DICE}, "focal": 4.0},
    # 4th place (amirassov): 0.9·(3·BCE + batch Dice) + 0.1·presence BCE
    "bce_dice_cls": {"bce": 2.7, "dice": {"weight": 0.9, **_BATCH_DICE}, "presence_bce": 0.1},
    # 5th place (earhian): 1024·BCE (mean over pixels) + presence BCE
    "bce_cls": {"bce": 1024.0, "presence_bce": 1.0},
}


def _build_term(name: str, spec: float | Mapping[str, Any]) -> tuple[nn.Module, float]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    options = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
    weight = options.pop("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (math.isfinite(weight) and weight >= 0)
    ):
        raise ValueError(f"loss {name!r}: weight must be a finite number >= 0, got {weight!r}")
    allowed = set(inspect.signature(LOSSES[name]).parameters)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"loss {name!r}: unknown option(s) {unknown}; allowed: {['weight', *sorted(allowed)]}"
        )
    return LOSSES[name](**options), float(weight)


class ComboLoss(nn.Module):
    """Weighted sum of named losses: ``ComboLoss({"bce": 3, "dice": 1, "focal": 4})``.

    Args:
        terms: loss name → weight, or → ``{"weight": w, **options}`` for a term with options
            (``{"dice": {"weight": 1, "positives_only": True}}``). Names: keys of ``LOSSES``.
    """

    def __init__(self, terms: Mapping[str, float | Mapping[str, Any]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("ComboLoss needs at least one term")
        built = {name: _build_term(name, spec) for name, spec in terms.items()}
        self.terms = nn.ModuleDict({name: module for name, (module, _) in built.items()})
        self.weights = {name: weight for name, (_, weight) in built.items()}

    def components(self, outputs: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted value (for logging)."""
        return {name: term(outputs, targets) for name, term in self.terms.items()}

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        values = self.components(outputs, targets)
        return sum(self.weights[name] * value for name, value in values.items())


def build_loss(name_or_config: str | Mapping[str, float | Mapping[str, Any]]) -> nn.Module:
    """A loss module ``loss(outputs, targets) -> scalar`` by name or weighted config.

    Args:
        name_or_config: one of ``"symmetric_lovasz"``, ``"lovasz"``, ``"bce"``, ``"dice"``,
            ``"focal"``, ``"presence_bce"``, ``"weighted_bce"`` (8th place), ``"soft_bce"``
            (soft targets), ``"bce_dice"`` (BCE + Dice, weights 1 and 1), ``"bce_dice_focal"``
            (1st place: 3·BCE + 1·batch Dice + 4·focal), ``"bce_dice_cls"`` (4th place:
            2.7·BCE + 0.9·batch Dice + 0.1·presence BCE), ``"bce_cls"`` (5th place: 1024·BCE +
            presence BCE), or a
            :class:`ComboLoss` mapping such as ``{"symmetric_lovasz": 1, "presence_bce": 0.1}``.

    Raises:
        ValueError: unknown name, option or a bad weight.
    """
    if isinstance(name_or_config, Mapping):
        return ComboLoss(name_or_config)
    if name_or_config in _COMBOS:
        return ComboLoss(_COMBOS[name_or_config])
    if name_or_config not in LOSSES:
        raise ValueError(
            f"unknown loss {name_or_config!r}; known: {sorted([*LOSSES, *_COMBOS])} "
            "or a mapping of them to weights"
        )
    return LOSSES[name_or_config]()
