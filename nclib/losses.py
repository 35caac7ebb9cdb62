"""The paper's training losses: partial cross entropy (Eq. 5), normalized cut (Eq. 6), NEL, K-means, dense-CRF.

Every loss takes network outputs (B, K, H, W) and returns a scalar tensor that is finite on every input a training
loop produces (absent classes, images without scribbles, constant images). Kernel losses apply the dense Gaussian
affinity over RGBXY (RGB in 0..255 divided by ``sigma_rgb``, pixel coordinates by ``sigma_xy``) through one
permutohedral lattice per call (:mod:`nclib.lattice`), so they cost linear time.

Half-precision inputs (e.g. under ``torch.autocast``) are computed in float32 and the loss is float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _ext
from ._checks import (
    check_finite,
    check_images,
    check_labels,
    check_positive,
    check_probs,
    check_rank,
    check_roi,
    check_scale,
    check_tensor,
)
from .energies import kmeans_energy, normalized_cut_lattice, potts_energy, restrict_to_labels
from .lattice import Permutohedral, rgbxy_features

__all__ = [
    "partial_cross_entropy",
    "normalized_cut_loss",
    "nel_loss",
    "kmeans_loss",
    "densecrf_loss",
    "PartialCrossEntropy",
    "NormalizedCutLoss",
    "NELLoss",
    "KMeansLoss",
    "DenseCRFLoss",
]

_LABELS = ("all", "present")
_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------- shared pieces
def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_kernel_args(sigma_rgb: float, sigma_xy: float, scale: float) -> None:
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    check_scale(scale)


def _label_counts(labels: torch.Tensor, k: int, ignore_index: int) -> torch.Tensor:
    """(B, K) number of pixels of each label in a validated (B, H, W) label map."""
    valid = (labels != ignore_index).flatten(1)
    idx = torch.where(valid, labels.flatten(1), torch.zeros_like(labels.flatten(1)))
    return torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device).scatter_add_(1, idx, valid.long())


def _clamp_scribbles(s: torch.Tensor, scribbles: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Replace S at scribbled pixels by their one-hot label (Sec 4.2): no gradient flows there."""
    labelled = scribbles != ignore_index
    onehot = F.one_hot(scribbles.clamp(0, s.shape[1] - 1), s.shape[1]).permute(0, 3, 1, 2).to(s.dtype)
    return torch.where(labelled[:, None], onehot, s)


class _Bilinear(torch.autograd.Function):
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for contiguous float32 CPU x, whose backward
    is the CPU build's adjoint kernel (torch's zero-fills and scatters serially: ~3x slower at 21 x 321^2)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size) -> torch.Tensor:
        ctx.in_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    @once_differentiable  # the kernel builds no graph: a double backward raises instead of going silently wrong
    def backward(ctx, grad: torch.Tensor):
        return torch.ops.nclib_resize.bilinear_adjoint(grad.contiguous(), *ctx.in_size), None


def _bilinear(x: torch.Tensor, size) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.requires_grad \
            and torch.is_grad_enabled() and _ext.available("cpu"):  # the build registers torch.ops.nclib_resize
        return _Bilinear.apply(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _resize(
    s: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The authors' speed trick: bilinear for probabilities and images, nearest for the roi."""
    if scale == 1.0:
        return s, images, roi
    h, w = s.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    s = _bilinear(s, size)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    if roi is not None:
        roi = F.interpolate(roi[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return s, images, roi


def _lattice(images: torch.Tensor, sigma_rgb: float, sigma_xy: float, roi: Optional[torch.Tensor]) -> Permutohedral:
    return Permutohedral(rgbxy_features(images, sigma_rgb, sigma_xy), roi=roi)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


# ------------------------------------------------------------------------------------------------- losses
def partial_cross_entropy(logits: torch.Tensor, scribbles: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Partial cross entropy (Eq. 5): mean of ``-log softmax(logits)[y_p]`` over the labelled pixels of the batch.

    Args:
        logits: (B, K, H, W) raw network scores.
        scribbles: (B, H, W) integer labels in 0..K-1, ``ignore_index`` where unlabelled.
    Returns 0 (with a zero gradient, not NaN) when the batch has no labelled pixel.
    """
    check_rank("logits", logits, 4, "(B, K, H, W)")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    check_finite("logits", logits)
    target = check_labels("scribbles", scribbles, logits, logits.shape[1], ignore_index, "logits")
    with _no_autocast(logits.device):
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        count = (target != ignore_index).sum()
        return total / count.clamp_min(1).to(total.dtype)


def normalized_cut_loss(
    probs: torch.Tensor,
    images: torch.Tensor,
    scribbles: Optional[torch.Tensor] = None,
    *,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 1.0,
    roi: Optional[torch.Tensor] = None,
    from_logits: bool = False,
    ignore_index: int = 255,
    labels: str = "all",
    reduction: str = "mean",
) -> torch.Tensor:
    """Relaxed normalized cut loss (Eq. 6): ``sum_k S_k' W (1 - S_k) / d' S_k`` per image, mean over the batch.

    ``W`` is the dense Gaussian over RGBXY applied by one permutohedral lattice per call; ``d = W 1`` comes from
    the same lattice (``L.norm()``) so its uncalibrated scale cancels in the ratio. The value lies in [0, K].
    The formula is :func:`nclib.energies.normalized_cut` (computed by its fused lattice form
    :func:`nclib.energies.normalized_cut_lattice`); this adds validation, clamping, roi, scale, reduction.

    Args:
        probs: (B, K, H, W) softmax output (or logits with ``from_logits=True``).
        images: (B, 3, H, W) RGB in 0..255.
        scribbles: optional (B, H, W) labels; scribbled pixels are clamped to their one-hot label (Sec 4.2) and
            receive no gradient; ``ignore_index`` marks unlabelled pixels.
        sigma_rgb: colour bandwidth (0..255 units); sigma_xy: spatial bandwidth in pixels (of the full image).
        scale: in (0, 1]; < 1 evaluates the loss on images / probabilities (bilinear) and roi (nearest) resized by
            that factor with ``sigma_xy * scale`` (the authors' speed trick). Scribbles are clamped before resizing,
            so scribbled pixels get no gradient at any scale.
        roi: optional (B, H, W) bool; False pixels (crop padding) are left out of the affinity entirely.
        labels: "all" (the paper's Eq. 6, over all K labels) or "present": beyond the paper, the NC of each image
            over the labels present in its scribbles only, with S renormalised over them (``p_P / sum p_P``, the
            softmax of the present labels' logits with ``from_logits``); images with fewer than 2 present labels
            give 0. Why: the ratio does not depend on the scale of ``S_k``, so an absent label with a faint,
            diffuse softmax residue contributes ~1 however small its mass; with K labels and a few present, those
            terms dominate the loss and its gradient pushes absent labels onto colour clusters. Labels absent
            from the scribbles are left to pCE / NEL. Needs ``scribbles``.
        reduction: "mean" over the batch (images giving 0 included), "sum", or "none" for the (B,) values.
    Gradient: Eq. 8 for the lattice operator ``L`` (with ``(L + L')S`` in place of ``2 W S``), what autograd
    through the filter gives, in closed form.
    """
    check_tensor("probs", probs, "(B, K, H, W)")
    check_tensor("images", images, "(B, 3, H, W)")
    _check_kernel_args(sigma_rgb, sigma_xy, scale)
    _check_choice("labels", labels, _LABELS)
    _check_choice("reduction", reduction, _REDUCTIONS)
    if labels == "present" and scribbles is None:
        raise ValueError("labels='present' needs scribbles (the present labels are those in each image's scribbles)")
    with _no_autocast(probs.device):
        s = check_probs(probs, from_logits)
        img = check_images(images, probs)
        roi_b = check_roi(roi, probs)
        present = None
        if scribbles is not None:
            lab = check_labels("scribbles", scribbles, probs, probs.shape[1], ignore_index)
            if labels == "present":
                present = _label_counts(lab, s.shape[1], ignore_index) > 0
                s = restrict_to_labels(probs.float() if from_logits else s, present, from_logits)
            s = _clamp_scribbles(s, lab, ignore_index)
        s, img, roi_b = _resize(s, img, roi_b, scale)
        lattice = _lattice(img, sigma_rgb, sigma_xy * scale, roi_b)
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
        return _reduce(normalized_cut_lattice(s, lattice, present), reduction)


def nel_loss(probs: torch.Tensor, scribbles: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Non-existing-label penalty (Sec 5.2.1): probability mass ``<S_k, 1>`` on labels absent from the scribbles.

    Per image the mass is averaged over pixels (so it lies in [0, 1]: the fraction of the image given to labels
    that the scribbles do not contain), then averaged over the batch. An image without any scribble carries no
    label information and contributes 0. 0 whenever every label is present.

    Args:
        probs: (B, K, H, W) softmax output; scribbles: (B, H, W) labels, ``ignore_index`` where unlabelled.
    """
    check_tensor("probs", probs, "(B, K, H, W)")
    with _no_autocast(probs.device):
        s = check_probs(probs)
        lab = check_labels("scribbles", scribbles, probs, probs.shape[1], ignore_index)
        counts = _label_counts(lab, s.shape[1], ignore_index)
        absent = (counts == 0) & (counts.sum(1, keepdim=True) > 0)  # (B, K)
        mass = s.mean(dim=(2, 3))  # (B, K)
        return (mass * absent.to(mass.dtype)).sum(1).mean()


def kmeans_loss(probs: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft K-means clustering loss on RGB only (Sec 5.1): :func:`nclib.energies.kmeans_energy`, batch mean.

    ``sum_k sum_p S_pk |I_p - mu_k|^2`` with ``mu_k = sum_p S_pk I_p / sum_p S_pk``, divided by the number of
    pixels (mean squared RGB distance per pixel, 0..255 units), then averaged over the batch. This per-pixel
    normalization makes values comparable across image sizes and is the scale of the paper's Fig 5 energies
    (3406 / 1234 / 1020 for network before / after training / K-means algorithm: an RMS colour distance of about
    58 / 35 / 32 per pixel). Empty clusters contribute 0.

    Args:
        probs: (B, K, H, W) softmax output; images: (B, 3, H, W) RGB in 0..255.
        roi: optional (B, H, W) bool; pixels outside (crop padding) are left out, the mean is over roi pixels.
    """
    check_tensor("probs", probs, "(B, K, H, W)")
    with _no_autocast(probs.device):
        s = check_probs(probs)
        img = check_images(images, probs)
        return kmeans_energy(s, img, check_roi(roi, probs)).mean()


def densecrf_loss(
    probs: torch.Tensor,
    images: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 1.0,
    roi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Relaxed dense-CRF (Potts) term ``sum_k S_k' W (1 - S_k)`` per pixel (the follow-up ECCV 2018 loss; beyond
    the paper), mean over the batch: :func:`nclib.energies.potts_energy` divided by the number of (roi) pixels.

    ``W`` is the *unnormalized* lattice Gaussian, whose scale is about 0.55 of the exact Gaussian sum (see
    :mod:`nclib.lattice`), so values are about 0.55x those of an exact kernel.
    Relation to rloss's ``-sum_k S_k' W S_k / N``: ours adds ``sum(d) / N``, a constant under the softmax
    constraint, so the gradient with respect to the logits is the same and the value stays >= 0.
    """
    check_tensor("probs", probs, "(B, K, H, W)")
    check_tensor("images", images, "(B, 3, H, W)")
    _check_kernel_args(sigma_rgb, sigma_xy, scale)
    with _no_autocast(probs.device):
        s = check_probs(probs)
        img = check_images(images, probs)
        roi_b = check_roi(roi, probs)
        s, img, roi_b = _resize(s, img, roi_b, scale)
        lattice = _lattice(img, sigma_rgb, sigma_xy * scale, roi_b)
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
            npix = roi_b.sum(dim=(1, 2)).clamp_min(1).to(s.dtype)
        else:
            npix = torch.full((s.shape[0],), float(s.shape[-1] * s.shape[-2]), device=s.device)
        return (potts_energy(s, lattice.filter, lattice.norm()) / npix).mean()


# ------------------------------------------------------------------------------------------ nn.Module wrappers
class PartialCrossEntropy(nn.Module):
    """:func:`partial_cross_entropy` as a module: ``forward(logits, scribbles)``."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, scribbles: torch.Tensor) -> torch.Tensor:
        return partial_cross_entropy(logits, scribbles, self.ignore_index)


class NormalizedCutLoss(nn.Module):
    """:func:`normalized_cut_loss` as a module: ``forward(probs, images, scribbles=None, roi=None)``; the options
    are those of the function, fixed at construction."""

    def __init__(
        self,
        *,
        sigma_rgb: float = 15.0,
        sigma_xy: float = 100.0,
        scale: float = 1.0,
        from_logits: bool = False,
        ignore_index: int = 255,
        labels: str = "all",
        reduction: str = "mean",
    ):
        super().__init__()
        _check_kernel_args(sigma_rgb, sigma_xy, scale)
        _check_choice("labels", labels, _LABELS)
        _check_choice("reduction", reduction, _REDUCTIONS)
        self.options = dict(sigma_rgb=sigma_rgb, sigma_xy=sigma_xy, scale=scale, from_logits=from_logits,
                            ignore_index=ignore_index, labels=labels, reduction=reduction)

    def forward(
        self,
        probs: torch.Tensor,
        images: torch.Tensor,
        scribbles: Optional[torch.Tensor] = None,
        roi: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return normalized_cut_loss(probs, images, scribbles, roi=roi, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class NELLoss(nn.Module):
    """:func:`nel_loss` as a module: ``forward(probs, scribbles)``."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, probs: torch.Tensor, scribbles: torch.Tensor) -> torch.Tensor:
        return nel_loss(probs, scribbles, self.ignore_index)


class KMeansLoss(nn.Module):
    """:func:`kmeans_loss` as a module: ``forward(probs, images, roi=None)``."""

    def forward(self, probs: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kmeans_loss(probs, images, roi)


class DenseCRFLoss(nn.Module):
    """:func:`densecrf_loss` as a module: ``forward(probs, images, roi=None)``."""

    def __init__(self, sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 1.0):
        super().__init__()
        _check_kernel_args(sigma_rgb, sigma_xy, scale)
        self.sigma_rgb, self.sigma_xy, self.scale = sigma_rgb, sigma_xy, scale

    def forward(self, probs: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
        return densecrf_loss(probs, images, self.sigma_rgb, self.sigma_xy, self.scale, roi)
