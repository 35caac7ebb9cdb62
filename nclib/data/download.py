"""Resumable HTTP downloads with checksum or size verification (standard library ``urllib`` + tqdm).

A download lands in ``<name>.part``; an interrupted one resumes with an HTTP ``Range`` request; only a file whose
length matches the server's and whose checksum matches the table is renamed to its final name, so a file under
its final name is always complete.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["download", "file_digest"]

_CHUNK = 1 << 20


def file_digest(path: os.PathLike, algo: str = "md5") -> str:
    """Hex digest of a file (streamed)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, final: Path, checksum: Optional[Tuple[str, str]], size: Optional[int]) -> None:
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"size mismatch for {final}: {path.stat().st_size} bytes, expected {size}")
    if checksum is not None:
        algo, want = checksum
        got = file_digest(path, algo)
        if got.lower() != want.lower():
            raise ValueError(f"checksum mismatch for {final}: {algo} {got}, expected {want}")


def _stream_to(resp, part: Path, dest: Path, start: int, progress: bool) -> None:
    """Append (or write, when the server ignored the Range) the response body to ``part``; raise on a short body."""
    if start and resp.status != 206:  # server ignored the Range: start over
        start = 0
    length = resp.headers.get("Content-Length")
    total = int(length) + start if length is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=dest.name)
    got = start
    try:
        with open(part, "ab" if start else "wb") as f:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as e:  # dropped mid-body
                    raise ValueError(f"download of {dest} interrupted after {got} bytes ({e}); rerun to resume") from e
                if not block:
                    break
                f.write(block)
                got += len(block)
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    if total is not None and got != total:
        raise ValueError(f"truncated download of {dest}: {got} of {total} bytes; rerun to resume")


def download(url: str, dest: os.PathLike, checksum: Optional[Tuple[str, str]] = None, size: Optional[int] = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified file is already there; resume a ``dest.part`` left behind.

    ``checksum``: ("md5" | "sha256", hex) or None (then only the length the server announced is checked).
    A mismatch deletes the partial file and raises ValueError naming ``dest``.
    """
    dest = Path(dest)
    if dest.exists():
        _verify(dest, dest, checksum, size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "nclib-data/1", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to fetch: the .part is already whole
            resp = None
        else:
            raise ValueError(f"download of {url} failed: HTTP {e.code} {e.reason} (target {dest})") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ValueError(f"download of {url} failed: {e} (target {dest})") from e
    if resp is not None:
        with resp:
            _stream_to(resp, part, dest, start, progress)
    try:
        _verify(part, dest, checksum, size)
    except ValueError as e:
        part.unlink(missing_ok=True)
        raise ValueError(f"{e} (downloaded from {url}; the partial file was deleted, rerun to fetch it again)") from e
    os.replace(part, dest)
    return dest
