"""Segmentation proposals of a training set, computed once from its scribbles and stored as a mask set (Table 2).

The paper's proposal baselines (Sec 5.2.2) train the same network with cross entropy on a full-image proposal per
training image: GrabCut (:func:`nclib.proposals.grabcut_proposals`), seeded normalized cut
(:func:`nclib.clustering.seeded_normalized_cut`, "NormalizedCut_ours") and KernelCut
(:func:`nclib.proposals.kernelcut_proposals`). :func:`write_proposal_masks` writes them in the VOC layout,
``<root>/Proposals_<method>/<id>.png`` (uint8 labels, no palette, 255 = ignore), for a config with
``supervision: proposal`` to train on.

**Unsure region** (``unsure_ignore``, folder ``Proposals_<method>_ignore``; the paper's "with ignore region", after
Khoreva et al.): none of the three methods exposes a calibrated per-pixel confidence (GrabCut and KernelCut return
hard labels, seeded NC its hard assignment), so one rule serves all three: a pixel is unsure when the proposal's
morphological dilation and erosion differ there, i.e. its ``(2 band + 1)^2`` window holds more than one proposal
label. That is a band of ``band`` pixels on each side of every proposal boundary, where the three methods make
their errors. Scribbled pixels are never unsure (they are the user's labels).

Writing is atomic and resumable: masks go to ``.<folder>.partial`` (each file written then renamed), that folder is
renamed into place when every image is done, with ``meta.json`` (method, parameters, nclib version, labelled
fraction, images without scribbles). A rerun skips the images already written; a finished folder is left as is.
Images without any scribble have no proposal: their mask is 255 everywhere and they are counted in ``meta.json``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import cv2
import numpy as np
import torch
from PIL import Image

from .datasets import VOCScribbleDataset, read_image, read_label
from .labels import IGNORE_LABEL

__all__ = ["PROPOSAL_METHODS", "DEFAULT_PARAMS", "proposal_folder", "compute_proposal", "unsure_band",
           "write_proposal_masks"]

PROPOSAL_METHODS = ("grabcut", "nc", "kernelcut")

#: the parameters of each method as the command uses them (the library's defaults; sigma_xy in pixels, rgb 0..255)
DEFAULT_PARAMS: Dict[str, Dict[str, Any]] = {
    "grabcut": {"iters": 5, "margin": 0.1},
    "nc": {"sigma_rgb": 15.0, "sigma_xy": 100.0, "iters": 30},
    "kernelcut": {"sigma_rgb": 15.0, "sigma_xy": 100.0, "potts_weight": 5.0, "iters": 10},
}


def _check_method(method: str) -> None:
    if method not in PROPOSAL_METHODS:
        raise ValueError(f"method must be one of {list(PROPOSAL_METHODS)}, got {method!r}")


def proposal_folder(method: str, unsure_ignore: bool = False) -> str:
    """The folder name under the data root: ``Proposals_<method>`` or ``Proposals_<method>_ignore``."""
    _check_method(method)
    return f"Proposals_{method}" + ("_ignore" if unsure_ignore else "")


def compute_proposal(method: str, image: np.ndarray, scribble: np.ndarray, num_classes: int,
                     params: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """(H, W) uint8 proposal of one image: ``image`` (H, W, 3) uint8 RGB, ``scribble`` (H, W) labels, 255 unlabelled.

    All 255 when the image has no scribble. Deterministic (OpenCV's RNG, used by GrabCut's GMM init, is reseeded).
    """
    _check_method(method)
    p = {**DEFAULT_PARAMS[method], **(params or {})}
    if not (scribble != IGNORE_LABEL).any():
        return np.full(scribble.shape, IGNORE_LABEL, np.uint8)
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
    scr = torch.from_numpy(scribble.astype(np.int64))[None]
    if method == "grabcut":
        from ..proposals import grabcut_proposals

        cv2.setRNGSeed(0)
        labels = grabcut_proposals(img, scr, **p)
    elif method == "nc":
        from ..clustering import seeded_normalized_cut

        labels = seeded_normalized_cut(img, scr, num_classes=num_classes, **p).labels
    else:
        from ..proposals import kernelcut_proposals

        labels = kernelcut_proposals(img, scr, num_classes=num_classes, **p).labels
    return labels[0].numpy().astype(np.uint8)


def unsure_band(proposal: np.ndarray, scribble: np.ndarray, band: int) -> np.ndarray:
    """(H, W) bool: pixels within ``band`` pixels (square window) of a proposal boundary, scribbles excluded.

    A pixel is in the band iff the max and the min proposal label over its ``(2 band + 1)^2`` window differ.
    """
    if not isinstance(band, int) or isinstance(band, bool) or band < 1:
        raise ValueError(f"band must be an int >= 1 (pixels), got {band!r}")
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    lab = proposal.astype(np.uint8)
    # border replicated: the image edge is no boundary
    hi = cv2.dilate(lab, kernel, borderType=cv2.BORDER_REPLICATE)
    lo = cv2.erode(lab, kernel, borderType=cv2.BORDER_REPLICATE)
    return (hi != lo) & (scribble == IGNORE_LABEL)


def _write_png(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _finished(out: Path, meta: Dict[str, Any]) -> bool:
    """True if ``out`` is a finished set made with ``meta``'s settings; an error if it holds anything else."""
    if (out / "meta.json").is_file():
        done = json.loads((out / "meta.json").read_text())
        if any(done.get(k) != v for k, v in meta.items()):
            raise ValueError(f"{out} holds proposals made with other settings ({out / 'meta.json'}); remove it or "
                             f"pass another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a finished proposal set (no meta.json); remove it or pass --out")
    return False


def _read_scribble(path: Path, num_classes: int) -> np.ndarray:
    scribble = read_label(path)
    bad = (scribble != IGNORE_LABEL) & (scribble >= num_classes)
    if bad.any():
        raise ValueError(f"scribble {path} has labels {sorted(np.unique(scribble[bad]).tolist())[:8]} "
                         f"outside [0, {num_classes})")
    return scribble


def write_proposal_masks(
    root, method: str, split: str = "train", out=None, unsure_ignore: bool = False, band: int = 3,
    scribble_dir: str = "pascal_2012_scribble", params: Optional[Dict[str, Any]] = None,
    limit: Optional[int] = None, progress: bool = True,
) -> Path:
    """Proposals of every image of ``split`` under ``root`` (VOC layout) written to ``out``; returns ``out``.

    Args:
        root: the data set folder (``JPEGImages``, ``<scribble_dir>``, ``ImageSets/Segmentation/<split>.txt``).
        method: "grabcut" | "nc" | "kernelcut"; params: overrides of :data:`DEFAULT_PARAMS` [method].
        out: target folder (default ``root / proposal_folder(method, unsure_ignore)``).
        unsure_ignore: label the band of :func:`unsure_band` (``band`` pixels) 255.
        limit: only the first ``limit`` images of the split (timing, tests).
    See the module docstring for the layout, resumption and ``meta.json``.
    """
    _check_method(method)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data root not found: {root}")
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS[method]))
    if unknown:
        raise ValueError(f"params has keys {unknown} that {method} does not take; it takes {sorted(DEFAULT_PARAMS[method])}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    if unsure_ignore:
        unsure_band(np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint8), band)  # checks band before any work
    ds = VOCScribbleDataset(root, split, scribble_dir=scribble_dir, require_scribbles=True)
    ids = ds.ids[:limit] if limit else ds.ids
    out = Path(out) if out is not None else root / proposal_folder(method, unsure_ignore)
    used = {**DEFAULT_PARAMS[method], **(params or {})}
    meta: Dict[str, Any] = {"method": method, "split": split, "params": used, "scribble_dir": scribble_dir,
                            "unsure_ignore": bool(unsure_ignore), "band": band if unsure_ignore else None,
                            "images": len(ids)}
    if _finished(out, meta):
        return out
    partial = out.with_name(f".{out.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    from .. import __version__

    labelled = total = 0
    empty = []
    # progress=True leaves `disable` to tqdm's environment defaults, so TQDM_DISABLE=1 (the Makefile's notebook runs)
    # keeps the bar out of executed notebooks
    for iid in tqdm(ids, desc=f"{method} proposals", unit="image", **({} if progress else {"disable": True})):
        spath = root / scribble_dir / f"{iid}.png"
        scribble = _read_scribble(spath, ds.num_classes)
        target = partial / f"{iid}.png"
        if target.is_file():  # resumed: written by an earlier, interrupted run
            mask = read_label(target)
        else:
            image = read_image(root / "JPEGImages" / f"{iid}.jpg")
            if image.shape[:2] != scribble.shape:
                raise ValueError(f"scribble {spath} has size {scribble.shape}, its image {image.shape[:2]}")
            mask = compute_proposal(method, image, scribble, ds.num_classes, used)
            if unsure_ignore:
                mask = np.where(unsure_band(mask, scribble, band), IGNORE_LABEL, mask).astype(np.uint8)
            _write_png(target, mask)
        if not (scribble != IGNORE_LABEL).any():
            empty.append(iid)
        labelled += int((mask != IGNORE_LABEL).sum())
        total += mask.size
    meta.update(nclib_version=__version__, labelled_fraction=labelled / max(total, 1),
                no_scribble_images=len(empty), no_scribble_ids=empty[:20])
    (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():  # an empty folder left by hand
        shutil.rmtree(out)
    os.replace(partial, out)
    return out
