"""The embedded default data set: small real-texture scenes generated on first use (no download).

Two parts under ``default_root()`` (``<repo>/data/default``, or ``$NCLIB_DATA``):

* ``scribble/`` -- multi-class segmentation in the VOC + ScribbleSup layout: 6 object classes + background.
  Each class is a shape family (disk, square, triangle, star, cross, ring) filled with a class-typical texture cut
  from a real photograph bundled with scikit-image; backgrounds are other real photographs, sometimes two of them
  split by a wavy horizon, sometimes with a distractor blob wearing an object texture (so texture alone does not
  decide the class). Objects vary in size, rotate, touch and occlude one another; masks are exact (the image is
  composited from the very masks that are stored). Scribbles come from :func:`synthesize_scribbles`.
* ``salient/`` -- binary salient-object segmentation in the MSRA10K layout (``Imgs/<id>.jpg`` + ``<id>.png``,
  masks 0/255) plus ``ImageSets/{train,val}.txt``.

Generation is deterministic: image ``i`` of a split is drawn from ``np.random.default_rng([seed, part, i])``, so a
``count``-limited build reproduces the first images of the full one byte for byte. The build goes to a temporary
folder that is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from .scribbles import labelled_fraction, synthesize_scribbles

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "DEFAULT_SEED",
    "DEFAULT_SIZE",
    "DEFAULT_COUNTS",
    "GENERATOR_VERSION",
    "PRETRAIN_COUNTS",
    "PRETRAIN_SEED",
    "default_root",
    "ensure_default",
    "make_default",
    "render_scene",
    "render_salient",
]

GENERATOR_VERSION = 3
DEFAULT_SEED = 0
DEFAULT_SIZE = 112
#: images per split: scribble train / val, salient train / val
DEFAULT_COUNTS = {"train": 400, "val": 120, "salient_train": 300, "salient_val": 100}
#: the regime's pre-training set (notebooks 03-04, ``data/pretrain``): the same generator with another seed, so its
#: images are disjoint from the default train/val; 4800 train images (with 400 its own val mIoU
#: plateaus at 70 %; with 4800, 78 %; AdamW, small network, stride 8).
PRETRAIN_SEED = 1
PRETRAIN_COUNTS = {"train": 4800, "val": 120, "salient_train": 0, "salient_val": 0}
DEFAULT_CLASS_NAMES = ("background", "disk", "square", "triangle", "star", "cross", "ring")
SCRIBBLE_FRACTION = 0.03
JPEG_QUALITY = 92
_MARKER = "meta.json"

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


def default_root() -> Path:
    """``$NCLIB_DATA`` if set, else ``<repo>/data/default`` (the repo root is the parent of the nclib package)."""
    env = os.environ.get("NCLIB_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data" / "default"


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


def _save_jpg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb, mode="RGB").save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0,
                                          optimize=False)


def _save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr, mode="L").save(path, format="PNG", optimize=False)


def _build(out: Path, seed: int, counts: Dict[str, int], size: int) -> dict:
    sc = out / "scribble"
    for sub in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/Segmentation"):
        (sc / sub).mkdir(parents=True, exist_ok=True)
    stats: Dict[str, dict] = {}
    for code, split in enumerate(("train", "val")):
        ids: List[str] = []
        labelled = []
        pix = np.zeros(len(DEFAULT_CLASS_NAMES), dtype=np.int64)
        for i in range(counts[split]):
            iid = f"{split}_{i:04d}"
            img, mask = render_scene(seed, code, i, size)
            scr = synthesize_scribbles(mask, len(DEFAULT_CLASS_NAMES), seed=(seed * 1_000_003 + code * 100_003 + i),
                                       fraction=SCRIBBLE_FRACTION)
            _save_jpg(sc / "JPEGImages" / f"{iid}.jpg", img)
            _save_png(sc / "SegmentationClassAug" / f"{iid}.png", mask)
            _save_png(sc / "pascal_2012_scribble" / f"{iid}.png", scr)
            ids.append(iid)
            labelled.append(labelled_fraction(scr))
            pix += np.bincount(mask.ravel(), minlength=len(DEFAULT_CLASS_NAMES))
        (sc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        stats[split] = {
            "images": len(ids),
            "labelled_fraction_mean": float(np.mean(labelled)) if labelled else 0.0,
            "class_pixel_fraction": (pix / max(pix.sum(), 1)).round(4).tolist(),
        }
    (sc / "class_names.txt").write_text("\n".join(DEFAULT_CLASS_NAMES) + "\n")

    sal = out / "salient"
    (sal / "Imgs").mkdir(parents=True, exist_ok=True)
    (sal / "ImageSets").mkdir(parents=True, exist_ok=True)
    n_tr, n_va = counts["salient_train"], counts["salient_val"]
    ids = [f"sal_{i:04d}" for i in range(n_tr + n_va)]
    fg = []
    for i, iid in enumerate(ids):
        img, m = render_salient(seed, i, size)
        _save_jpg(sal / "Imgs" / f"{iid}.jpg", img)
        _save_png(sal / "Imgs" / f"{iid}.png", m)
        fg.append(float((m > 0).mean()))
    (sal / "ImageSets" / "train.txt").write_text("\n".join(ids[:n_tr]) + "\n")
    (sal / "ImageSets" / "val.txt").write_text("\n".join(ids[n_tr:]) + "\n")
    stats["salient"] = {"images": len(ids), "train": n_tr, "val": n_va,
                        "foreground_fraction_mean": float(np.mean(fg)) if fg else 0.0}
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "counts": counts,
            "class_names": list(DEFAULT_CLASS_NAMES), "scribble_fraction_target": SCRIBBLE_FRACTION, "stats": stats}
    (out / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def make_default(root: Optional[os.PathLike] = None, seed: int = DEFAULT_SEED, force: bool = False,
                 count: Optional[int] = None, size: int = DEFAULT_SIZE,
                 counts: Optional[Dict[str, int]] = None) -> Path:
    """Generate the default set into ``root`` (atomically). ``count`` caps every split (for quick tests);
    ``counts`` sets split sizes (keys of ``DEFAULT_COUNTS``; e.g. a larger pre-training set). An existing set is
    kept unless ``force`` or, when ``counts`` is given, its ``meta.json`` records another seed or other sizes."""
    root = Path(root) if root is not None else default_root()
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    wanted, explicit = dict(DEFAULT_COUNTS), counts is not None
    if explicit:
        bad = sorted(set(counts) - set(DEFAULT_COUNTS))
        if bad or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            raise ValueError(f"counts must map {sorted(DEFAULT_COUNTS)} to ints >= 0, got {counts!r}")
        wanted.update(counts)
    if count is not None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        wanted = {k: min(v, count) for k, v in wanted.items()}
    counts = wanted
    if root.exists() and not root.is_dir():
        raise ValueError(f"--root {root} is a file, not a folder")
    if root.exists() and not force:
        meta = _meta(root)
        if not explicit or (meta.get("counts") == counts and meta.get("seed") == seed):
            return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    except OSError as err:
        raise ValueError(f"cannot create the default data set under {root.parent}: "
                         f"{err.strerror or err} ({type(err).__name__})") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
    try:
        with _terminate_as_exit():
            _build(tmp, seed, counts, size)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / _MARKER).exists():  # somebody else won a race but left nothing usable
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _sweep_stale(root: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` build folders left by builds that were killed (their process is gone)."""
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        pid = p.name[len(f".{root.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _terminate_as_exit:
    """SIGTERM (``kill``, a job scheduler) raises SystemExit during the build, so its temporary folder is removed;
    SIGKILL cannot be caught: the next build sweeps what it leaves (:func:`_sweep_stale`)."""

    def __enter__(self):
        import signal
        import threading

        self.prev = None
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)

            self.prev = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc) -> None:
        if self.prev is not None:
            import signal

            signal.signal(signal.SIGTERM, self.prev)


def ensure_default(root: Optional[os.PathLike] = None) -> Path:
    """Return the default set's root, generating it first (seed 0, about 15 s) if it is missing or was made by an
    older generator version. Concurrent callers wait on a lock file (in the temp folder) instead of racing."""
    root = Path(root) if root is not None else default_root()
    if _current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    with _lock(Path(tempfile.gettempdir()) / f"nclib-default-{key}.lock"):
        if _current(root):  # somebody else made it while we waited
            return root
        marker = root / _MARKER
        if marker.exists():
            return make_default(root, seed=int(_meta(root).get("seed", DEFAULT_SEED)), force=True)
        if root.exists() and any(root.iterdir()):
            raise ValueError(
                f"{root} exists but has no {_MARKER}: not a complete default data set. Remove it or run "
                f"`python -m nclib.data make-default --root {root} --force`"
            )
        return make_default(root, force=True)


def _meta(root: Path) -> dict:
    try:
        return json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _current(root: Path) -> bool:
    """A complete set from this generator version or a newer one (never downgrade a newer copy)."""
    return int(_meta(root).get("generator_version", -1)) >= GENERATOR_VERSION


class _lock:
    """Exclusive advisory lock on a file (POSIX ``flock``; no-op where unavailable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
