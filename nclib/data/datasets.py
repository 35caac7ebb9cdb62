"""Torch datasets over the VOC + ScribbleSup layout and over folders of image/mask pairs.

Every sample is a dict of tensors: ``image`` float32 (3, H, W) RGB 0..255, ``scribble`` int64 (H, W) with
255 = unlabelled, ``mask`` int64 (H, W) with 255 = void, ``id`` str. Labels are checked on load: a value outside
``[0, num_classes)`` other than 255 is rejected with the file name (a wrong palette or a corrupt file would
otherwise train silently on garbage).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .labels import IGNORE_LABEL
from .scribbles import synthesize_scribbles

__all__ = [
    "IGNORE_LABEL",
    "VOC_CLASS_NAMES",
    "VOCScribbleDataset",
    "MaskFolderDataset",
    "read_image",
    "read_label",
    "binary_mask",
    "prepare_command",
    "READ_ERRORS",
]

#: what reading an image file can raise: unreadable / truncated files, and PIL's refusal of images whose pixel count
#: suggests a decompression bomb (``PIL.Image.MAX_IMAGE_PIXELS``); turned into a ValueError naming the file
READ_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

PathLike = Union[str, os.PathLike]


def prepare_command(kind: str, root: PathLike) -> str:
    """The shell command that fetches a data set into ``root``."""
    if kind == "default":
        return f"python -m nclib.data make-default --root {root}"
    return f"python -m nclib.data prepare {kind} --root {root}"


def read_image(path: PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a missing or unreadable file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except READ_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def read_label(path: PathLike) -> np.ndarray:
    """(H, W) uint8 label indices; palette PNGs give their indices, not their colours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"label file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                arr = np.asarray(im)
            elif im.mode in ("I;16", "I"):
                arr = np.asarray(im).astype(np.int64)
            else:
                arr = np.asarray(im.convert("L"))
            return np.array(arr)
    except READ_ERRORS as e:
        raise ValueError(f"cannot read label image {path}: {e}") from e


def binary_mask(arr: np.ndarray, path: Union[PathLike, str], threshold: int = 128) -> np.ndarray:
    """(H, W) uint8 in {0, 1} from a binary mask's values: {0, 1} and {0, 255} as they are; a JPEG mask (ringing)
    thresholded at ``threshold``; other values in a lossless file are an error naming it (a wrong palette or a
    label map would otherwise become a silently wrong mask)."""
    vals = np.unique(arr)
    if vals.size and vals.max() <= 1 and vals.min() >= 0:
        return arr.astype(np.uint8)
    if set(vals.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    shown = vals.tolist()[:8]
    if str(path).lower().endswith((".jpg", ".jpeg")):
        if vals.max() < threshold:
            raise ValueError(f"mask {path} has values up to {vals.max()}, all below the threshold {threshold}: a 0/1 "
                             f"mask saved as JPEG? Save binary masks as PNG with values 0/1 or 0/255")
        return (arr >= threshold).astype(np.uint8)
    raise ValueError(f"mask {path} has values {shown}{' ...' if vals.size > 8 else ''}: a binary mask holds "
                     f"{{0, 1}} or {{0, 255}}")


def _check_labels(arr: np.ndarray, num_classes: int, path: Path, what: str) -> None:
    bad = (arr != IGNORE_LABEL) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        vals = sorted(np.unique(arr[bad]).tolist())[:8]
        raise ValueError(
            f"{what} {path} has labels {vals} outside [0, {num_classes}) (255 = unlabelled/void is allowed)"
        )


def _to_sample(image: np.ndarray, scribble: np.ndarray, mask: np.ndarray, iid: str) -> Dict[str, object]:
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
        "scribble": torch.from_numpy(scribble.astype(np.int64)),
        "mask": torch.from_numpy(mask.astype(np.int64)),
        "id": iid,
    }


def _read_list(path: Path, kind: str, root: Path) -> List[str]:
    if not path.is_file():
        raise ValueError(f"split list not found: {path}. Fetch the data set with `{prepare_command(kind, root)}`")
    ids = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    # VOC lists sometimes hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs: keep the stem.
    return [Path(i).stem if "/" in i else i for i in ids]


class VOCScribbleDataset(Dataset):
    """PASCAL VOC 2012 (+ SBD) with ScribbleSup scribbles, or any folder in that layout (the default set).

    Layout under ``root``: ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (255 = void),
    ``<scribble_dir>/<id>.png`` (class index on the strokes, 255 elsewhere), ``ImageSets/Segmentation/<split>.txt``.
    ``num_classes`` defaults to the lines of ``root/class_names.txt`` if present, else 21 (VOC).
    Missing scribbles are an error for training splits (``split`` starting with "train") and all-255 otherwise,
    unless ``require_scribbles`` says so explicitly.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[Callable[[dict], dict]] = None,
        scribble_dir: str = "pascal_2012_scribble",
        num_classes: Optional[int] = None,
        mask_dir: str = "SegmentationClassAug",
        require_scribbles: Optional[bool] = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.scribble_dir = scribble_dir
        self.mask_dir = mask_dir
        kind = "voc"
        names_file = self.root / "class_names.txt"
        if names_file.is_file():
            kind = "default"
            names = tuple(n.strip() for n in names_file.read_text().splitlines() if n.strip())
        else:
            names = VOC_CLASS_NAMES
        if num_classes is None:
            num_classes = len(names)
        if not (1 < num_classes < IGNORE_LABEL - 1):
            raise ValueError(f"num_classes must be in [2, 253], got {num_classes}")
        if len(names) != num_classes:
            names = tuple(f"class_{i}" for i in range(num_classes))
        self.num_classes = int(num_classes)
        self.class_names: Tuple[str, ...] = names
        if not self.root.is_dir():
            raise ValueError(f"data set folder not found: {self.root}. Fetch it with `{prepare_command(kind, self.root)}`")
        fetch_root = self.root.parent if kind == "default" else self.root
        self.ids = _read_list(self.root / "ImageSets" / "Segmentation" / f"{split}.txt", kind, fetch_root)
        if not self.ids:
            raise ValueError(f"split list {split}.txt under {self.root} is empty")
        self.require_scribbles = split.startswith("train") if require_scribbles is None else require_scribbles
        first = self.root / "JPEGImages" / f"{self.ids[0]}.jpg"
        if not first.is_file():
            raise ValueError(f"image file not found: {first}. Fetch the data set with `{prepare_command(kind, fetch_root)}`")
        if self.require_scribbles and not (self.root / scribble_dir).is_dir():
            raise ValueError(
                f"scribble folder not found: {self.root / scribble_dir}. Fetch it with `{prepare_command(kind, fetch_root)}`"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Dict[str, object]:
        """The untransformed sample ``index``."""
        iid = self.ids[index]
        ipath = self.root / "JPEGImages" / f"{iid}.jpg"
        mpath = self.root / self.mask_dir / f"{iid}.png"
        spath = self.root / self.scribble_dir / f"{iid}.png"
        image = read_image(ipath)
        mask = read_label(mpath)
        _check_labels(mask, self.num_classes, mpath, "mask")
        if spath.is_file():
            scribble = read_label(spath)
            _check_labels(scribble, self.num_classes, spath, "scribble")
        elif self.require_scribbles:
            raise ValueError(f"scribble file not found: {spath} (image {ipath})")
        else:
            scribble = np.full(mask.shape, IGNORE_LABEL, dtype=np.uint8)
        for what, arr, p in (("mask", mask, mpath), ("scribble", scribble, spath)):
            if arr.shape != image.shape[:2]:
                raise ValueError(f"{what} {p} has size {arr.shape} but image {ipath} has {image.shape[:2]}")
        return _to_sample(image, scribble, mask, iid)

    def __getitem__(self, index: int) -> Dict[str, object]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


class MaskFolderDataset(Dataset):
    """Image/mask pairs from a folder: binary segmentation (mask 0/1) with synthesized scribbles.

    Recognised layouts (``layout="auto"``):

    * ``msra``: ``Imgs/<id>.jpg`` beside ``Imgs/<id>.png`` (MSRA10K, the default salient set);
      splits from ``ImageSets/<split>.txt``.
    * ``pairs``: ``images/<name>.<ext>`` with ``masks/<name>.<ext>`` (e.g. the Weizmann horses; ``image_dir`` /
      ``mask_dir`` rename the folders). Where sizes differ the image is resized to the mask's size (area
      interpolation), as SOURCE.md of the horse set prescribes.

    Masks hold {0, 1} or {0, 255}; JPEG masks (ringing) are thresholded, ``mask >= threshold`` is foreground;
    other values are an error naming the file, and so is an image/mask size mismatch in the msra layout. ``scribbles`` is
    "synthesize" (ScribbleSup-like strokes, seeded by ``seed`` and the id, so fixed per image) or "none" (all 255).
    ``split=None`` takes every pair; with a split name and no list file the pairs are split deterministically
    (every ``val_every``-th sorted id goes to "val").
    """

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = None,
        transform: Optional[Callable[[dict], dict]] = None,
        layout: str = "auto",
        image_dir: Optional[str] = None,
        mask_dir: Optional[str] = None,
        threshold: int = 128,
        scribbles: str = "synthesize",
        scribble_fraction: float = 0.03,
        seed: int = 0,
        class_names: Sequence[str] = ("background", "foreground"),
        val_every: int = 10,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.threshold = int(threshold)
        if scribbles not in ("synthesize", "none"):
            raise ValueError(f"scribbles must be 'synthesize' or 'none', got {scribbles!r}")
        self.scribbles = scribbles
        self.scribble_fraction = scribble_fraction
        self.seed = int(seed)
        self.num_classes = 2
        self.class_names = tuple(class_names)
        if not self.root.is_dir():
            raise ValueError(
                f"data set folder not found: {self.root}. For MSRA10K run `{prepare_command('msra10k', self.root)}`; "
                f"for the Weizmann horses `{prepare_command('horses', self.root)}`; "
                f"the default salient set is made by `{prepare_command('default', self.root.parent)}`"
            )
        if layout == "auto":
            if (self.root / "Imgs").is_dir():
                layout = "msra"
            elif (self.root / (image_dir or "images")).is_dir() and (self.root / (mask_dir or "masks")).is_dir():
                layout = "pairs"
            else:
                raise ValueError(
                    f"{self.root} has neither Imgs/ (MSRA layout) nor images/ + masks/ folders; "
                    f"pass layout/image_dir/mask_dir"
                )
        if layout not in ("msra", "pairs"):
            raise ValueError(f"layout must be 'auto', 'msra' or 'pairs', got {layout!r}")
        self.layout = layout
        self.pairs = self._pairs(image_dir, mask_dir)
        if not self.pairs:
            raise ValueError(f"no image/mask pairs found under {self.root}")
        ids = sorted(self.pairs)
        if split is not None:
            lst = self.root / "ImageSets" / f"{split}.txt"
            if lst.is_file():
                wanted = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
                missing = [i for i in wanted if i not in self.pairs]
                if missing:
                    raise ValueError(f"{lst} lists {len(missing)} ids without an image/mask pair, e.g. {missing[0]}")
                ids = wanted
            elif split in ("train", "val"):
                ids = [i for k, i in enumerate(ids) if (k % val_every == val_every - 1) == (split == "val")]
            else:
                raise ValueError(f"split list not found: {lst} (only train/val can be derived)")
        self.ids = ids

    def _pairs(self, image_dir: Optional[str], mask_dir: Optional[str]) -> Dict[str, Tuple[Path, Path]]:
        if self.layout == "msra":
            folder = self.root / (image_dir or "Imgs")
            images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
            masks = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png"}
        else:
            ifold, mfold = self.root / (image_dir or "images"), self.root / (mask_dir or "masks")
            images = {p.stem: p for p in ifold.iterdir() if p.suffix.lower() in _IMAGE_EXTS}
            masks = {p.stem: p for p in mfold.iterdir() if p.suffix.lower() in _IMAGE_EXTS}
        lonely = sorted(set(images) - set(masks))
        if lonely:
            raise ValueError(f"image without mask: {images[lonely[0]]} ({len(lonely)} such images)")
        return {k: (images[k], masks[k]) for k in images}

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Dict[str, object]:
        """The untransformed sample ``index``."""
        import cv2

        iid = self.ids[index]
        ipath, mpath = self.pairs[iid]
        image = read_image(ipath)
        mask = binary_mask(read_label(mpath), mpath, self.threshold)
        if image.shape[:2] != mask.shape:
            if self.layout == "msra":  # MSRA10K's masks are pixel-aligned with their images: a mismatch is an error
                raise ValueError(f"mask {mpath} has size {mask.shape} but image {ipath} has {image.shape[:2]}")
            image = cv2.resize(image, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_AREA)
        if self.scribbles == "synthesize":
            seed = self.seed * 1_000_003 + zlib.crc32(iid.encode())
            scribble = synthesize_scribbles(mask, 2, seed=seed, fraction=self.scribble_fraction)
        else:
            scribble = np.full(mask.shape, IGNORE_LABEL, dtype=np.uint8)
        return _to_sample(image, scribble, mask, iid)

    def __getitem__(self, index: int) -> Dict[str, object]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample
