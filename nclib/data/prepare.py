"""Fetch and convert the real data sets: PASCAL VOC 2012 + SBD + ScribbleSup, and MSRA10K.

``python -m nclib.data prepare voc --root data/voc`` builds, under ``root``::

    JPEGImages/<id>.jpg                 VOC 2012 images
    SegmentationClassAug/<id>.png       VOC masks where VOC has them, else SBD's (GTcls.Segmentation), 255 = void
    pascal_2012_scribble/<id>.png       ScribbleSup scribbles (rloss PNGs, or rasterized from the XML polylines)
    ImageSets/Segmentation/train_aug.txt  VOC train + SBD train + SBD val minus VOC val (10,582 ids)
    ImageSets/Segmentation/val.txt        VOC val (1,449 ids);  train.txt: VOC train (1,464 ids)
    meta.json                           written last: the folder is complete

``python -m nclib.data prepare msra10k --root data/msra10k`` builds ``Imgs/<id>.jpg`` + ``Imgs/<id>.png`` and
``ImageSets/{train,val}.txt`` (a fixed permutation of the sorted ids, seed 0, 10% val).

``python -m nclib.data prepare horses --root data/horses [--source DIR]`` builds ``images/<id>.png`` +
``masks/<id>.png`` (0/255) and ``ImageSets/{train,val}.txt`` (228 / 100, a fixed permutation, seed 0) from the public
archive or a local folder with ``images/`` + ``masks/``.

Archives go to ``<root>/downloads`` (resumable). Every file is written under a temporary name and renamed, the
lists come after the files they name and ``meta.json`` comes last, so an interrupted run never leaves a folder
that looks complete; rerunning resumes. Mirrors: pass ``base_url`` (or set ``NCLIB_DATA_MIRROR``) and every
archive is fetched from ``<base_url>/<file name>``.
"""
from __future__ import annotations

import io
import tarfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .archives import (
    KNOWN_CHECKSUMS,
    MIRROR_ENV,
    PathLike,
    check_label_range,
    fetch,
    finish,
    image_size,
    is_complete,
    label_from_bytes,
    open_tar,
    open_zip,
    png_bytes,
    progress_bar,
    read_member,
    write_atomic,
)
from .datasets import IGNORE_LABEL, VOC_CLASS_NAMES
from .mask_sets import HORSES_URL, MSRA10K_URL, horse_mask, prepare_horses, prepare_msra10k
from .scribbles import draw_polyline

__all__ = [
    "VOC_URL",
    "SBD_URL",
    "SCRIBBLE_PNG_URL",
    "SCRIBBLE_XML_URL",
    "MSRA10K_URL",
    "KNOWN_CHECKSUMS",
    "MIRROR_ENV",
    "prepare_voc",
    "prepare_msra10k",
    "HORSES_URL",
    "prepare_horses",
    "horse_mask",
    "rasterize_scribble_xml",
    "read_sbd_mat",
    "train_aug_ids",
]

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = "http://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
#: ScribbleSup scribbles rasterized 3 px wide, as distributed by the rloss authors.
SCRIBBLE_PNG_URL = "http://cs.uwaterloo.ca/~m62tang/rloss/pascal_2012_scribble.zip"
#: ScribbleSup's original XML polylines (Lin et al. 2016, project page of J. Dai).
SCRIBBLE_XML_URL = "https://jifengdai.org/downloads/scribble_sup/scribble_annotation.zip"
_VOC = "VOCdevkit/VOC2012/"


# --------------------------------------------------------------------------------------------- formats


def read_sbd_mat(data: Union[bytes, PathLike], name: str = "") -> np.ndarray:
    """(H, W) uint8 class mask from an SBD ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``)."""
    from scipy.io import loadmat

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    label = name or str(data if not isinstance(data, (bytes, bytearray)) else "<bytes>")
    try:
        mat = loadmat(src, squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        raise ValueError(f"cannot read SBD annotation {label}: {e}") from e
    if seg.ndim != 2:
        raise ValueError(f"SBD annotation {label}: Segmentation has shape {seg.shape}, expected (H, W)")
    return seg.astype(np.uint8)


def _norm(name: str) -> str:
    """Class-name key that ignores case, spaces and separators ("TV/monitor" == "tvmonitor")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def rasterize_scribble_xml(data: Union[bytes, PathLike], class_names: Sequence[str] = VOC_CLASS_NAMES,
                           width: int = 3, size: Optional[Tuple[int, int]] = None, name: str = "") -> np.ndarray:
    """(H, W) uint8 scribble map from one ScribbleSup XML file: polylines ``width`` px wide, 255 elsewhere.

    Format: ``<annotation><size><width/><height/></size><polygon><tag>class</tag><point><X/><Y/></point>...``
    The tag is a class name (case, spaces and separators ignored) or an index. ``size`` (H, W) overrides the XML's size.
    """
    label = name or (str(data) if not isinstance(data, (bytes, bytearray)) else "<bytes>")
    try:
        root = ET.fromstring(data) if isinstance(data, (bytes, bytearray)) else ET.parse(data).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"cannot parse scribble XML {label}: {e}") from e
    if size is None:
        try:
            size = (int(root.findtext("size/height")), int(root.findtext("size/width")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"scribble XML {label} has no usable <size><height/><width/>") from e
    h, w = size
    lookup = {_norm(n): i for i, n in enumerate(class_names)}
    out = np.full((h, w), IGNORE_LABEL, dtype=np.uint8)
    for poly in root.iter("polygon"):
        tag = (poly.findtext("tag") or "").strip()
        if _norm(tag) in lookup:
            cls = lookup[_norm(tag)]
        elif tag.isdigit() and int(tag) < len(class_names):
            cls = int(tag)
        else:
            raise ValueError(f"scribble XML {label}: unknown class tag {tag!r}")
        pts = []
        for p in poly.iter("point"):
            try:
                pts.append((int(round(float(p.findtext("X")))), int(round(float(p.findtext("Y"))))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"scribble XML {label}: bad point in polygon {tag!r}") from e
        if not pts:
            continue
        draw_polyline(out, np.asarray(pts), cls, width)
    return out


def train_aug_ids(voc_train: Iterable[str], voc_val: Iterable[str], sbd_train: Iterable[str],
                  sbd_val: Iterable[str]) -> List[str]:
    """The 10,582-image training list: VOC train + SBD train + SBD val, minus VOC val (sorted)."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _ids(text: str) -> List[str]:
    return [ln.split()[0] for ln in text.splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------- VOC


def _voc_pass(root: Path, voc_tar: Path, progress: bool):
    """1. VOC: images, its own masks (palette PNG -> indices) and lists. One streaming pass over the archive.
    Returns (image sizes by id, ids with a VOC mask, split lists)."""
    sizes: Dict[str, Tuple[int, int]] = {}
    lists: Dict[str, List[str]] = {}
    voc_seg: set = set()
    with open_tar(voc_tar) as tar:
        try:
            for m in progress_bar(tar, None, "VOC", progress):
                if not m.isfile() or not m.name.startswith(_VOC):
                    continue
                p = PurePosixPath(m.name[len(_VOC):])
                folder = p.parent.as_posix()
                if folder == "JPEGImages" and p.suffix == ".jpg":
                    data = read_member(tar, m, voc_tar)
                    write_atomic(root / "JPEGImages" / p.name, data)
                    sizes[p.stem] = image_size(data, f"{voc_tar}:{m.name}")
                elif folder == "SegmentationClass" and p.suffix == ".png":
                    where = f"{voc_tar}:{m.name}"
                    arr = label_from_bytes(read_member(tar, m, voc_tar), where)
                    check_label_range(arr, 21, where, "VOC mask")
                    write_atomic(root / "SegmentationClassAug" / p.name, png_bytes(arr))
                    voc_seg.add(p.stem)
                elif folder == "ImageSets/Segmentation" and p.suffix == ".txt":
                    lists[p.stem] = _ids(read_member(tar, m, voc_tar).decode())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"corrupt or truncated archive {voc_tar}: {e}. Delete it and rerun") from e
    for need in ("train", "val"):
        if need not in lists:
            raise ValueError(f"{voc_tar} lacks {_VOC}ImageSets/Segmentation/{need}.txt: not a VOC 2012 archive?")
    return sizes, voc_seg, lists


def _sbd_pass(root: Path, sbd_tgz: Path, voc_seg: set, progress: bool):
    """2. SBD: cls/*.mat -> masks for the images VOC did not segment (VOC's own masks win); its train/val lists."""
    sbd_lists: Dict[str, List[str]] = {}
    sbd_seg: set = set()
    with open_tar(sbd_tgz) as tar:
        try:
            for m in progress_bar(tar, None, "SBD", progress):
                if not m.isfile():
                    continue
                p = PurePosixPath(m.name)
                if p.parent.name == "cls" and p.suffix == ".mat" and p.stem not in voc_seg:
                    where = f"{sbd_tgz}:{m.name}"
                    seg = read_sbd_mat(read_member(tar, m, sbd_tgz), where)
                    check_label_range(seg, 21, where, "SBD mask")
                    write_atomic(root / "SegmentationClassAug" / f"{p.stem}.png", png_bytes(seg))
                    sbd_seg.add(p.stem)
                elif p.parent.name == "dataset" and p.name in ("train.txt", "val.txt"):
                    sbd_lists[p.stem] = _ids(read_member(tar, m, sbd_tgz).decode())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"corrupt or truncated archive {sbd_tgz}: {e}. Delete it and rerun") from e
    for need in ("train", "val"):
        if need not in sbd_lists:
            raise ValueError(f"{sbd_tgz} lacks benchmark_RELEASE/dataset/{need}.txt: not the SBD archive?")
    return sbd_seg, sbd_lists


def _check_pairs(root: Path, voc_tar: Path, wanted: set, sizes: Dict[str, Tuple[int, int]], segmented: set) -> None:
    """Every listed image exists and has a mask of its size."""
    for iid in sorted(wanted):
        if iid not in sizes:
            raise ValueError(f"image {iid}.jpg is listed for training or validation but missing from {voc_tar}")
        if iid not in segmented:
            raise ValueError(f"image {iid}.jpg has no mask: neither VOC SegmentationClass nor SBD cls/{iid}.mat")
        mpath = root / "SegmentationClassAug" / f"{iid}.png"
        msize = image_size(mpath.read_bytes(), str(mpath))
        if msize != sizes[iid]:
            raise ValueError(f"mask {mpath} has size {msize} but JPEGImages/{iid}.jpg has {sizes[iid]}")


def _scribble_pass(root: Path, scr_zip: Path, scribbles: str, scribble_width: int, wanted: set,
                   sizes: Dict[str, Tuple[int, int]], progress: bool) -> set:
    """3. Scribbles of the wanted images (PNGs as they are, or XML polylines rasterized); the ids that have one."""
    have = set()
    with open_zip(scr_zip) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        ext = ".png" if scribbles == "png" else ".xml"
        picked = [n for n in names if n.lower().endswith(ext)]
        if scribbles == "xml" and any("pascal_2012/" in n for n in picked):
            picked = [n for n in picked if "pascal_2012/" in n]  # skip the PASCAL-Context scribbles
        for n in progress_bar(picked, len(picked), "scribbles", progress):
            iid = PurePosixPath(n).stem
            if iid not in wanted:
                continue
            data = read_member(z, n, scr_zip)
            where = f"{scr_zip}:{n}"
            if scribbles == "png":
                arr = label_from_bytes(data, where)
            else:
                arr = rasterize_scribble_xml(data, size=sizes[iid], width=scribble_width, name=where)
            check_label_range(arr, 21, where, "scribble")
            if arr.shape != sizes[iid]:
                raise ValueError(f"scribble {where} has size {arr.shape} but JPEGImages/{iid}.jpg has {sizes[iid]}")
            write_atomic(root / "pascal_2012_scribble" / f"{iid}.png", png_bytes(arr))
            have.add(iid)
    return have


def prepare_voc(root: PathLike, base_url: Optional[str] = None, cache: Optional[PathLike] = None,
                progress: bool = True, checksums: Optional[Dict[str, Optional[Tuple[str, str]]]] = None,
                scribbles: str = "png", scribble_width: int = 3) -> Path:
    """Download VOC 2012, SBD and ScribbleSup scribbles and convert them into ``root`` (see module doc).

    ``scribbles``: "png" (rloss's rasterized PNGs) or "xml" (ScribbleSup's polylines, rasterized here with
    ``cv2.polylines`` ``scribble_width`` px wide). ``checksums`` replaces :data:`KNOWN_CHECKSUMS`.
    """
    if scribbles not in ("png", "xml"):
        raise ValueError(f"scribbles must be 'png' or 'xml', got {scribbles!r}")
    root = Path(root)
    if is_complete(root, "voc"):
        return root
    cache = Path(cache) if cache is not None else root / "downloads"
    voc_tar = fetch(VOC_URL, base_url, cache, checksums, progress)
    sbd_tgz = fetch(SBD_URL, base_url, cache, checksums, progress)
    scr_zip = fetch(SCRIBBLE_PNG_URL if scribbles == "png" else SCRIBBLE_XML_URL, base_url, cache, checksums,
                     progress)

    for sub in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sizes, voc_seg, lists = _voc_pass(root, voc_tar, progress)
    sbd_seg, sbd_lists = _sbd_pass(root, sbd_tgz, voc_seg, progress)
    train_aug = train_aug_ids(lists["train"], lists["val"], sbd_lists["train"], sbd_lists["val"])
    val = sorted(lists["val"])
    wanted = set(train_aug) | set(val)
    _check_pairs(root, voc_tar, wanted, sizes, voc_seg | sbd_seg)
    have = _scribble_pass(root, scr_zip, scribbles, scribble_width, wanted, sizes, progress)
    missing = sorted(set(train_aug) - have)

    # 4. Lists last, then the completion marker.
    seg = root / "ImageSets" / "Segmentation"
    write_atomic(seg / "train.txt", ("\n".join(sorted(lists["train"])) + "\n").encode())
    write_atomic(seg / "val.txt", ("\n".join(val) + "\n").encode())
    write_atomic(seg / "train_aug.txt", ("\n".join(train_aug) + "\n").encode())
    finish(root, {
        "dataset": "voc",
        "train_aug": len(train_aug),
        "val": len(val),
        "train": len(lists["train"]),
        "scribbles": scribbles,
        "train_aug_without_scribble": len(missing),
        "first_without_scribble": missing[:20],
        "archives": {p.name: p.stat().st_size for p in (voc_tar, sbd_tgz, scr_zip)},
    })
    if missing:
        print(f"warning: {len(missing)} train_aug images have no scribble (e.g. {missing[0]}); "
              f"VOCScribbleDataset raises for them on load")
    return root
