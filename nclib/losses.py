"""The paper's training losses: partial cross entropy (Eq. 5), normalized cut (Eq. 6), NEL, K-means, dense-CRF.

Every loss takes network outputs (B, K, H, W) and returns a scalar tensor that is finite on every input a training
loop produces (absent classes, images without scribbles, constant images). Kernel losses apply the dense Gaussian
affinity over RGBXY (RGB in 0..255 divided by ``sigma_rgb``, pixel coordinates by ``sigma_xy``) through one
permutohedral lattice per call (:mod:`nclib.lattice`), so they cost linear time.

Half-precision inputs (e.g. under ``torch.autocast``) are computed in float32 and the loss is float32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_finite, check_positive, check_rank, check_same_device, check_same_spatial
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

Filter = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation
def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _check_probs(probs: torch.Tensor, from_logits: bool = False, name: str = "probs") -> torch.Tensor:
    """Validate (B, K, H, W) probabilities (or logits) and return float32 probabilities."""
    check_rank(name, probs, 4, "(B, K, H, W)")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {probs.dtype}")
    low_precision = probs.dtype in (torch.float16, torch.bfloat16)
    p = _float32(probs)
    with torch.no_grad():
        lo, hi = (float(v) for v in torch.aminmax(p.detach()))  # one pass; NaN propagates, inf shows
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(name, probs)  # names NaN or inf
    if from_logits:
        return torch.softmax(p, dim=1)
    tol = 1e-2 if low_precision else 1e-4
    if lo < -tol or hi > 1 + tol:
        raise ValueError(
            f"{name} must be probabilities in [0, 1] (softmax over dim 1), got values in [{lo:.4g}, {hi:.4g}]; "
            "pass from_logits=True to give raw network scores"
        )
    with torch.no_grad():
        err = float((p.detach().sum(1) - 1).abs().max())
    if err > (2e-2 if low_precision else 1e-3):
        raise ValueError(
            f"{name} must sum to 1 over the class dimension (dim 1), max deviation {err:.3g}; "
            "pass from_logits=True to give raw network scores"
        )
    return p


def _check_images(images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    check_rank("images", images, 4, "(B, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(images.shape)}")
    check_same_spatial("images", images, "probs", probs)
    check_same_device("images", images, "probs", probs)
    check_finite("images", images)
    img = _float32(images)
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-3 or hi > 255.001:
        raise ValueError(
            f"images must be RGB in 0..255 (not mean-subtracted), got values in [{lo:.4g}, {hi:.4g}]"
        )
    return img


def _check_scribbles(
    scribbles: torch.Tensor, probs: torch.Tensor, ignore_index: int, name: str = "scribbles"
) -> torch.Tensor:
    check_rank(name, scribbles, 3, "(B, H, W)")
    if scribbles.is_floating_point() or scribbles.dtype == torch.bool or scribbles.is_complex():
        raise ValueError(f"{name} must be an integer (int64) label map, got dtype {scribbles.dtype}")
    b, k, h, w = probs.shape
    if tuple(scribbles.shape) != (b, h, w):
        raise ValueError(f"{name} must have shape (B, H, W) = {(b, h, w)} to match probs, got {tuple(scribbles.shape)}")
    check_same_device(name, scribbles, "probs", probs)
    s = scribbles.long()
    bad = (s != ignore_index) & ((s < 0) | (s >= k))
    if bool(bad.any()):
        vals = torch.unique(s[bad])[:5].tolist()
        raise ValueError(
            f"{name} has labels {vals} outside 0..{k - 1} (K = {k} classes) "
            f"that are not the ignore index {ignore_index}"
        )
    return s


def _check_roi(roi: Optional[torch.Tensor], probs: torch.Tensor) -> Optional[torch.Tensor]:
    if roi is None:
        return None
    check_rank("roi", roi, 3, "(B, H, W)")
    b, _, h, w = probs.shape
    if tuple(roi.shape) != (b, h, w):
        raise ValueError(f"roi must have shape (B, H, W) = {(b, h, w)} to match probs, got {tuple(roi.shape)}")
    check_same_device("roi", roi, "probs", probs)
    return roi.bool()


def _check_scale(scale: float) -> None:
    check_positive("scale", scale)
    if scale > 1:
        raise ValueError(f"scale must be in (0, 1] (a downscaling factor), got {scale!r}")


# ------------------------------------------------------------------------------------------- shared pieces
def _clamp_scribbles(s: torch.Tensor, scribbles: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Replace S at scribbled pixels by their one-hot label (Sec 4.2): no gradient flows there."""
    labelled = scribbles != ignore_index
    if not bool(labelled.any()):
        return s
    onehot = F.one_hot(scribbles.clamp(0, s.shape[1] - 1), s.shape[1]).permute(0, 3, 1, 2).to(s.dtype)
    return torch.where(labelled[:, None], onehot, s)


def _resize(
    s: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The authors' speed trick: bilinear for probabilities and images, nearest for the roi."""
    if scale == 1.0:
        return s, images, roi
    h, w = s.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    if roi is not None:
        roi = F.interpolate(roi[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return s, images, roi


def _lattice(images: torch.Tensor, sigma_rgb: float, sigma_xy: float, roi: Optional[torch.Tensor]) -> Permutohedral:
    return Permutohedral(rgbxy_features(images, sigma_rgb, sigma_xy), roi=roi)


def _cut_and_volume(s: torch.Tensor, filt: Filter, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image and class: ``cut_k = S_k' W (1 - S_k) = d'S_k - S_k' W S_k`` and ``vol_k = d'S_k``, (B, K) each.

    ``filt(v)`` applies ``W`` to (B, C, H, W) values and ``d = W 1`` (B, 1, H, W) comes from the same operator, so
    the identity ``S'W1 = d'S`` holds exactly for that operator.
    """
    ws = filt(s)
    assoc = (s * ws).sum(dim=(2, 3))
    vol = (s * d).sum(dim=(2, 3))
    return vol - assoc, vol


def _nc_from_filter(s: torch.Tensor, filt: Filter, d: torch.Tensor) -> torch.Tensor:
    """Relaxed normalized cut of Eq. 4/6, ``sum_k S_k' W (1 - S_k) / d' S_k``, per image: (B,) in [0, K].

    The one formula behind :func:`normalized_cut_loss`, the NC energies of :mod:`nclib.clustering` and the tests
    (which pass the exact O(N^2) filter). Empty segments (``d'S_k = 0``) contribute 0, the crisp convention
    ``cut(empty)/assoc(empty) = 0``, so nothing is NaN or inf; its autograd gradient is Eq. 8 for ``filt``.
    """
    cut, vol = _cut_and_volume(s, filt, d)
    ratio = torch.where(vol > 0, cut / vol.clamp_min(1e-30), torch.zeros_like(cut))
    return ratio.sum(dim=1)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


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
    target = _check_scribbles(scribbles, logits, ignore_index)
    with _no_autocast(logits.device):
        total = F.cross_entropy(_float32(logits), target, ignore_index=ignore_index, reduction="sum")
        count = (target != ignore_index).sum()
        return total / count.clamp_min(1).to(total.dtype)


def normalized_cut_loss(
    probs: torch.Tensor,
    images: torch.Tensor,
    scribbles: Optional[torch.Tensor] = None,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 1.0,
    roi: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    from_logits: bool = False,
) -> torch.Tensor:
    """Relaxed normalized cut loss (Eq. 6): ``sum_k S_k' W (1 - S_k) / d' S_k`` per image, mean over the batch.

    ``W`` is the dense Gaussian over RGBXY applied by one permutohedral lattice per call; ``d = W 1`` comes from
    the same lattice (``L.norm()``) so its uncalibrated scale cancels in the ratio. The value lies in [0, K].

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
    Gradient: autograd through the lattice filter, i.e. Eq. 8 for the lattice operator ``L`` (with ``(L + L')S``
    in place of ``2 W S``; ``L`` is symmetric to ~1e-4).
    """
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    _check_scale(scale)
    with _no_autocast(probs.device):
        s = _check_probs(probs, from_logits)
        img = _check_images(images, probs)
        roi_b = _check_roi(roi, probs)
        if scribbles is not None:
            s = _clamp_scribbles(s, _check_scribbles(scribbles, probs, ignore_index), ignore_index)
        s, img, roi_b = _resize(s, img, roi_b, scale)
        lattice = _lattice(img, sigma_rgb, sigma_xy * scale, roi_b)
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
        return _nc_from_filter(s, lattice.filter, lattice.norm()).mean()


def nel_loss(probs: torch.Tensor, scribbles: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Non-existing-label penalty (Sec 5.2.1): probability mass ``<S_k, 1>`` on labels absent from the scribbles.

    Per image the mass is averaged over pixels (so it lies in [0, 1]: the fraction of the image given to labels
    that the scribbles do not contain), then averaged over the batch. An image without any scribble carries no
    label information and contributes 0. 0 whenever every label is present.

    Args:
        probs: (B, K, H, W) softmax output; scribbles: (B, H, W) labels, ``ignore_index`` where unlabelled.
    """
    with _no_autocast(probs.device):
        s = _check_probs(probs)
        lab = _check_scribbles(scribbles, probs, ignore_index)
        k = s.shape[1]
        valid = lab != ignore_index
        counts = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), k).mul_(valid[..., None]).sum(dim=(1, 2))
        absent = (counts == 0) & (counts.sum(1, keepdim=True) > 0)  # (B, K)
        mass = s.mean(dim=(2, 3))  # (B, K)
        return (mass * absent.to(mass.dtype)).sum(1).mean()


def kmeans_loss(probs: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft K-means clustering loss on RGB only (Sec 5.1).

    ``sum_k sum_p S_pk |I_p - mu_k|^2`` with ``mu_k = sum_p S_pk I_p / sum_p S_pk``, divided by the number of
    pixels (mean squared RGB distance per pixel, 0..255 units), then averaged over the batch. This per-pixel
    normalization makes values comparable across image sizes and is the scale of the paper's Fig 5 energies
    (3406 / 1234 / 1020 for network before / after training / K-means algorithm: an RMS colour distance of about
    58 / 35 / 32 per pixel). Empty clusters contribute 0.

    Args:
        probs: (B, K, H, W) softmax output; images: (B, 3, H, W) RGB in 0..255.
        roi: optional (B, H, W) bool; pixels outside (crop padding) are left out, the mean is over roi pixels.
    """
    with _no_autocast(probs.device):
        s = _check_probs(probs)
        img = _check_images(images, probs)
        roi_b = _check_roi(roi, probs)
        b, k, h, w = s.shape
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
            npix = roi_b.flatten(1).sum(1).clamp_min(1).to(s.dtype)
        else:
            npix = torch.full((b,), float(h * w), device=s.device)
        sf = s.reshape(b, k, 1, h * w)
        x = img.reshape(b, 1, 3, h * w)
        mass = sf.sum(-1)  # (B, K, 1)
        mu = torch.where(mass > 0, (sf * x).sum(-1) / mass.clamp_min(1e-30), torch.zeros_like(mass))  # (B, K, 3)
        energy = (sf * (x - mu[..., None]).square()).sum(dim=(1, 2, 3))
        return (energy / npix).mean()


def densecrf_loss(
    probs: torch.Tensor,
    images: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 1.0,
    roi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Relaxed dense-CRF (Potts) term ``sum_k S_k' W (1 - S_k)`` per pixel (the follow-up ECCV 2018 loss; beyond
    the paper), mean over the batch.

    Normalized by the number of (roi) pixels. ``W`` is the *unnormalized* lattice Gaussian, whose scale is about
    0.55 of the exact Gaussian sum (see :mod:`nclib.lattice`), so values are about 0.55x those of an exact kernel.
    Relation to rloss's ``-sum_k S_k' W S_k / N``: ours adds ``sum(d) / N``, a constant under the softmax
    constraint, so the gradient with respect to the logits is the same and the value stays >= 0.
    """
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    _check_scale(scale)
    with _no_autocast(probs.device):
        s = _check_probs(probs)
        img = _check_images(images, probs)
        roi_b = _check_roi(roi, probs)
        s, img, roi_b = _resize(s, img, roi_b, scale)
        lattice = _lattice(img, sigma_rgb, sigma_xy * scale, roi_b)
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
            npix = roi_b.sum(dim=(1, 2)).clamp_min(1).to(s.dtype)
        else:
            npix = torch.full((s.shape[0],), float(s.shape[-1] * s.shape[-2]), device=s.device)
        cut, _ = _cut_and_volume(s, lattice.filter, lattice.norm())
        return (cut.sum(1) / npix).mean()


# ------------------------------------------------------------------------------------------ nn.Module wrappers
class PartialCrossEntropy(nn.Module):
    """:func:`partial_cross_entropy` as a module: ``forward(logits, scribbles)``."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, scribbles: torch.Tensor) -> torch.Tensor:
        return partial_cross_entropy(logits, scribbles, self.ignore_index)


class NormalizedCutLoss(nn.Module):
    """:func:`normalized_cut_loss` as a module: ``forward(probs, images, scribbles=None, roi=None)``."""

    def __init__(
        self,
        sigma_rgb: float = 15.0,
        sigma_xy: float = 100.0,
        scale: float = 1.0,
        ignore_index: int = 255,
        from_logits: bool = False,
    ):
        super().__init__()
        check_positive("sigma_rgb", sigma_rgb)
        check_positive("sigma_xy", sigma_xy)
        _check_scale(scale)
        self.sigma_rgb, self.sigma_xy, self.scale = sigma_rgb, sigma_xy, scale
        self.ignore_index, self.from_logits = ignore_index, from_logits

    def forward(
        self,
        probs: torch.Tensor,
        images: torch.Tensor,
        scribbles: Optional[torch.Tensor] = None,
        roi: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return normalized_cut_loss(
            probs, images, scribbles, self.sigma_rgb, self.sigma_xy, self.scale, roi, self.ignore_index,
            self.from_logits,
        )


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
        check_positive("sigma_rgb", sigma_rgb)
        check_positive("sigma_xy", sigma_xy)
        _check_scale(scale)
        self.sigma_rgb, self.sigma_xy, self.scale = sigma_rgb, sigma_xy, scale

    def forward(self, probs: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
        return densecrf_loss(probs, images, self.sigma_rgb, self.sigma_xy, self.scale, roi)
