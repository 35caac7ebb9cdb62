"""Shared fixtures. Tests import helpers from ``nclib`` itself (``nclib.photos``), never from this file.

Fixtures:
- ``device``: every device the property tests should run on (CPU, and CUDA where a GPU is present).
- ``horses``: the Weizmann horse folder (``../shared/data/weizmann_horse`` or ``$NCLIB_HORSES``); skips if absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_HORSES = Path(os.environ.get("NCLIB_HORSES", Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"))


@pytest.fixture(params=_DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def horses() -> Path:
    if not _HORSES.is_dir():
        pytest.skip(f"Weizmann horses not available at {_HORSES} (python -m nclib.data prepare horses)")
    return _HORSES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
