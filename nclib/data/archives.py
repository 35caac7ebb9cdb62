"""Downloads and archives shared by the ``prepare`` commands (:mod:`nclib.data.prepare`, :mod:`nclib.data.mask_sets`).

A mirror (``base_url`` or ``$NCLIB_DATA_MIRROR``) replaces each archive's host; known digests are checked; archive
members are read with errors that name the archive and the member; files are written atomically and a data set
is complete once its ``meta.json`` names it.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .datasets import IGNORE_LABEL, READ_ERRORS
from .download import download

__all__ = ["MIRROR_ENV", "KNOWN_CHECKSUMS", "PathLike", "mirror_url", "fetch", "progress_bar", "write_atomic",
           "png_bytes", "label_from_bytes", "image_size", "check_label_range", "open_tar", "open_zip", "read_member",
           "finish", "is_complete"]

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


def mirror_url(default: str, base_url: Optional[str]) -> str:
    base = base_url or os.environ.get(MIRROR_ENV)
    if not base:
        return default
    return base.rstrip("/") + "/" + default.rsplit("/", 1)[-1]


def fetch(default_url: str, base_url: Optional[str], cache: Path, checksums, progress: bool) -> Path:
    url = mirror_url(default_url, base_url)
    name = url.rsplit("/", 1)[-1]
    table = KNOWN_CHECKSUMS if checksums is None else checksums
    return download(url, cache / name, checksum=table.get(name), progress=progress)


def progress_bar(it, total: int, desc: str, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="file")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def label_from_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im if im.mode in ("P", "L") else im.convert("L"))
    except READ_ERRORS as e:
        raise ValueError(f"cannot read label image {name}: {e}") from e


def image_size(data: bytes, name: str) -> Tuple[int, int]:
    """(H, W) of an encoded image; a ValueError naming it when unreadable or over PIL's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except READ_ERRORS as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def check_label_range(arr: np.ndarray, num_classes: int, name: str, what: str) -> None:
    bad = (arr != IGNORE_LABEL) & (arr >= num_classes)
    if bad.any():
        vals = sorted(np.unique(arr[bad]).tolist())[:8]
        raise ValueError(f"{what} {name} has labels {vals} outside [0, {num_classes}) (255 = unlabelled)")


def open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated archive {path}: {e}. Delete it and rerun") from e


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated archive {path}: {e}. Delete it and rerun") from e


def read_member(archive, member, path: Path) -> bytes:
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


def finish(root: Path, meta: dict) -> None:
    write_atomic(root / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


def is_complete(root: Path, kind: str) -> bool:
    meta = root / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("dataset") == kind
    except ValueError:
        return False
