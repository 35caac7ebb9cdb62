"""Real sample photographs that ship inside scikit-image (no download), as tensors for demos, tests and benchmarks."""
from __future__ import annotations

import cv2
import numpy as np
import torch

#: Colour photos bundled with scikit-image's wheel.
BUNDLED = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB photo bundled with scikit-image (``skimage.data.<name>``)."""
    from skimage import data

    if not hasattr(data, name):
        raise ValueError(f"unknown scikit-image photo {name!r}; try one of {BUNDLED}")
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def photo_tensor(name: str, size: int | None = None, crop: int | None = None) -> torch.Tensor:
    """(1, 3, H, W) float32 RGB in 0..255.

    Args:
        size: resize (area interpolation) so that the short side is ``size`` and centre-crop a square.
        crop: then take a centred ``crop`` x ``crop`` window without resampling.
    """
    img = photo(name)
    if size is not None:
        h, w = img.shape[:2]
        s = size / min(h, w)
        img = cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=cv2.INTER_AREA)
        t, l = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[t : t + size, l : l + size]
    if crop is not None:
        h, w = img.shape[:2]
        if crop > min(h, w):
            raise ValueError(f"crop {crop} is larger than the photo ({h}x{w})")
        t, l = (h - crop) // 2, (w - crop) // 2
        img = img[t : t + crop, l : l + crop]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
