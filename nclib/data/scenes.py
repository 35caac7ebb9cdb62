"""The default set's scenes: real-photo textures on shapes, drawn deterministically from a seed (no files).

* :func:`render_scene` -- a multi-class scene: 6 object classes (disk, square, triangle, star, cross, ring), each
  filled with a class-typical texture cut from a real photograph bundled with scikit-image, on other real
  photographs as background (sometimes two split by a wavy horizon, sometimes with a distractor blob wearing an
  object texture, so texture alone does not decide the class). Objects vary in size, rotate, touch and occlude
  one another; the mask is exact (the image is composited from it).
* :func:`render_salient` -- one salient object (a shape or a blob) for the MSRA10K-layout binary set.

Image ``index`` is drawn from ``np.random.default_rng([seed, part, index])``: no hidden state, any subset can be
redrawn byte for byte. :mod:`nclib.data.default` writes them to disk.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

__all__ = ["DEFAULT_SIZE", "render_scene", "render_salient"]

#: side of a generated image, pixels
DEFAULT_SIZE = 112

# Class -> (photo, RGB tint for grey photos or None to keep colours). Only photos bundled in scikit-image whose
# docstring states public domain or CC0 (moon and page state no licence and are left out).
_CLASS_TEXTURES: Dict[int, Tuple[str, Optional[Tuple[float, float, float]]]] = {
    1: ("coffee", None),
    2: ("brick", (1.25, 0.62, 0.45)),
    3: ("grass", (0.55, 1.15, 0.45)),
    4: ("chelsea", None),
    5: ("gravel", (0.55, 0.65, 1.3)),
    6: ("immunohistochemistry", None),
}
_BACKGROUND_PHOTOS = ("astronaut", "rocket", "camera", "retina", "coins", "hubble_deep_field", "text",
                      "cell", "clock")


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """(H, W) or (H, W, 3) float32 photo 0..255 bundled with scikit-image."""
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.ndim == 3:
        img = img[..., :3]
    return img.astype(np.float32)


def _texture(name: str, tint, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32 patch: random crop of a photo at a random scale, rotation, flip and photometric jitter."""
    src = _photo(name)
    sh, sw = src.shape[:2]
    side = int(min(sh, sw, max(h, w) * rng.uniform(0.7, 2.2)))
    side = max(side, 8)
    y0 = int(rng.integers(0, sh - side + 1))
    x0 = int(rng.integers(0, sw - side + 1))
    patch = src[y0 : y0 + side, x0 : x0 + side]
    patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA if side > max(h, w) else cv2.INTER_LINEAR)
    k = int(rng.integers(0, 4))
    patch = np.rot90(patch, k)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if patch.shape[:2] != (h, w):  # rot90 of a non-square patch
        patch = cv2.resize(np.ascontiguousarray(patch), (w, h), interpolation=cv2.INTER_LINEAR)
    if patch.ndim == 2:
        if tint is None:
            tint = tuple(rng.uniform(0.75, 1.25, size=3))
        patch = patch[..., None] * np.asarray(tint, dtype=np.float32)[None, None]
    patch = np.ascontiguousarray(patch, dtype=np.float32)
    contrast = rng.uniform(0.8, 1.2)
    bright = rng.uniform(-15, 15)
    colour = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    mean = patch.mean(axis=(0, 1), keepdims=True)
    patch = (patch - mean) * contrast + mean * colour + bright
    return patch


def _shape_mask(cls: int, size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool mask of one object of class ``cls`` centred at (cx, cy) with radius ``r`` pixels."""
    theta = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.7, 1.0)

    def poly(points: np.ndarray) -> np.ndarray:
        c, s = np.cos(theta), np.sin(theta)
        x = points[:, 0] * c - points[:, 1] * s + cx
        y = points[:, 0] * s + points[:, 1] * c + cy
        return np.round(np.stack([x, y], axis=1) * 16).astype(np.int32)  # 4 fractional bits

    def fill(points: np.ndarray) -> np.ndarray:
        m = np.zeros((size, size), dtype=np.uint8)
        cv2.fillPoly(m, [poly(points)], 1, lineType=cv2.LINE_8, shift=4)
        return m.astype(bool)

    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    if cls in (1, 6):  # disk, ring
        m = fill(np.stack([r * np.cos(t), r * aspect * np.sin(t)], axis=1))
        if cls == 6:
            q = rng.uniform(0.45, 0.6)
            m &= ~fill(np.stack([q * r * np.cos(t), q * r * aspect * np.sin(t)], axis=1))
        return m
    if cls == 2:  # square / rectangle
        a, b = r * 0.85, r * 0.85 * aspect
        return fill(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]))
    if cls == 3:  # triangle
        ang = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.15, 0.15, size=3)
        rad = r * rng.uniform(0.9, 1.1, size=3)
        return fill(np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1))
    if cls == 4:  # five-pointed star
        inner = rng.uniform(0.4, 0.5)
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * inner)
        return fill(np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1))
    if cls == 5:  # plus-shaped cross
        a = r * rng.uniform(0.28, 0.36)
        p = np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a],
                      [-r, -a], [-a, -a]])
        return fill(p)
    raise ValueError(f"unknown class {cls}")


def _blob(size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular smooth blob (no shape family): a radius modulated by a few random harmonics."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += rng.uniform(0, 0.35 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = r * rad / rad.max()
    pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
    m = np.zeros((size, size), dtype=np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) real-photo background, sometimes two photos split by a wavy horizon."""
    names = rng.choice(len(_BACKGROUND_PHOTOS), size=2, replace=False)
    img = _texture(_BACKGROUND_PHOTOS[names[0]], None, size, size, rng)
    if rng.random() < 0.5:
        other = _texture(_BACKGROUND_PHOTOS[names[1]], None, size, size, rng)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        d = (xx - size / 2) * np.cos(ang) + (yy - size / 2) * np.sin(ang)
        d += rng.uniform(2, 8) * np.sin(
            ((xx * np.sin(ang) - yy * np.cos(ang)) / size) * rng.uniform(3, 9) + rng.uniform(0, 6.3)
        )
        img = np.where((d > rng.uniform(-size / 4, size / 4))[..., None], other, img)
    return img


def _shade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiply by a gentle linear illumination gradient."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    g = 1.0 + rng.uniform(0.0, 0.35) * (xx * np.cos(ang) + yy * np.sin(ang))
    return img * g[..., None]


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img + rng.normal(0, 2.0, size=img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_scene(seed: int, split_code: int, index: int, size: int = DEFAULT_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """One multi-class scene: (size, size, 3) uint8 RGB image and (size, size) uint8 mask in 0..6."""
    rng = np.random.default_rng([seed, split_code, index])
    img = _shade(_background(size, rng), rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    # Distractor: a shapeless blob wearing an object texture, labelled background.
    if rng.random() < 0.35:
        cls = int(rng.integers(1, 7))
        r = size * rng.uniform(0.12, 0.25)
        blob = _blob(size, rng.uniform(0, size), rng.uniform(0, size), r, rng)
        img[blob] = _texture(*_CLASS_TEXTURES[cls], size, size, rng)[blob]
    n = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.35, 0.2]))
    prev = None
    for _ in range(n):
        cls = int(rng.integers(1, 7))
        r = size * rng.uniform(0.13, 0.33)
        if prev is not None and rng.random() < 0.45:  # touch or overlap the previous object
            a = rng.uniform(0, 2 * np.pi)
            d = (prev[2] + r) * rng.uniform(0.65, 1.0)
            cx, cy = prev[0] + d * np.cos(a), prev[1] + d * np.sin(a)
        else:
            cx, cy = rng.uniform(0.15 * size, 0.85 * size, size=2)
        m = _shape_mask(cls, size, cx, cy, r, rng)
        if m.sum() == 0:
            continue
        tex = _shade(_texture(*_CLASS_TEXTURES[cls], size, size, rng), rng)
        img[m] = tex[m]
        mask[m] = cls
        prev = (cx, cy, r)
    return _finish(img, rng), mask


def render_salient(seed: int, index: int, size: int = DEFAULT_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """One salient-object image: (size, size, 3) uint8 RGB and (size, size) uint8 mask 0/255."""
    rng = np.random.default_rng([seed, 2, index])
    img = _shade(_background(size, rng), rng)
    cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
    r = size * rng.uniform(0.22, 0.38)
    kind = int(rng.integers(0, 7))
    m = _blob(size, cx, cy, r, rng) if kind == 0 else _shape_mask(kind, size, cx, cy, r, rng)
    src = int(rng.integers(1, 7))
    tex = _shade(_texture(*_CLASS_TEXTURES[src], size, size, rng), rng)
    img[m] = tex[m]
    return _finish(img, rng), (m * 255).astype(np.uint8)
