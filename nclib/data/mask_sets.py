"""``prepare`` commands of the binary image / mask sets: MSRA10K (Sec 5.1 at paper scale) and the Weizmann horses
(notebook 04). See :mod:`nclib.data.prepare` for the command line and the layouts they build.
"""
from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .archives import (
    PathLike,
    fetch,
    finish,
    image_size,
    is_complete,
    label_from_bytes,
    open_zip,
    png_bytes,
    progress_bar,
    read_member,
    write_atomic,
)
from .datasets import READ_ERRORS, binary_mask

__all__ = ["MSRA10K_URL", "HORSES_URL", "prepare_msra10k", "prepare_horses", "horse_mask"]

MSRA10K_URL = "http://mftp.mmcheng.net/Data/MSRA10K_Imgs_GT.zip"
#: The Weizmann horses as committed to a public GitHub repository (weizmann_horse_db/rgb + figure_ground).
HORSES_URL = ("https://github.com/shenshutao/image_segmentation/archive/"
              "2653401d6ea617026895aac17059eb57e017abcb.zip")


# --------------------------------------------------------------------------------------------- MSRA10K


def prepare_msra10k(root: PathLike, base_url: Optional[str] = None, cache: Optional[PathLike] = None,
                    progress: bool = True, checksums: Optional[Dict[str, Optional[Tuple[str, str]]]] = None,
                    val_fraction: float = 0.1, seed: int = 0) -> Path:
    """Download MSRA10K into ``root/Imgs`` (``<id>.jpg`` + ``<id>.png``, 0/255) with a fixed train/val split."""
    root = Path(root)
    if is_complete(root, "msra10k"):
        return root
    if not (0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cache = Path(cache) if cache is not None else root / "downloads"
    zpath = fetch(MSRA10K_URL, base_url, cache, checksums, progress)
    imgs = root / "Imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    with open_zip(zpath) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        jpgs = {PurePosixPath(n).stem: n for n in names if n.lower().endswith(".jpg")}
        pngs = {PurePosixPath(n).stem: n for n in names if n.lower().endswith(".png")}
        lonely = sorted(set(jpgs) - set(pngs))
        if lonely:
            raise ValueError(f"image without mask in {zpath}: {jpgs[lonely[0]]} ({len(lonely)} such images)")
        if not jpgs:
            raise ValueError(f"{zpath} holds no .jpg images: not the MSRA10K archive?")
        for iid in progress_bar(sorted(jpgs), len(jpgs), "MSRA10K", progress):
            img = read_member(z, jpgs[iid], zpath)
            mask = label_from_bytes(read_member(z, pngs[iid], zpath), f"{zpath}:{pngs[iid]}")
            size = image_size(img, f"{zpath}:{jpgs[iid]}")
            if mask.shape != size:
                raise ValueError(f"mask {zpath}:{pngs[iid]} has size {mask.shape}, image has {size}")
            write_atomic(imgs / f"{iid}.jpg", img)
            write_atomic(imgs / f"{iid}.png", png_bytes(255 * binary_mask(mask, f"{zpath}:{pngs[iid]}")))
    ids = sorted(jpgs)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, int(round(val_fraction * len(ids))))
    val = sorted(ids[i] for i in perm[:n_val])
    train = sorted(ids[i] for i in perm[n_val:])
    (root / "ImageSets").mkdir(exist_ok=True)
    write_atomic(root / "ImageSets" / "train.txt", ("\n".join(train) + "\n").encode())
    write_atomic(root / "ImageSets" / "val.txt", ("\n".join(val) + "\n").encode())
    finish(root, {"dataset": "msra10k", "images": len(ids), "train": len(train), "val": len(val), "seed": seed,
                   "archives": {zpath.name: zpath.stat().st_size}})
    return root


# --------------------------------------------------------------------------------------------- Weizmann horses


def _rgb_png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _horse_pairs_from_folder(source: Path) -> Tuple[Dict[str, Path], Dict[str, Path]]:
    """({id: image path}, {id: mask path}) of a folder with images/ + masks/."""
    if not (source / "images").is_dir() or not (source / "masks").is_dir():
        raise ValueError(f"--source {source} must hold images/ and masks/ (the layout of the Weizmann horse folder)")
    exts = (".jpg", ".jpeg", ".png", ".bmp")
    images = {p.stem: p for p in sorted((source / "images").iterdir()) if p.suffix.lower() in exts}
    masks = {p.stem: p for p in sorted((source / "masks").iterdir()) if p.suffix.lower() in exts}
    return images, masks


def _horse_pairs_from_zip(names: Sequence[str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """({id: member}, {id: member}) of the archive's weizmann_horse_db/rgb and figure_ground (gray/ is skipped)."""
    images, masks = {}, {}
    for n in names:
        p = PurePosixPath(n)
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png") or "weizmann_horse_db" not in p.parts:
            continue
        if p.parent.name == "rgb":
            images[p.stem] = n
        elif p.parent.name == "figure_ground":
            masks[p.stem] = n
    return images, masks


def horse_mask(data: bytes, name: str, tolerance: int = 64, max_unsure: float = 0.05) -> np.ndarray:
    """(H, W) uint8 in {0, 255} from an encoded figure/ground mask: grey levels thresholded at 128.

    JPEG ringing is tolerated: a mask with more than ``max_unsure`` of its pixels farther than ``tolerance`` from
    both 0 and 255, or with colour (channels that differ), is not binary and a ValueError names the file.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB") if im.mode not in ("L", "1") else im.convert("L"))
    except READ_ERRORS as e:
        raise ValueError(f"cannot read mask {name}: {e}") from e
    if arr.ndim == 3:
        spread = arr.max(axis=2).astype(np.int16) - arr.min(axis=2)
        if (spread > tolerance).mean() > max_unsure:
            raise ValueError(f"mask {name} is a colour image, not a binary figure/ground mask")
        arr = arr[..., 0]
    if arr.max() <= 1:
        arr = arr * 255
    unsure = np.minimum(arr, 255 - arr.astype(np.int16)) > tolerance
    if unsure.mean() > max_unsure:
        raise ValueError(f"mask {name} is not binary: {100 * unsure.mean():.1f} % of its pixels are farther than "
                         f"{tolerance} from both 0 and 255 (at most {100 * max_unsure:g} % allowed)")
    return np.where(arr >= 128, 255, 0).astype(np.uint8)


def _horse_image(data: bytes, name: str, size: Tuple[int, int], mask_name: str,
                 max_aspect_change: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB resized to ``size`` (H, W) of its mask with area interpolation."""
    import cv2

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.array(im.convert("RGB"))
    except READ_ERRORS as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    (h, w), (mh, mw) = rgb.shape[:2], size
    change = abs((mw / mh) / (w / h) - 1)
    if change > max_aspect_change:
        raise ValueError(f"mask {mask_name} ({mw}x{mh}) is not a resized copy of image {name} ({w}x{h}): aspect "
                         f"ratios differ by {100 * change:.1f} % (at most {100 * max_aspect_change:g} %)")
    if (h, w) == (mh, mw):
        return rgb
    return cv2.resize(rgb, (mw, mh), interpolation=cv2.INTER_AREA)


def prepare_horses(root: PathLike, source: Optional[PathLike] = None, base_url: Optional[str] = None,
                   cache: Optional[PathLike] = None, progress: bool = True,
                   checksums: Optional[Dict[str, Optional[Tuple[str, str]]]] = None, val_count: int = 100,
                   seed: int = 0, max_aspect_change: float = 0.02) -> Path:
    """The Weizmann horses (Borenstein & Ullman 2002; 328 photos) in the ``pairs`` layout of MaskFolderDataset.

    ``root`` gets ``images/<id>.png`` (RGB, resized to its mask's size with area interpolation: the archive's
    masks are smaller than its photos), ``masks/<id>.png`` (0/255, thresholded at 128), ``ImageSets/{train,val}.txt``
    (``val_count`` ids of a fixed permutation with ``seed``; 228 / 100 for the full set) and ``meta.json``.
    Read from ``source`` (a folder with ``images/`` + ``masks/``) or else the public archive :data:`HORSES_URL`
    (``weizmann_horse_db/rgb`` + ``figure_ground``). A lone image or mask, a mask whose aspect ratio differs from
    its image's by more than ``max_aspect_change``, or a non-binary mask: a ValueError naming the file.
    """
    root = Path(root)
    if is_complete(root, "horses"):
        return root
    if not (isinstance(val_count, int) and val_count >= 1):
        raise ValueError(f"val_count must be an int >= 1, got {val_count!r}")
    archive = None
    if source is not None:
        where = Path(source)
        images, masks = _horse_pairs_from_folder(where)
        read = lambda ref: Path(ref).read_bytes()  # noqa: E731
        label = str
    else:
        cache = Path(cache) if cache is not None else root / "downloads"
        where = fetch(HORSES_URL, base_url, cache, checksums, progress)
        archive = open_zip(where)
        names = [n for n in archive.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        images, masks = _horse_pairs_from_zip(names)
        read = lambda ref: read_member(archive, ref, where)  # noqa: E731
        label = lambda ref: f"{where}:{ref}"  # noqa: E731
    try:
        lonely = sorted(set(images) - set(masks))
        if lonely:
            raise ValueError(f"image without mask: {label(images[lonely[0]])} ({len(lonely)} such images)")
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(f"mask without image: {label(masks[orphans[0]])} ({len(orphans)} such masks)")
        if not images:
            raise ValueError(f"{where} holds no horse images (expected images/ + masks/, or the archive's "
                             f"weizmann_horse_db/rgb + figure_ground)")
        ids = sorted(images)
        if val_count >= len(ids):
            raise ValueError(f"val_count {val_count} leaves no training images among {len(ids)}")
        for sub in ("images", "masks", "ImageSets"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for iid in progress_bar(ids, len(ids), "horses", progress):
            mask = horse_mask(read(masks[iid]), label(masks[iid]))
            rgb = _horse_image(read(images[iid]), label(images[iid]), mask.shape, label(masks[iid]),
                               max_aspect_change)
            write_atomic(root / "images" / f"{iid}.png", _rgb_png_bytes(rgb))
            write_atomic(root / "masks" / f"{iid}.png", png_bytes(mask))
    finally:
        if archive is not None:
            archive.close()
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:val_count])
    train = sorted(ids[i] for i in perm[val_count:])
    write_atomic(root / "ImageSets" / "train.txt", ("\n".join(train) + "\n").encode())
    write_atomic(root / "ImageSets" / "val.txt", ("\n".join(val) + "\n").encode())
    src = {"folder": str(where)} if source is not None else {"archives": {where.name: where.stat().st_size}}
    finish(root, {"dataset": "horses", "images": len(ids), "train": len(train), "val": len(val), "seed": seed, **src})
    return root
