"""Checkpoints: atomic save, RNG states, loading a trained model, compatibility with a config.

A checkpoint (``model.pt``) holds ``config`` (a :meth:`Config.to_dict`), ``model_name``, ``num_classes``,
``model`` / ``optimizer`` / ``scaler`` state dicts, ``iteration``, ``rng`` (one state, or one per rank under DDP)
and ``history``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..models import build_model
from .config import Config

__all__ = ["atomic_save", "rng_state", "set_rng_state", "load_checkpoint", "check_compatible", "load_model",
           "resolve_checkpoint_path"]


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a reader never sees a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """The global RNG states (torch, numpy, random, CUDA when initialised) for an exact resume."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_compatible(ckpt: Dict[str, Any], model_name: str, num_classes: int, path: Union[str, Path]) -> None:
    """ValueError naming the path when ``ckpt`` holds another model or class count than the config asks for."""
    got = (ckpt.get("model_name"), ckpt.get("num_classes"))
    if got != (model_name, num_classes):
        raise ValueError(
            f"checkpoint {path} holds model {got[0]!r} with {got[1]} classes, but the config asks for "
            f"{model_name!r} with {num_classes} classes"
        )


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Config]:
    """A trained model (eval mode) and its config from a checkpoint written by :func:`nclib.train.train`."""
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(ckpt["model_name"], ckpt["num_classes"], **cfg.model_args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def resolve_checkpoint_path(p: Union[str, Path]) -> Path:
    """``p`` as given, or under the results root when relative and found only there (``<run>/model.pt``)."""
    from .results import results_root

    path = Path(p)
    if not path.is_absolute() and not path.exists() and (results_root() / path).exists():
        return results_root() / path
    return path
