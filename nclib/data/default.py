"""The embedded default data set: small real-texture scenes generated on first use (no download).

Two parts under ``default_root()`` (``<repo>/data/default``, or ``$NCLIB_DATA``):

* ``scribble/`` -- multi-class segmentation in the VOC + ScribbleSup layout: 6 object classes + background.
  Each class is a shape family (disk, square, triangle, star, cross, ring) filled with a class-typical texture cut
  from a real photograph bundled with scikit-image; backgrounds are other real photographs, sometimes two of them
  split by a wavy horizon, sometimes with a distractor blob wearing an object texture (so texture alone does not
  decide the class). Objects vary in size, rotate, touch and occlude one another; masks are exact (the image is
  composited from the very masks that are stored); drawn by :mod:`nclib.data.scenes`. Scribbles come from
  :func:`synthesize_scribbles`.
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
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from .scenes import DEFAULT_SIZE, render_salient, render_scene
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

def default_root() -> Path:
    """``$NCLIB_DATA`` if set, else ``<repo>/data/default`` (the repo root is the parent of the nclib package)."""
    env = os.environ.get("NCLIB_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data" / "default"


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
