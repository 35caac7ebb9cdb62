"""GrabCut segmentation proposals from scribbles (the "GrabCut proposals" baseline of Table 2).

Multi-class one-vs-rest with OpenCV's ``cv2.grabCut`` (mask initialization, no box):

* every *foreground* class present in an image's scribbles (all labels but ``background``) gets its own GrabCut:
  its scribbles are definite foreground, every other scribble definite background, unlabelled pixels inside the
  bounding box of its scribbles grown by ``margin`` (fraction of the image size) probable foreground, the rest
  probable background;
* **overlap rule**: a pixel claimed by several classes goes to the class whose nearest scribble pixel is closest
  (Euclidean distance transform; ties to the lower label); a pixel claimed by none goes to ``background`` if the
  image has background scribbles, otherwise to the class with the nearest scribble;
* scribbled pixels always keep their label. Images without scribbles get ``ignore_index`` everywhere.

NC proposals with scribbles as hard constraints are :func:`nclib.clustering.seeded_normalized_cut`;
:func:`kernelcut_proposals` adds a Potts term to them (the "KernelCut" proposals of Table 2), solved with
alpha-expansion from the maintained max-flow package PyMaxflow (optional: ``pip install PyMaxflow``).
"""
from __future__ import annotations

from typing import List, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_images, check_labels, check_positive, check_tensor
from .clustering import ClusteringResult, seeded_normalized_cut
from .energies import normalized_cut, normalized_cut_gradient
from .lattice import Permutohedral, rgbxy_features

__all__ = ["grabcut_proposals", "kernelcut_proposals"]


def _nearest_scribble_distance(seeds: np.ndarray) -> np.ndarray:
    """Distance (pixels) from every pixel to the nearest True pixel of ``seeds`` (inf if there is none)."""
    if not seeds.any():
        return np.full(seeds.shape, np.inf, dtype=np.float32)
    return cv2.distanceTransform((~seeds).astype(np.uint8), cv2.DIST_L2, 5)


def _grabcut_one(rgb: np.ndarray, scribbles: np.ndarray, label: int, ignore_index: int, iters: int,
                 margin: float) -> np.ndarray:
    h, w = scribbles.shape
    mine = scribbles == label
    others = (scribbles != label) & (scribbles != ignore_index)
    mask = np.full((h, w), cv2.GC_PR_BGD, dtype=np.uint8)
    ys, xs = np.nonzero(mine)
    my, mx = int(round(margin * h)), int(round(margin * w))
    mask[max(ys.min() - my, 0): ys.max() + my + 1, max(xs.min() - mx, 0): xs.max() + mx + 1] = cv2.GC_PR_FGD
    mask[others] = cv2.GC_BGD
    mask[mine] = cv2.GC_FGD
    if not ((mask == cv2.GC_BGD) | (mask == cv2.GC_PR_BGD)).any():
        return np.ones((h, w), dtype=bool)  # no background sample at all: the class claims the image
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(rgb, mask, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def grabcut_proposals(
    images: torch.Tensor,
    scribbles: torch.Tensor,
    iters: int = 5,
    background: int = 0,
    ignore_index: int = 255,
    margin: float = 0.1,
) -> torch.Tensor:
    """Full-image label proposals (B, H, W) int64 from scribbles, one-vs-rest GrabCut per foreground class.

    Args:
        images: (B, 3, H, W) RGB in 0..255; scribbles: (B, H, W) labels, ``ignore_index`` where unlabelled.
        iters: GrabCut iterations; background: the label that is not segmented itself but takes unclaimed pixels;
        margin: growth of each class's scribble bounding box (fraction of H and W) marked probable foreground.
    See the module docstring for the overlap rule. Proposals agree with every scribble.
    """
    img = check_images(images)
    check_tensor("scribbles", scribbles, "(B, H, W)")
    check_labels("scribbles", scribbles.to(img.device), img, None, ignore_index, "images")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must be in [0, 1], got {margin!r}")
    out = []
    for b in range(img.shape[0]):
        rgb = np.ascontiguousarray(img[b].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy())
        scr = scribbles[b].cpu().numpy().astype(np.int64)
        labels = sorted(int(v) for v in np.unique(scr) if v != ignore_index)
        if not labels:
            out.append(np.full(scr.shape, ignore_index, dtype=np.int64))
            continue
        dist = np.stack([_nearest_scribble_distance(scr == c) for c in labels])  # (L, H, W)
        claims = np.stack(
            [
                _grabcut_one(rgb, scr, c, ignore_index, iters, margin) if c != background else np.zeros(scr.shape, bool)
                for c in labels
            ]
        )
        claimed_dist = np.where(claims, dist, np.inf)
        winner = np.asarray(labels)[claimed_dist.argmin(0)]
        none = ~claims.any(0)
        fallback = background if background in labels else None
        result = np.where(none, fallback if fallback is not None else np.asarray(labels)[dist.argmin(0)], winner)
        seeded = scr != ignore_index
        result[seeded] = scr[seeded]
        out.append(result.astype(np.int64))
    return torch.from_numpy(np.stack(out)).to(scribbles.device)


def kernelcut_proposals(
    images: torch.Tensor,
    scribbles: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    potts_weight: float = 5.0,
    iters: int = 10,
    ignore_index: int = 255,
    num_classes: Optional[int] = None,
) -> ClusteringResult:
    """KernelCut-style proposals: seeded normalized cut plus a Potts term, by bound optimization.

    Energy per image: ``N * NC(S) + potts_weight * #{4-neighbour pairs with different labels}``. NC is concave for
    a PSD kernel, so its linearization at the current labelling (Eq. 8 as per-pixel unaries) bounds it from
    above; each iteration minimizes bound + Potts with alpha-expansion (PyMaxflow), seeds fixed and only labels
    present in the image's scribbles allowed, starting from :func:`seeded_normalized_cut`'s first assignment.

    Returns labels (B, H, W) agreeing with every scribble and ``energies``: the energy above divided by N
    (= NC + potts_weight * boundary length / N) per iterate. Images without scribbles get ``ignore_index``.
    """
    try:
        from maxflow import fastmin
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("kernelcut_proposals needs PyMaxflow: `pip install PyMaxflow`") from err
    check_positive("potts_weight", potts_weight)
    init = seeded_normalized_cut(images, scribbles, sigma_rgb, sigma_xy, iters=0, ignore_index=ignore_index,
                                 num_classes=num_classes)
    img = check_images(images)
    b, _, h, w = img.shape
    lattice = Permutohedral(rgbxy_features(img, sigma_rgb, sigma_xy))
    d = lattice.norm()
    scr = scribbles.long().to(img.device)
    labels_out, energies = init.labels.clone(), []
    big = 1e9
    per_image: List[List[float]] = []
    for i in range(b):
        seeds = scr[i] != ignore_index
        if not bool(seeds.any()):
            per_image.append([0.0])
            continue
        present = sorted(int(v) for v in torch.unique(scr[i][seeds]))
        k = len(present)
        compact = torch.zeros_like(init.labels[i])
        for j, c in enumerate(present):
            compact[init.labels[i] == c] = j
        seed_compact = torch.full_like(compact, -1)
        for j, c in enumerate(present):
            seed_compact[scr[i] == c] = j
        lat_i = _SubLattice(lattice, i)
        pairs = torch.stack([(compact[:, 1:] != compact[:, :-1]).sum(), (compact[1:] != compact[:-1]).sum()]).sum()
        hist = []
        lab_np = compact.cpu().numpy().astype(np.int32)
        for it in range(iters + 1):
            lab_t = torch.from_numpy(lab_np.astype(np.int64)).to(img.device)
            s = F.one_hot(lab_t, k).permute(2, 0, 1)[None].float()
            ws = 0.5 * (lat_i.filter(s) + lat_i.filter(s, transpose=True))
            nc = float(normalized_cut(s, lambda _: ws, d[i : i + 1]))
            pairs = int((lab_np[:, 1:] != lab_np[:, :-1]).sum() + (lab_np[1:] != lab_np[:-1]).sum())
            hist.append(nc + potts_weight * pairs / (h * w))
            if it == iters or (len(hist) > 1 and hist[-1] >= hist[-2] - 1e-12):
                break
            grad = normalized_cut_gradient(s, ws, d[i : i + 1])[0] * (h * w)  # Eq. 8, per pixel unaries
            unary = grad.permute(1, 2, 0).double().cpu().numpy().copy()
            sc = seed_compact.cpu().numpy()
            fixed = sc >= 0
            unary[fixed] = big
            unary[fixed, sc[fixed]] = 0.0
            unary -= unary.min(axis=2, keepdims=True)
            pairwise = potts_weight * (1.0 - np.eye(k))
            new = fastmin.aexpansion_grid(unary, pairwise, labels=lab_np.copy())
            if np.array_equal(new, lab_np):
                break
            lab_np = new.astype(np.int32)
        per_image.append(hist)
        lut = torch.tensor(present, dtype=torch.long)
        labels_out[i] = lut[torch.from_numpy(lab_np.astype(np.int64))].to(labels_out.device)
    steps = max(len(hh) for hh in per_image)
    for t in range(steps):
        energies.append(torch.tensor([hh[min(t, len(hh) - 1)] for hh in per_image], dtype=torch.float64))
    return ClusteringResult(labels_out, energies, None)


class _SubLattice:
    """One image of a batched lattice, via the batch filter on a zero-padded batch (keeps one build per call)."""

    def __init__(self, lattice: Permutohedral, index: int):
        self.lattice, self.index = lattice, index

    def filter(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        b = self.lattice.shape[0]
        full = torch.zeros((b,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
        full[self.index] = values[0]
        return self.lattice.filter(full, transpose=transpose)[self.index : self.index + 1]
