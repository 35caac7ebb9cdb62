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
import json
import os
import tarfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .datasets import IGNORE_LABEL, READ_ERRORS, VOC_CLASS_NAMES, binary_mask
from .download import download
from .scribbles import draw_polyline

__all__ = [
    "VOC_URL",
    "SBD_URL",
    "SCRIBBLE_PNG_URL",
    "SCRIBBLE_XML_URL",
    "MSRA10K_URL",
    "KNOWN_CHECKSUMS",
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
MSRA10K_URL = "http://mftp.mmcheng.net/Data/MSRA10K_Imgs_GT.zip"
#: The Weizmann horses as committed to a public GitHub repository (weizmann_horse_db/rgb + figure_ground).
HORSES_URL = ("https://github.com/shenshutao/image_segmentation/archive/"
              "2653401d6ea617026895aac17059eb57e017abcb.zip")
MIRROR_ENV = "NCLIB_DATA_MIRROR"

#: Known digests (md5 as published by torchvision and others). None: unknown here; the download is then checked
#: only against the length the server announces, and its sha256 is recorded in meta.json.
KNOWN_CHECKSUMS: Dict[str, Optional[Tuple[str, str]]] = {
    "VOCtrainval_11-May-2012.tar": ("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
    "benchmark.tgz": ("md5", "82b4d87ceb2ed10f6038a1cba92111cb"),
    "pascal_2012_scribble.zip": None,
    "scribble_annotation.zip": None,
    "MSRA10K_Imgs_GT.zip": None,
    "2653401d6ea617026895aac17059eb57e017abcb.zip": None,
}

PathLike = Union[str, os.PathLike]
_VOC = "VOCdevkit/VOC2012/"


# --------------------------------------------------------------------------------------------- helpers


def _url(default: str, base_url: Optional[str]) -> str:
    base = base_url or os.environ.get(MIRROR_ENV)
    if not base:
        return default
    return base.rstrip("/") + "/" + default.rsplit("/", 1)[-1]


def _fetch(default_url: str, base_url: Optional[str], cache: Path, checksums, progress: bool) -> Path:
    url = _url(default_url, base_url)
    name = url.rsplit("/", 1)[-1]
    table = KNOWN_CHECKSUMS if checksums is None else checksums
    return download(url, cache / name, checksum=table.get(name), progress=progress)


def _bar(it, total: int, desc: str, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="file")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _label_from_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im if im.mode in ("P", "L") else im.convert("L"))
    except READ_ERRORS as e:
        raise ValueError(f"cannot read label image {name}: {e}") from e


def _image_size(data: bytes, name: str) -> Tuple[int, int]:
    """(H, W) of an encoded image; a ValueError naming it when unreadable or over PIL's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except READ_ERRORS as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def _check_range(arr: np.ndarray, num_classes: int, name: str, what: str) -> None:
    bad = (arr != IGNORE_LABEL) & (arr >= num_classes)
    if bad.any():
        vals = sorted(np.unique(arr[bad]).tolist())[:8]
        raise ValueError(f"{what} {name} has labels {vals} outside [0, {num_classes}) (255 = unlabelled)")


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated archive {path}: {e}. Delete it and rerun") from e


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated archive {path}: {e}. Delete it and rerun") from e


def _read_member(archive, member, path: Path) -> bytes:
    """Bytes of a tar or zip member; a damaged member names the archive and the member."""
    try:
        if isinstance(archive, tarfile.TarFile):
            f = archive.extractfile(member)
            if f is None:
                raise ValueError("not a regular file")
            return f.read()
        return archive.read(member)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        name = member.name if isinstance(member, tarfile.TarInfo) else str(member)
        raise ValueError(f"corrupt or truncated archive {path} (member {name}): {e}. Delete it and rerun") from e


def _finish(root: Path, meta: dict) -> None:
    _write_atomic(root / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


def _is_complete(root: Path, kind: str) -> bool:
    meta = root / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("dataset") == kind
    except ValueError:
        return False


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
    with _open_tar(voc_tar) as tar:
        try:
            for m in _bar(tar, None, "VOC", progress):
                if not m.isfile() or not m.name.startswith(_VOC):
                    continue
                p = PurePosixPath(m.name[len(_VOC):])
                folder = p.parent.as_posix()
                if folder == "JPEGImages" and p.suffix == ".jpg":
                    data = _read_member(tar, m, voc_tar)
                    _write_atomic(root / "JPEGImages" / p.name, data)
                    sizes[p.stem] = _image_size(data, f"{voc_tar}:{m.name}")
                elif folder == "SegmentationClass" and p.suffix == ".png":
                    where = f"{voc_tar}:{m.name}"
                    arr = _label_from_bytes(_read_member(tar, m, voc_tar), where)
                    _check_range(arr, 21, where, "VOC mask")
                    _write_atomic(root / "SegmentationClassAug" / p.name, _png_bytes(arr))
                    voc_seg.add(p.stem)
                elif folder == "ImageSets/Segmentation" and p.suffix == ".txt":
                    lists[p.stem] = _ids(_read_member(tar, m, voc_tar).decode())
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
    with _open_tar(sbd_tgz) as tar:
        try:
            for m in _bar(tar, None, "SBD", progress):
                if not m.isfile():
                    continue
                p = PurePosixPath(m.name)
                if p.parent.name == "cls" and p.suffix == ".mat" and p.stem not in voc_seg:
                    where = f"{sbd_tgz}:{m.name}"
                    seg = read_sbd_mat(_read_member(tar, m, sbd_tgz), where)
                    _check_range(seg, 21, where, "SBD mask")
                    _write_atomic(root / "SegmentationClassAug" / f"{p.stem}.png", _png_bytes(seg))
                    sbd_seg.add(p.stem)
                elif p.parent.name == "dataset" and p.name in ("train.txt", "val.txt"):
                    sbd_lists[p.stem] = _ids(_read_member(tar, m, sbd_tgz).decode())
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
        msize = _image_size(mpath.read_bytes(), str(mpath))
        if msize != sizes[iid]:
            raise ValueError(f"mask {mpath} has size {msize} but JPEGImages/{iid}.jpg has {sizes[iid]}")


def _scribble_pass(root: Path, scr_zip: Path, scribbles: str, scribble_width: int, wanted: set,
                   sizes: Dict[str, Tuple[int, int]], progress: bool) -> set:
    """3. Scribbles of the wanted images (PNGs as they are, or XML polylines rasterized); the ids that have one."""
    have = set()
    with _open_zip(scr_zip) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        ext = ".png" if scribbles == "png" else ".xml"
        picked = [n for n in names if n.lower().endswith(ext)]
        if scribbles == "xml" and any("pascal_2012/" in n for n in picked):
            picked = [n for n in picked if "pascal_2012/" in n]  # skip the PASCAL-Context scribbles
        for n in _bar(picked, len(picked), "scribbles", progress):
            iid = PurePosixPath(n).stem
            if iid not in wanted:
                continue
            data = _read_member(z, n, scr_zip)
            where = f"{scr_zip}:{n}"
            if scribbles == "png":
                arr = _label_from_bytes(data, where)
            else:
                arr = rasterize_scribble_xml(data, size=sizes[iid], width=scribble_width, name=where)
            _check_range(arr, 21, where, "scribble")
            if arr.shape != sizes[iid]:
                raise ValueError(f"scribble {where} has size {arr.shape} but JPEGImages/{iid}.jpg has {sizes[iid]}")
            _write_atomic(root / "pascal_2012_scribble" / f"{iid}.png", _png_bytes(arr))
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
    if _is_complete(root, "voc"):
        return root
    cache = Path(cache) if cache is not None else root / "downloads"
    voc_tar = _fetch(VOC_URL, base_url, cache, checksums, progress)
    sbd_tgz = _fetch(SBD_URL, base_url, cache, checksums, progress)
    scr_zip = _fetch(SCRIBBLE_PNG_URL if scribbles == "png" else SCRIBBLE_XML_URL, base_url, cache, checksums,
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
    _write_atomic(seg / "train.txt", ("\n".join(sorted(lists["train"])) + "\n").encode())
    _write_atomic(seg / "val.txt", ("\n".join(val) + "\n").encode())
    _write_atomic(seg / "train_aug.txt", ("\n".join(train_aug) + "\n").encode())
    _finish(root, {
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


# --------------------------------------------------------------------------------------------- MSRA10K


def prepare_msra10k(root: PathLike, base_url: Optional[str] = None, cache: Optional[PathLike] = None,
                    progress: bool = True, checksums: Optional[Dict[str, Optional[Tuple[str, str]]]] = None,
                    val_fraction: float = 0.1, seed: int = 0) -> Path:
    """Download MSRA10K into ``root/Imgs`` (``<id>.jpg`` + ``<id>.png``, 0/255) with a fixed train/val split."""
    root = Path(root)
    if _is_complete(root, "msra10k"):
        return root
    if not (0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cache = Path(cache) if cache is not None else root / "downloads"
    zpath = _fetch(MSRA10K_URL, base_url, cache, checksums, progress)
    imgs = root / "Imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    with _open_zip(zpath) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        jpgs = {PurePosixPath(n).stem: n for n in names if n.lower().endswith(".jpg")}
        pngs = {PurePosixPath(n).stem: n for n in names if n.lower().endswith(".png")}
        lonely = sorted(set(jpgs) - set(pngs))
        if lonely:
            raise ValueError(f"image without mask in {zpath}: {jpgs[lonely[0]]} ({len(lonely)} such images)")
        if not jpgs:
            raise ValueError(f"{zpath} holds no .jpg images: not the MSRA10K archive?")
        for iid in _bar(sorted(jpgs), len(jpgs), "MSRA10K", progress):
            img = _read_member(z, jpgs[iid], zpath)
            mask = _label_from_bytes(_read_member(z, pngs[iid], zpath), f"{zpath}:{pngs[iid]}")
            size = _image_size(img, f"{zpath}:{jpgs[iid]}")
            if mask.shape != size:
                raise ValueError(f"mask {zpath}:{pngs[iid]} has size {mask.shape}, image has {size}")
            _write_atomic(imgs / f"{iid}.jpg", img)
            _write_atomic(imgs / f"{iid}.png", _png_bytes(255 * binary_mask(mask, f"{zpath}:{pngs[iid]}")))
    ids = sorted(jpgs)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, int(round(val_fraction * len(ids))))
    val = sorted(ids[i] for i in perm[:n_val])
    train = sorted(ids[i] for i in perm[n_val:])
    (root / "ImageSets").mkdir(exist_ok=True)
    _write_atomic(root / "ImageSets" / "train.txt", ("\n".join(train) + "\n").encode())
    _write_atomic(root / "ImageSets" / "val.txt", ("\n".join(val) + "\n").encode())
    _finish(root, {"dataset": "msra10k", "images": len(ids), "train": len(train), "val": len(val), "seed": seed,
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
    if _is_complete(root, "horses"):
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
        where = _fetch(HORSES_URL, base_url, cache, checksums, progress)
        archive = _open_zip(where)
        names = [n for n in archive.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        images, masks = _horse_pairs_from_zip(names)
        read = lambda ref: _read_member(archive, ref, where)  # noqa: E731
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
        for iid in _bar(ids, len(ids), "horses", progress):
            mask = horse_mask(read(masks[iid]), label(masks[iid]))
            rgb = _horse_image(read(images[iid]), label(images[iid]), mask.shape, label(masks[iid]),
                               max_aspect_change)
            _write_atomic(root / "images" / f"{iid}.png", _rgb_png_bytes(rgb))
            _write_atomic(root / "masks" / f"{iid}.png", _png_bytes(mask))
    finally:
        if archive is not None:
            archive.close()
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:val_count])
    train = sorted(ids[i] for i in perm[val_count:])
    _write_atomic(root / "ImageSets" / "train.txt", ("\n".join(train) + "\n").encode())
    _write_atomic(root / "ImageSets" / "val.txt", ("\n".join(val) + "\n").encode())
    src = {"folder": str(where)} if source is not None else {"archives": {where.name: where.stat().st_size}}
    _finish(root, {"dataset": "horses", "images": len(ids), "train": len(train), "val": len(val), "seed": seed, **src})
    return root
