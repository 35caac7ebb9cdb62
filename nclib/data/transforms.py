"""DeepLab-style augmentation on sample dicts, keeping image, scribble and mask aligned.

Train: random scale (bilinear image; labels nearest on the same pixel-centre grid, ``INTER_NEAREST_EXACT``,
since OpenCV's plain nearest is shifted by half a pixel), pad to the crop size (image with the mean RGB, labels with
``PAD_LABEL`` = 254), random crop, random horizontal flip. ``PAD_LABEL`` differs from ``IGNORE_LABEL`` = 255 on
purpose: unlabelled pixels still belong to the image and enter the normalized-cut term, padded ones do not
(``roi = scribble != PAD_LABEL``); cross-entropy ignores both.

Randomness comes from torch's generator: the global one by default, which a DataLoader seeds per worker from its
own ``generator``, so ``torch.manual_seed`` / ``DataLoader(generator=...)`` make the crops reproducible.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from .labels import IGNORE_LABEL, PAD_LABEL

__all__ = ["IGNORE_LABEL", "PAD_LABEL", "MEAN_RGB", "TrainTransform", "EvalTransform", "pad_sample", "roi_of"]

#: ImageNet / DeepLab mean pixel, RGB 0..255: what padded image pixels are filled with.
MEAN_RGB = (122.675, 116.669, 104.008)

Size = Union[int, Tuple[int, int]]


def _pair(size: Size, name: str) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return int(h), int(w)


def roi_of(labels: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True where a label map (..., H, W) is not padding."""
    return labels != PAD_LABEL


def _check(sample: Dict[str, object]) -> Tuple[int, int]:
    img = sample["image"]
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"sample['image'] must be a (3, H, W) tensor, got {getattr(img, 'shape', type(img))}")
    h, w = img.shape[-2:]
    for key in ("scribble", "mask"):
        if key in sample and tuple(sample[key].shape) != (h, w):
            raise ValueError(f"sample[{key!r}] has shape {tuple(sample[key].shape)}, image is {(h, w)}")
    return int(h), int(w)


def _labels(sample: Dict[str, object]):
    return [k for k in ("scribble", "mask") if k in sample]


def pad_sample(sample: Dict[str, object], size: Size, fill: Sequence[float] = MEAN_RGB,
               pad_label: int = PAD_LABEL) -> Dict[str, object]:
    """Pad bottom/right to at least ``size`` (H, W): image with ``fill``, labels with ``pad_label``."""
    h, w = _check(sample)
    th, tw = _pair(size, "size")
    ph, pw = max(th - h, 0), max(tw - w, 0)
    if ph == 0 and pw == 0:
        return dict(sample)
    out = dict(sample)
    img = sample["image"]
    new = torch.empty((3, h + ph, w + pw), dtype=img.dtype)
    new[:] = torch.as_tensor(fill, dtype=img.dtype).view(3, 1, 1)
    new[:, :h, :w] = img
    out["image"] = new
    for key in _labels(sample):
        lab = sample[key]
        nl = torch.full((h + ph, w + pw), pad_label, dtype=lab.dtype)
        nl[:h, :w] = lab
        out[key] = nl
    return out


class TrainTransform:
    """Random scale in ``scale``, pad, random ``crop`` (H, W), random horizontal flip; for training samples.

    ``mean_fill`` pads the image with ``mean`` (else 0); labels are padded with ``pad_label``.
    ``generator``: a torch.Generator to draw from instead of the global (per-worker) RNG.
    """

    def __init__(self, crop: Size = 96, scale: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 mean_fill: bool = True, pad_label: int = PAD_LABEL, mean: Sequence[float] = MEAN_RGB,
                 generator: Optional[torch.Generator] = None) -> None:
        self.crop = _pair(crop, "crop")
        lo, hi = float(scale[0]), float(scale[1])
        if not (0 < lo <= hi):
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
        self.scale = (lo, hi)
        self.flip = bool(flip)
        self.fill = tuple(float(m) for m in mean) if mean_fill else (0.0, 0.0, 0.0)
        if not (0 <= pad_label <= 255) or pad_label == IGNORE_LABEL:
            raise ValueError(f"pad_label must be in [0, 255) and differ from IGNORE_LABEL=255, got {pad_label}")
        self.pad_label = int(pad_label)
        self.generator = generator

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, n: int) -> int:
        return int(torch.randint(0, n, (), generator=self.generator)) if n > 1 else 0

    def __call__(self, sample: Dict[str, object]) -> Dict[str, object]:
        h, w = _check(sample)
        out = dict(sample)
        lo, hi = self.scale
        s = lo + (hi - lo) * self._rand()
        nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
        if (nh, nw) != (h, w):
            img = sample["image"].permute(1, 2, 0).contiguous().numpy()
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            out["image"] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
            for key in _labels(sample):
                lab = sample[key].numpy().astype(np.uint8)
                lab = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
                out[key] = torch.from_numpy(lab.astype(np.int64)).to(sample[key].dtype)
        out = pad_sample(out, self.crop, self.fill, self.pad_label)
        ch, cw = self.crop
        H, W = out["image"].shape[-2:]
        y0, x0 = self._randint(H - ch + 1), self._randint(W - cw + 1)
        flip = self.flip and self._rand() < 0.5
        out["image"] = out["image"][:, y0 : y0 + ch, x0 : x0 + cw]
        for key in _labels(out):
            out[key] = out[key][y0 : y0 + ch, x0 : x0 + cw]
        if flip:
            out["image"] = out["image"].flip(-1)
            for key in _labels(out):
                out[key] = out[key].flip(-1)
        out["image"] = out["image"].contiguous()
        for key in _labels(out):
            out[key] = out[key].contiguous()
        return out


class EvalTransform:
    """Identity, or pad bottom/right to ``pad_to`` (H, W) so that a batch of images stacks; no randomness.

    Padded label pixels get ``pad_label`` (254): score only where ``mask < 254`` (255 is void as well).
    """

    def __init__(self, pad_to: Optional[Size] = None, mean_fill: bool = True, pad_label: int = PAD_LABEL,
                 mean: Sequence[float] = MEAN_RGB) -> None:
        self.pad_to = None if pad_to is None else _pair(pad_to, "pad_to")
        self.fill = tuple(float(m) for m in mean) if mean_fill else (0.0, 0.0, 0.0)
        self.pad_label = int(pad_label)

    def __call__(self, sample: Dict[str, object]) -> Dict[str, object]:
        h, w = _check(sample)
        if self.pad_to is None:
            return dict(sample)
        if h > self.pad_to[0] or w > self.pad_to[1]:
            raise ValueError(f"image {sample.get('id', '')} of size {(h, w)} exceeds pad_to={self.pad_to}")
        return pad_sample(sample, self.pad_to, self.fill, self.pad_label)
