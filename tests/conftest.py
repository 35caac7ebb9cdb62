"""Shared fixtures: real photographs bundled with scikit-image (no download), small crops for exact references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nclib.photos import BUNDLED as PHOTOS, photo  # noqa: F401  (re-exported for the tests)


def photo_crop(name: str, size: int, top: int | None = None, left: int | None = None) -> torch.Tensor:
    """(1, 3, size, size) float32 crop of a bundled photo at full resolution, RGB 0..255, centred unless placed."""
    img = photo(name)
    h, w = img.shape[:2]
    top = (h - size) // 2 if top is None else top
    left = (w - size) // 2 if left is None else left
    crop = img[top : top + size, left : left + size]
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
