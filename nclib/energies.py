"""The paper's objectives as pure functions of soft segmentations and an affinity operator, each once.

A soft segmentation ``S`` is (B, K, H, W), ``S_k`` its k-th column over the N = H * W pixels. The affinity ``W``
(N x N per image) is given as an operator: ``filt(v)`` applies ``W`` to (B, C, H, W) values and ``d = W 1``
(B, 1, H, W) is its degree, from the same operator so that ``S'W1 = d'S`` holds exactly for it. Typical operators:
a :class:`nclib.lattice.Permutohedral` (``lattice.filter``, ``lattice.norm()``, linear time) or
:func:`exact_affinity` (the exact O(N^2) Gaussian, for tests and small images).

* :func:`normalized_cut`: relaxed NC, Eq. 6 of the paper, ``sum_k S_k'W(1 - S_k) / d'S_k``; with ``present``,
  over the labels present in each image only (beyond the paper, see there);
* :func:`normalized_cut_lattice`: the same value on a :class:`nclib.lattice.Permutohedral`, fused for speed: one
  pass over S in the kernels' pixel-major layout, the backward Eq. 8 in closed form (no autograd graph of
  (B, K, H, W) intermediates);
* :func:`normalized_cut_gradient`: its gradient, Eq. 8, in closed form;
* :func:`potts_energy`: relaxed Potts / dense-CRF term ``sum_k S_k'W(1 - S_k)``;
* :func:`kmeans_energy`: soft K-means on RGB (no affinity);
* :func:`nc_energy`: the NC energy of probabilities or a label map on images (the one used for Fig 3 / Fig 5).

Beside each, a dense reference (``*_dense``) written independently with an explicit (B, N, N) matrix, for tests.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import (
    check_images,
    check_labels,
    check_positive,
    check_probs,
    check_roi,
    check_tensor,
)
from .lattice import Permutohedral, exact_gaussian_filter, rgbxy_features

__all__ = [
    "Filter",
    "cut_and_volume",
    "restrict_to_labels",
    "normalized_cut",
    "normalized_cut_lattice",
    "normalized_cut_gradient",
    "potts_energy",
    "kmeans_energy",
    "nc_energy",
    "exact_affinity",
    "dense_affinity",
    "normalized_cut_dense",
    "potts_energy_dense",
    "kmeans_energy_dense",
]

Filter = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ affinity operators
def exact_affinity(features: torch.Tensor, roi: Optional[torch.Tensor] = None) -> Tuple[Filter, torch.Tensor]:
    """The exact Gaussian ``W_pq = exp(-|f_p - f_q|^2 / 2)`` on (B, D, H, W) features as ``(filt, d)``, O(N^2).

    Computes in the dtype of the values (pass float64 features and S for finite differences).
    """
    def filt(v: torch.Tensor) -> torch.Tensor:
        return exact_gaussian_filter(v, features.to(v.dtype), roi=roi)

    ones = torch.ones_like(features[:, :1])
    return filt, filt(ones)


def dense_affinity(features: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact Gaussian affinity as a dense (B, N, N) matrix (rows / columns outside ``roi`` zero)."""
    f = features.flatten(2).transpose(1, 2)  # (B, N, D)
    w = torch.exp(-0.5 * torch.cdist(f, f).square())
    if roi is not None:
        keep = roi.flatten(1).to(w.dtype)
        w = w * keep[:, :, None] * keep[:, None, :]
    return w


# ------------------------------------------------------------------------------------------- NC and Potts
def cut_and_volume(s: torch.Tensor, filt: Filter, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image and class: ``cut_k = S_k'W(1 - S_k) = d'S_k - S_k'WS_k`` and ``vol_k = d'S_k``, (B, K) each."""
    ws = filt(s)
    assoc = (s * ws).sum(dim=(2, 3))
    vol = (s * d).sum(dim=(2, 3))
    return vol - assoc, vol


def _effective_present(present: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, K) mask where images with < 2 present labels take all labels (kept finite, zeroed later), and which
    images have >= 2 present labels (B,)."""
    if present.dtype != torch.bool or tuple(present.shape) != tuple(s.shape[:2]):
        raise ValueError(f"present must be a (B, K) = {tuple(s.shape[:2])} bool mask, got "
                         f"{present.dtype} {tuple(present.shape)}")
    active = present.sum(1) >= 2
    return present | ~active[:, None], active


def restrict_to_labels(s: torch.Tensor, present: torch.Tensor, from_logits: bool = False) -> torch.Tensor:
    """S over the present labels only: ``p_P / sum p_P`` (or, with ``from_logits``, the softmax over the present
    labels' logits, the same thing computed stably); 0 for absent labels. Idempotent.

    Images with fewer than 2 present labels are returned over all labels (their NC is 0 in
    :func:`normalized_cut`, computed on finite values so that gradients stay finite).
    """
    eff, _ = _effective_present(present, s)
    m = eff[:, :, None, None]
    if from_logits:
        return torch.softmax(s.masked_fill(~m, float("-inf")), dim=1)
    sp = s * m.to(s.dtype)
    total = sp.sum(1, keepdim=True)
    return sp / torch.where(total > 0, total, torch.ones_like(total))  # rows of 0 (outside a roi) stay 0


def normalized_cut(
    s: torch.Tensor, filt: Filter, d: torch.Tensor, present: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Relaxed normalized cut of Eq. 4/6, ``sum_k S_k'W(1 - S_k) / d'S_k``, per image: (B,) in [0, K].

    Empty segments (``d'S_k = 0``) contribute 0, the crisp convention ``cut(empty)/assoc(empty) = 0``, so nothing
    is NaN or inf; its autograd gradient is Eq. 8 for ``filt``.

    present: optional (B, K) bool, the labels that take part in each image (e.g. those in its scribbles). S is
    restricted to them (:func:`restrict_to_labels`) and images with fewer than 2 present labels give 0 (one label
    is the trivial partition). Beyond the paper (its Eq. 6 sums over all K labels): the ratio does not depend on
    the scale of ``S_k``, so an absent label with a faint, diffuse softmax residue contributes ~1 however small its
    mass; with K labels and a few present, those residues dominate the value and its gradient pushes absent labels
    onto colour clusters. Restricting the partition removes those terms.
    """
    return _with_present(s, present, lambda x: _ratio_sum(*cut_and_volume(x, filt, d)))


def _ratio_sum(cut: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
    """``sum_k cut_k / vol_k`` over (B, K), empty segments (vol 0) contributing 0."""
    return torch.where(vol > 0, cut / vol.clamp_min(1e-30), torch.zeros_like(cut)).sum(dim=1)


def _with_present(s: torch.Tensor, present: Optional[torch.Tensor], nc: Callable[[torch.Tensor], torch.Tensor]):
    """``nc(S)`` (B,), or with ``present`` ``nc`` of S restricted to the present labels, 0 below 2 labels."""
    if present is None:
        return nc(s)
    _, active = _effective_present(present, s)
    value = nc(restrict_to_labels(s, present))
    return torch.where(active, value, torch.zeros_like(value))


class _LatticeNC(torch.autograd.Function):
    """NC of Eq. 6 on a lattice ``L`` and its Eq. 8 backward with ``W = (L + L') / 2``, on (B, K, N) memory.

    Forward: ``2 W S = (L + L') S`` (one splat on the CPU build, which reads and writes NCHW itself), then per class
    ``vol = d'S`` (a batched product) and ``assoc = S'WS = S'LS`` (a row dot product), no (B, K, H, W) temporaries
    in autograd. Saved for the backward: ``2 W S``, ``d``, vol and assoc, so the backward runs no filter and
    builds no graph: two elementwise passes. The same computation with or without a gradient, so both give the
    same value.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, lattice: Permutohedral) -> torch.Tensor:
        b, k, h, w = s.shape
        n = h * w
        sf = s.detach().to(torch.float32).contiguous()
        ws = lattice.apply_symmetric(sf).view(b, k, n)  # 2 W S = (L + L') S
        sf = sf.view(b, k, n)
        d = lattice.norm().reshape(b, n, 1)  # a view: the norm is stored pixel-major
        vol = torch.bmm(sf, d)[..., 0]  # (B, K)
        assoc = torch.linalg.vecdot(sf, ws) * 0.5  # (B, K): S_k'W S_k = S_k'L S_k
        ctx.save_for_backward(ws, d, vol, assoc)
        ctx.shape, ctx.dtype = (b, k, h, w), s.dtype
        return _ratio_sum(vol - assoc, vol).to(s.dtype)

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        ws2, d, vol, assoc = ctx.saved_tensors
        b, k, h, w = ctx.shape
        go = grad_value.to(torch.float32)[:, None]  # (B, 1)
        safe = vol.clamp_min(1e-30)
        zero = torch.zeros_like(vol)
        a = torch.where(vol > 0, go * assoc / safe.square(), zero)  # (B, K): coefficient of d
        c = torch.where(vol > 0, -go / safe, zero)  # (B, K): coefficient of 2 W S_k
        grad = ws2 * c[:, :, None]
        grad.addcmul_(a[:, :, None], d.view(b, 1, h * w))  # Eq. 8
        return grad.view(b, k, h, w).to(ctx.dtype), None


def normalized_cut_lattice(
    s: torch.Tensor, lattice: Permutohedral, present: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`normalized_cut` with ``filt = lattice.filter`` and ``d = lattice.norm()``, (B,), fused for speed.

    Same value (to float rounding) and the same gradient as autograd through the lattice, i.e. Eq. 8 with the
    symmetric part ``(L + L') / 2`` of the lattice operator, computed in closed form: the forward filters S once
    with ``L + L'`` (:meth:`nclib.lattice.Permutohedral.apply_symmetric`), the backward is
    elementwise. ``s`` (B, K, H, W) matches
    the lattice's batch and size; pixels outside the lattice's roi must be 0 in ``s``. ``present``: as in
    :func:`normalized_cut`.
    """
    b, _, h, w = lattice.shape
    if s.dim() != 4 or s.shape[0] != b or tuple(s.shape[-2:]) != (h, w):
        raise ValueError(f"s must have shape (B, K, H, W) with B, H, W = {(b, h, w)} like the lattice, "
                         f"got {tuple(s.shape)}")
    return _with_present(s, present, lambda x: _LatticeNC.apply(x, lattice))


def normalized_cut_gradient(s: torch.Tensor, ws: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ``dNC/dS_k = (S_k'WS_k) d / (d'S_k)^2 - 2 WS_k / d'S_k`` for a symmetric W, (B, K, H, W).

    ws: ``W S`` (B, K, H, W), e.g. the symmetric part ``(L + L')S / 2`` of a lattice operator; d: ``W 1``.
    Empty segments get 0. Divided by ``d`` it is the kernel-space distance of weighted kernel k-means (Dhillon et
    al. 2004) up to a per-pixel constant, the linearization used by the proposals' bound optimization.
    """
    vol = (s * d).sum(dim=(2, 3), keepdim=True)
    assoc = (s * ws).sum(dim=(2, 3), keepdim=True)
    safe = vol.clamp_min(1e-30)
    grad = assoc * d / safe**2 - 2 * ws / safe
    return torch.where(vol > 0, grad, torch.zeros_like(grad))


def potts_energy(s: torch.Tensor, filt: Filter, d: torch.Tensor) -> torch.Tensor:
    """Relaxed Potts (dense CRF) energy ``sum_k S_k'W(1 - S_k)`` per image: (B,), >= 0 for S in the simplex.

    The authors' DenseCRF loss is ``-sum_k S_k'WS_k``; under ``sum_k S_k = 1`` the two differ by the constant
    ``sum(d)``, so their gradients with respect to the logits are the same.
    """
    cut, _ = cut_and_volume(s, filt, d)
    return cut.sum(dim=1)


# --------------------------------------------------------------------------------------------------- K-means
def kmeans_energy(s: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft K-means on RGB per image, (B,): ``sum_k sum_p S_pk |I_p - mu_k|^2 / N``, ``mu_k`` the S-weighted mean.

    Mean squared RGB distance per (roi) pixel in 0..255 units (the paper's Fig 5 energy scale); empty clusters
    contribute 0. s: (B, K, H, W); images: (B, 3, H, W); roi: optional (B, H, W) bool, pixels outside left out.
    """
    b, k, h, w = s.shape
    if roi is not None:
        s = s * roi[:, None].to(s.dtype)
        npix = roi.flatten(1).sum(1).clamp_min(1).to(s.dtype)
    else:
        npix = torch.full((b,), float(h * w), dtype=s.dtype, device=s.device)
    sf = s.reshape(b, k, 1, h * w)
    x = images.to(s.dtype).reshape(b, 1, 3, h * w)
    mass = sf.sum(-1)  # (B, K, 1)
    mu = torch.where(mass > 0, (sf * x).sum(-1) / mass.clamp_min(1e-30), torch.zeros_like(mass))  # (B, K, 3)
    energy = (sf * (x - mu[..., None]).square()).sum(dim=(1, 2, 3))
    return energy / npix


# ----------------------------------------------------------------------------------------- the NC energy
def nc_energy(
    segmentation: torch.Tensor,
    images: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    roi: Optional[torch.Tensor] = None,
    *,
    num_classes: Optional[int] = None,
) -> torch.Tensor:
    """NC energy (B,) of a segmentation on images with the lattice Gaussian over RGBXY; no gradient.

    Args:
        segmentation: (B, K, H, W) probabilities (relaxed NC, what the loss minimizes without scribble clamping)
            or a (B, H, W) integer label map (crisp NC ``sum_k cut(k) / assoc(k, all)``, labels in
            0..num_classes-1; ``num_classes`` defaults to the largest label + 1).
        images: (B, 3, H, W) RGB 0..255; sigma_rgb (0..255 units), sigma_xy (pixels): bandwidths.
        roi: optional (B, H, W) bool; pixels outside (crop padding) take no part.
    """
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    check_tensor("segmentation", segmentation, "(B, K, H, W) probabilities or (B, H, W) integer labels")
    with torch.no_grad():
        if segmentation.dim() == 3:
            img = check_images(images, segmentation, "segmentation")
            lab = check_labels("segmentation", segmentation, img, num_classes, like_name="images")
            k = num_classes if num_classes is not None else int(lab.max()) + 1
            s = F.one_hot(lab, k).permute(0, 3, 1, 2).float()
        else:
            s = check_probs(segmentation, name="segmentation")
            img = check_images(images, s, "segmentation")
        roi_b = check_roi(roi, s, "segmentation")
        lattice = Permutohedral(rgbxy_features(img, sigma_rgb, sigma_xy), roi=roi_b)
        if roi_b is not None:
            s = s * roi_b[:, None].to(s.dtype)
        return normalized_cut(s, lattice.filter, lattice.norm())  # S'LS, as the clustering's energies


# -------------------------------------------------------------------------------- dense O(N^2) references
def _columns(s: torch.Tensor) -> torch.Tensor:
    return s.flatten(2).transpose(1, 2)  # (B, N, K)


def normalized_cut_dense(s: torch.Tensor, w: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for :func:`normalized_cut` with a dense (B, N, N) affinity: ``S_k'W(1 - S_k) / S_k'W1`` summed
    over the (present) labels, each image on its own, with explicit matrix products."""
    out = []
    for i in range(s.shape[0]):
        labels = range(s.shape[1]) if present is None else [k for k in range(s.shape[1]) if bool(present[i, k])]
        if present is not None and len(labels) < 2:
            out.append(s.new_zeros(()))
            continue
        sub = _columns(s[i : i + 1, list(labels)])[0]  # (N, K')
        sub = sub / sub.sum(1, keepdim=True).clamp_min(1e-30) if present is not None else sub
        ones = torch.ones_like(sub[:, 0])
        total = s.new_zeros(())
        for k in range(sub.shape[1]):
            vol = sub[:, k] @ w[i] @ ones
            if vol > 0:
                total = total + sub[:, k] @ w[i] @ (ones - sub[:, k]) / vol
        out.append(total)
    return torch.stack(out)


def potts_energy_dense(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`potts_energy`: ``sum_k sum_pq W_pq S_pk (1 - S_qk)`` with a dense (B, N, N) W."""
    x = _columns(s)  # (B, N, K)
    return torch.einsum("bpq,bpk,bqk->b", w, x, 1 - x)


def kmeans_energy_dense(s: torch.Tensor, images: torch.Tensor, roi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for :func:`kmeans_energy` in its pairwise form, no means computed:
    ``sum_k sum_pq S_pk S_qk |I_p - I_q|^2 / (2 sum_p S_pk)``, per (roi) pixel."""
    if roi is not None:
        s = s * roi[:, None].to(s.dtype)
    x = _columns(s)  # (B, N, K)
    f = images.to(s.dtype).flatten(2).transpose(1, 2)  # (B, N, 3)
    dist = torch.cdist(f, f).square()  # (B, N, N)
    pair = torch.einsum("bpk,bqk,bpq->bk", x, x, dist)
    mass = x.sum(1)
    energy = torch.where(mass > 0, pair / (2 * mass.clamp_min(1e-30)), torch.zeros_like(mass)).sum(1)
    npix = roi.flatten(1).sum(1).to(s.dtype) if roi is not None else torch.full_like(energy, x.shape[1])
    return energy / npix.clamp_min(1)
