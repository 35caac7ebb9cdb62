"""Shared fixtures: real photographs bundled with scikit-image (no download), small crops for exact references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nclib.photos import BUNDLED as PHOTOS, photo, photo_tensor  # noqa: F401  (re-exported for the tests)


def photo_crop(name: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) float32 centred crop of a bundled photo at full resolution, RGB 0..255."""
    return photo_tensor(name, crop=size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
