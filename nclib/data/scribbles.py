"""ScribbleSup-like scribbles synthesized from a full label mask.

ScribbleSup (Lin et al. 2016) annotators drew one free-hand stroke through each object and a few through the
background; rasterized 3 px wide they label about 3% of a VOC image. Here a stroke follows the skeleton of the
eroded class region (``skimage.morphology.skeletonize``): a contiguous piece of its longest geodesic path, drawn as
a ``width``-px polyline. Every stroke pixel is intersected with its own region, so a scribble never carries a
label other than the true one. Stroke lengths are shared out so that about ``fraction`` of the labelled image is
covered (one calibration pass measures the drawn area and rescales).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import cv2
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order
from skimage.morphology import skeletonize

from .labels import IGNORE_LABEL

__all__ = ["synthesize_scribbles", "labelled_fraction", "draw_polyline", "cv2_thickness"]

_EIGHT = np.ones((3, 3), dtype=bool)


def labelled_fraction(scribble: np.ndarray, ignore_index: int = IGNORE_LABEL) -> float:
    """Fraction of pixels of a (H, W) scribble map that carry a label (not ``ignore_index``)."""
    scribble = np.asarray(scribble)
    return float((scribble != ignore_index).mean())


def _longest_skeleton_path(region: np.ndarray) -> np.ndarray:
    """(L, 2) array of (y, x) pixels along the longest geodesic path of the region's skeleton (largest piece)."""
    skel = skeletonize(region)
    if skel.sum() < 2:
        ys, xs = np.nonzero(skel if skel.any() else region)
        return np.stack([ys, xs], axis=1)[:1]
    lab, n = ndimage.label(skel, structure=_EIGHT)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        skel = lab == (1 + int(np.argmax(sizes)))
    ys, xs = np.nonzero(skel)
    index = -np.ones(skel.shape, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    h, w = skel.shape
    rows, cols = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        nb = np.full(len(ys), -1, dtype=np.int64)
        nb[ok] = index[ny[ok], nx[ok]]
        keep = nb >= 0
        rows.append(np.nonzero(keep)[0])
        cols.append(nb[keep])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(len(ys), len(ys))).tocsr()
    order = breadth_first_order(graph, 0, directed=False, return_predecessors=False)
    a = int(order[-1])
    order, pred = breadth_first_order(graph, a, directed=False, return_predecessors=True)
    b = int(order[-1])
    path = [b]
    while path[-1] != a:
        path.append(int(pred[path[-1]]))
    path = np.asarray(path)
    return np.stack([ys[path], xs[path]], axis=1)


def _allocate(total: float, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Water-filling: share ``total`` in proportion to ``weights`` without exceeding ``caps``."""
    out = np.zeros(len(weights))
    free = caps > 0
    remaining = float(total)
    for _ in range(len(weights) + 1):
        if remaining <= 1e-9 or not free.any():
            break
        share = remaining * weights * free / max(float((weights * free).sum()), 1e-12)
        take = np.minimum(share, caps - out)
        out += take
        remaining -= float(take.sum())
        free = free & (caps - out > 1e-9)
    return out


@lru_cache(maxsize=None)
def cv2_thickness(width: int) -> int:
    """The OpenCV ``thickness`` that draws a ``width``-pixel-wide line.

    OpenCV's thick lines are wider than their ``thickness`` (thickness 3 paints 5 pixels across a horizontal
    line), so the value is measured once on a horizontal line rather than assumed.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1 pixel, got {width!r}")
    for t in range(1, 2 * width + 2):
        a = np.zeros((4 * width + 8, 8), dtype=np.uint8)
        cv2.line(a, (2, 2 * width + 4), (5, 2 * width + 4), 1, t, lineType=cv2.LINE_8)
        got = int(a[:, 4].sum())
        if got == width:
            return t
        if got > width:
            break
    raise ValueError(f"OpenCV cannot draw lines exactly {width} px wide (odd widths work); got {got}")


def draw_polyline(canvas: np.ndarray, points_xy: np.ndarray, value: int, width: int) -> np.ndarray:
    """Draw an open polyline through (N, 2) integer (x, y) points, ``width`` px wide, into ``canvas`` in place."""
    pts = np.asarray(points_xy, dtype=np.int32).reshape(-1, 1, 2)
    if len(pts) == 1:
        cv2.circle(canvas, (int(pts[0, 0, 0]), int(pts[0, 0, 1])), (width - 1) // 2, int(value), -1)
    else:
        cv2.polylines(canvas, [pts], False, int(value), thickness=cv2_thickness(width), lineType=cv2.LINE_8)
    return canvas


def _draw(shape: Tuple[int, int], path: np.ndarray, start: int, length: int, width: int) -> np.ndarray:
    canvas = np.zeros(shape, dtype=np.uint8)
    seg = path[start : start + max(length, 1)]
    return draw_polyline(canvas, seg[:, ::-1], 1, width).astype(bool)


def _check_scribble_args(mask: np.ndarray, num_classes: int, fraction: float, width: int, ignore_index: int) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got shape {mask.shape}")
    if mask.dtype.kind not in "iub":
        raise ValueError(f"mask must be an integer array, got dtype {mask.dtype}")
    if not (0 < fraction < 1):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    cv2_thickness(width)  # validates the width
    if not (0 < num_classes <= 255) or ignore_index < num_classes or ignore_index > 255:
        raise ValueError(f"need 0 < num_classes <= ignore_index <= 255, got num_classes={num_classes}, "
                         f"ignore_index={ignore_index}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        raise ValueError(
            f"mask has labels outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
            f"{sorted(np.unique(mask[bad]).tolist())[:10]}"
        )


def _stroke_core(comp: np.ndarray, width: int) -> Optional[np.ndarray]:
    """The part of a region a stroke may run through: eroded by a margin that grows with the region, as a person
    keeps strokes off the edges, relaxed until at least 2 pixels remain (None if none do)."""
    area = int(comp.sum())
    margin = int(np.clip(0.12 * np.sqrt(area / np.pi), 1, 8))
    for r in range(width // 2 + margin, -1, -1):
        er = ndimage.binary_erosion(comp, structure=_disk(r)) if r > 0 else comp
        if er.sum() >= 2:
            return er
    return None


def _stroke_regions(mask: np.ndarray, ignore_index: int, width: int, min_area: int,
                    background_strokes: int) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """(class, region pixels, skeleton path) per stroke: one per connected region of at least ``min_area``
    pixels, ``background_strokes`` pieces for class 0."""
    regions: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for c in np.unique(mask[mask != ignore_index]).tolist():
        lab, n = ndimage.label(mask == c, structure=_EIGHT)
        for k in range(1, n + 1):
            comp = lab == k
            if int(comp.sum()) < min_area:
                continue
            core = _stroke_core(comp, width)
            if core is None:
                continue
            path = _longest_skeleton_path(core)
            strokes = background_strokes if c == 0 else 1
            if strokes > 1 and len(path) >= 4 * strokes:
                regions.extend((c, comp, piece) for piece in np.array_split(path, strokes))
            else:
                regions.append((c, comp, path))
    return regions


def synthesize_scribbles(
    mask: np.ndarray,
    num_classes: int,
    seed: int,
    fraction: float = 0.03,
    width: int = 3,
    ignore_index: int = IGNORE_LABEL,
    min_area: int | None = None,
    background_strokes: int = 2,
) -> np.ndarray:
    """(H, W) uint8 scribbles from a (H, W) integer label mask; ``ignore_index`` marks unlabelled pixels.

    One stroke per connected region of each class (``background_strokes`` for class 0), partial length,
    3-px wide by default, covering about ``fraction`` of the non-void pixels. Same seed, same scribbles.
    Regions smaller than ``min_area`` pixels (default ``2 * width**2``) get no stroke.
    """
    mask = np.asarray(mask)
    _check_scribble_args(mask, num_classes, fraction, width, ignore_index)
    min_area = 2 * width * width if min_area is None else min_area
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    out = np.full((h, w), ignore_index, dtype=np.uint8)
    valid = int((mask != ignore_index).sum())
    if valid == 0:
        return out

    regions = _stroke_regions(mask, ignore_index, width, min_area, background_strokes)
    if not regions:
        return out

    caps = np.array([len(p) for _, _, p in regions], dtype=float)
    is_obj = np.array([c != 0 for c, _, _ in regions])
    # Objects: a stroke through a good part of each one (as ScribbleSup annotators did); background: the rest.
    wish = np.where(is_obj, caps * rng.uniform(0.5, 0.9, size=len(regions)), 0.0)
    bg_weight = np.where(is_obj, 0.0, np.sqrt(caps))
    starts_u = rng.random(len(regions))
    target = fraction * valid

    def plan(total: float) -> np.ndarray:
        """Stroke lengths (pixels along the path) summing to about ``total``."""
        obj_total = min(float(wish.sum()), total * (0.8 if bg_weight.any() else 1.0))
        lengths = wish * (obj_total / wish.sum()) if wish.sum() > 0 else np.zeros(len(regions))
        lengths += _allocate(total - lengths.sum(), bg_weight, caps - lengths)
        lengths += _allocate(total - lengths.sum(), np.ones(len(regions)), caps - lengths)  # leftovers
        return np.maximum(lengths, np.minimum(caps, width))  # every region gets at least a dash

    def render(lengths: np.ndarray) -> np.ndarray:
        res = np.full((h, w), ignore_index, dtype=np.uint8)
        for (c, comp, path), length, u in zip(regions, lengths, starts_u):
            length = int(round(length))
            if length < 1:
                continue
            start = int(u * (len(path) - length + 1)) if len(path) > length else 0
            res[_draw((h, w), path, start, length, width) & comp] = c
        return res

    # Calibrate on the measured area (strokes overlap themselves at bends and are clipped at region borders).
    total = target / width
    best, best_err = None, np.inf
    for _ in range(4):
        lengths = plan(total)
        res = render(lengths)
        drawn = float((res != ignore_index).sum())
        err = abs(drawn - target)
        if err < best_err:
            best, best_err = res, err
        if drawn == 0 or err <= 0.03 * target:
            break
        total = total * target / drawn
    return best


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + r  # slightly rounder than the strict disk for small radii
