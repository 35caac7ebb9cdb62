"""Shallow clustering algorithms the paper compares its networks with (Sec 5.1, Fig 5; Table 2 proposals).

* :func:`kmeans`: K-means on RGB (OpenCV), the "K-means algorithm" of Fig 5b; energy per pixel like
  :func:`nclib.losses.kmeans_loss`.
* :func:`kernel_kmeans_nc`: the weighted kernel k-means algorithm for normalized cut (Dhillon, Guan & Kulis,
  KDD 2004), the "[17] for NC" of Fig 5c, with the dense RGBXY Gaussian applied through the lattice (linear time per
  iteration). It reports the NC energy of every iterate.
* :func:`seeded_normalized_cut`: the same iterations with scribbles as hard constraints, giving the
  "NormalizedCut" segmentation proposals of Table 2.

The NC energy of any labelling is :func:`nclib.energies.nc_energy`, with the formula of the loss.

Dhillon et al.: with weights ``w = d = W 1`` and kernel ``D^-1 W D^-1``, weighted kernel k-means minimizes
``const - sum_k S_k'WS_k / d'S_k``, i.e. the normalized cut, and each batch iteration (assign every pixel to the
nearest weighted centroid in kernel space) never increases it when the kernel is positive semidefinite. The exact
Gaussian is; the lattice operator is only approximately (it is not exactly symmetric either, so its symmetric part
``(L + L')/2`` is used, which gives the same quadratic forms). A step that would raise the NC energy is therefore
rejected and the iterations stop there (``rejected`` in the result says so); this keeps the reported energies
monotone by construction as well as by theory.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_images, check_labels, check_positive, check_tensor
from .energies import normalized_cut, normalized_cut_gradient
from .lattice import Permutohedral, rgbxy_features

__all__ = ["ClusteringResult", "kmeans", "kernel_kmeans_nc", "seeded_normalized_cut"]


class ClusteringResult(NamedTuple):
    """labels: (B, H, W) int64; energies: one (B,) tensor per iterate, the initial labelling first.

    rejected: (B,) bool, True where a step that would have raised the energy was refused (lattice not PSD).
    """

    labels: torch.Tensor
    energies: List[torch.Tensor]
    rejected: Optional[torch.Tensor] = None


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def _check_iters(iters: int) -> None:
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")


def kmeans(images: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> ClusteringResult:
    """K-means on RGB colours only (k-means++ seeding, OpenCV), per image.

    Args:
        images: (B, 3, H, W) RGB in 0..255.
    Returns:
        labels (B, H, W) and ``energies[-1]`` (B,): ``sum_p |I_p - mu_{l_p}|^2 / N`` (0..255 units), the
        normalization of :func:`nclib.losses.kmeans_loss` (the paper's Fig 5b energies 3406 / 1234 / 1020).
    """
    img = check_images(images)
    _check_k(k)
    _check_iters(iters)
    b, _, h, w = img.shape
    labels, energies = [], []
    criteria = (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, max(iters, 1), 1e-3)
    for i in range(b):
        x = img[i].reshape(3, -1).T.contiguous().cpu().numpy().astype(np.float32)
        kk = min(k, len(np.unique(x, axis=0)))  # OpenCV needs at least k distinct samples
        cv2.setRNGSeed(seed)
        compact, lab, _ = cv2.kmeans(x, kk, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
        labels.append(torch.from_numpy(lab.reshape(h, w).astype(np.int64)))
        energies.append(compact / (h * w))
    lab_t = torch.stack(labels).to(images.device)
    return ClusteringResult(lab_t, [torch.tensor(energies, dtype=torch.float64)])


def _kernel_distance(
    s: torch.Tensor, ws: torch.Tensor, d: torch.Tensor, allowed: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B, K, H, W) weighted kernel-space distance of every pixel to every cluster, minus the constant ``K_pp``:
    Eq. 8 divided by ``d`` (Dhillon et al. 2004); inf for empty clusters and labels not ``allowed`` (B, K)."""
    vol = (s * d).sum(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    dist = normalized_cut_gradient(s, ws, d) / d.clamp_min(1e-30)
    usable = vol > 0 if allowed is None else (vol > 0) & allowed[:, :, None, None]
    return torch.where(usable, dist, torch.full_like(dist, float("inf")))


def _kernel_kmeans(
    lattice: Permutohedral,
    labels: torch.Tensor,
    k: int,
    iters: int,
    fixed: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
) -> ClusteringResult:
    """Batch weighted kernel k-means iterations for NC (Dhillon et al. 2004) on one lattice.

    labels (B, H, W) initial labelling; fixed (B, H, W) bool pixels that keep their label (seeds);
    allowed (B, K) bool labels a pixel may take (others get an infinite distance).
    """
    d = lattice.norm()  # (B, 1, H, W)
    b = labels.shape[0]

    def stats(lab):
        s = F.one_hot(lab, k).permute(0, 3, 1, 2).float()
        ls, lts = lattice.filter(s), lattice.filter(s, transpose=True)
        ws = 0.5 * (ls + lts)  # symmetric part of the operator: same quadratic forms, Eq. 8 holds exactly
        energy = normalized_cut(s, lambda _: ws, d)
        return s, ws, energy

    s, ws, energy = stats(labels)
    energies = [energy]
    rejected = torch.zeros(b, dtype=torch.bool, device=labels.device)
    active = torch.ones(b, dtype=torch.bool, device=labels.device)
    for _ in range(iters):
        new = _kernel_distance(s, ws, d, allowed).argmin(dim=1)
        if fixed is not None:
            new = torch.where(fixed, labels, new)
        new = torch.where(active[:, None, None], new, labels)
        if bool((new == labels).all()):
            break
        s_new, ws_new, e_new = stats(new)
        worse = e_new > energy + 1e-6 * energy.abs().clamp_min(1e-6)
        if bool(worse.any()):  # lattice not exactly PSD: refuse the step for those images and stop them
            rejected |= worse & active
            active &= ~worse
            keep = worse[:, None, None]
            new = torch.where(keep, labels, new)
            s_new, ws_new, e_new = stats(new)
        labels, s, ws, energy = new, s_new, ws_new, e_new
        energies.append(energy)
        if not bool(active.any()):
            break
    return ClusteringResult(labels, energies, rejected)


def kernel_kmeans_nc(
    images: torch.Tensor,
    k: int,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 40.0,
    iters: int = 30,
    init: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> ClusteringResult:
    """Normalized cut by weighted kernel k-means (Dhillon, Guan & Kulis 2004) with the dense RGBXY Gaussian.

    Args:
        images: (B, 3, H, W) RGB in 0..255; sigma_rgb (0..255 units), sigma_xy (pixels) as in the loss (the
            paper's Fig 5c uses 15 and 40).
        k: number of segments; iters: maximum batch iterations (stops early at convergence).
        init: optional (B, H, W) initial labels in 0..k-1; default: :func:`kmeans` on RGB with ``seed``.
    Returns:
        labels (B, H, W); ``energies``: the NC energy (B,) of the initial labelling and of every iterate,
        non-increasing.
    """
    img = check_images(images)
    _check_k(k)
    _check_iters(iters)
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    if init is None:
        labels = kmeans(img, k, seed=seed).labels
    else:
        check_tensor("init", init, "(B, H, W)")
        labels = check_labels("init", init.to(img.device), img, k, like_name="images")
    lattice = Permutohedral(rgbxy_features(img, sigma_rgb, sigma_xy))
    return _kernel_kmeans(lattice, labels.to(img.device), k, iters)


def seeded_normalized_cut(
    images: torch.Tensor,
    scribbles: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    iters: int = 30,
    ignore_index: int = 255,
    num_classes: Optional[int] = None,
) -> ClusteringResult:
    """Normalized-cut segmentation proposals with scribbles as hard constraints ("NormalizedCut" of Table 2).

    Every scribbled pixel keeps its label; unlabelled pixels may take only labels present in their image's
    scribbles. Initialization: clusters = the scribbles alone, then one assignment of all other pixels; then the
    kernel k-means iterations of :func:`kernel_kmeans_nc` with the seeds fixed.

    Args:
        images: (B, 3, H, W) RGB 0..255; scribbles: (B, H, W) int labels, ``ignore_index`` where unlabelled.
    Returns:
        labels (B, H, W) agreeing with every scribble; images without any scribble get ``ignore_index``
        everywhere (and energy 0).
    """
    img = check_images(images)
    check_tensor("scribbles", scribbles, "(B, H, W)")
    lab = check_labels("scribbles", scribbles.to(img.device), img, num_classes, ignore_index, "images")
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    _check_iters(iters)
    seeds = lab != ignore_index
    k = int(num_classes) if num_classes is not None else int(torch.where(seeds, lab, 0).max()) + 1
    lab0 = torch.where(seeds, lab, torch.zeros_like(lab))
    onehot = F.one_hot(lab0, k).permute(0, 3, 1, 2).float() * seeds[:, None].float()  # seeds only
    allowed = onehot.sum(dim=(2, 3)) > 0  # (B, K)
    lattice = Permutohedral(rgbxy_features(img, sigma_rgb, sigma_xy))
    d = lattice.norm()
    ws = 0.5 * (lattice.filter(onehot) + lattice.filter(onehot, transpose=True))
    init = torch.where(seeds, lab0, _kernel_distance(onehot, ws, d, allowed).argmin(dim=1))
    result = _kernel_kmeans(lattice, init, k, iters, fixed=seeds, allowed=allowed)
    has = seeds.flatten(1).any(1)
    labels = torch.where(has[:, None, None], result.labels, torch.full_like(result.labels, ignore_index))
    energies = [torch.where(has, e, torch.zeros_like(e)) for e in result.energies]
    return ClusteringResult(labels, energies, result.rejected)
