"""Checkpoints: atomic save, RNG states, safe loading of a trained model, compatibility with a config.

A checkpoint (``model.pt``) holds ``config`` (a :meth:`Config.to_dict`), ``model_name``, ``num_classes``,
``model`` / ``optimizer`` / ``scaler`` state dicts, ``iteration``, ``rng`` (one state, or one per rank under DDP)
and ``history``. Everything in it is tensors and plain containers (RNG states too), so it is read with
``torch.load(weights_only=True)``: a file crafted to run code when unpickled is refused, never executed.
"""
from __future__ import annotations

import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..models import build_model
from .config import Config

__all__ = ["atomic_save", "rng_state", "set_rng_state", "load_checkpoint", "check_compatible", "load_model",
           "resolve_checkpoint_path", "load_weights", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("config", "model_name", "num_classes", "model", "iteration")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file of a unique name, then rename: a reader never sees a half-written
    checkpoint, and two writers into one folder never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> Dict[str, Any]:
    """The global RNG states (torch, numpy, random, CUDA when initialised) as tensors / lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st: Dict[str, Any] = {"torch": torch.get_rng_state(),
                          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                    float(gauss)],
                          "random": [int(version), list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (also the numpy-array form older checkpoints hold)."""
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = st["random"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _legacy_numpy_globals() -> list:
    """Checkpoints written before RNG states were tensors hold numpy arrays: allow exactly those (data only)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _torch_load(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a run killed while writing it, or not a checkpoint")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = _unpickler_reason(str(err))
        if "global" in why.lower():  # a class or function to import and call: what a crafted file needs
            raise ValueError(f"checkpoint {path} refused: it holds objects other than tensors and plain containers, "
                             f"which could run code when loaded, so it was not loaded ({why})") from None
        raise ValueError(f"checkpoint {path} is not a readable torch file (truncated or corrupt?): {why}") from None
    except Exception as err:  # truncated zip, garbage bytes, a foreign format: torch raises many kinds
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is not a readable torch file (truncated or corrupt?): {msg}") from None


def _unpickler_reason(msg: str) -> str:
    """The informative line of torch's weights-only error (its advice to disable the check left out)."""
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)",
              "In PyTorch", "WeightsUnpickler error")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
    return lines[-1][:200] if lines else "unsupported content"


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint dict at ``path``, checked: ValueError naming the path and the problem when it is missing,
    empty, corrupt, crafted (objects beyond tensors and plain containers), or not written by :func:`nclib.train.train`
    (a bare state_dict, a list, keys missing)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    ck = _torch_load(path)
    if not isinstance(ck, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ck).__name__}, not an nclib checkpoint (a dict with keys "
                         f"{list(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        if ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
            raise ValueError(f"checkpoint {path} is a bare state_dict (weights only), not an nclib checkpoint: it "
                             f"lacks the config, model name and class count (keys {list(REQUIRED_KEYS)})")
        raise ValueError(f"checkpoint {path} is not an nclib checkpoint: keys {missing} missing")
    if not isinstance(ck["config"], dict) or not isinstance(ck["model"], dict):
        raise ValueError(f"checkpoint {path} is malformed: 'config' and 'model' must be dicts")
    return ck


def check_compatible(ckpt: Dict[str, Any], model_name: str, num_classes: int, path: Union[str, Path],
                     model_args: Optional[Dict[str, Any]] = None) -> None:
    """ValueError naming the path when ``ckpt`` holds another model, class count or (when given) ``model_args``
    than the config asks for."""
    got = (ckpt.get("model_name"), ckpt.get("num_classes"))
    if got != (model_name, num_classes):
        raise ValueError(
            f"checkpoint {path} holds model {got[0]!r} with {got[1]} classes, but the config asks for "
            f"{model_name!r} with {num_classes} classes"
        )
    theirs = dict(ckpt["config"].get("model_args") or {}) if isinstance(ckpt.get("config"), dict) else {}
    if model_args is not None and _architecture(theirs) != _architecture(model_args):
        raise ValueError(f"checkpoint {path} holds a {model_name!r} built with model_args {theirs}, but the config "
                         f"asks for model_args {dict(model_args)}")


# model_args that only say where the first weights come from, not what the network is: a stage 2 that starts
# from a stage-1 checkpoint has no use for the stage-1 backbone file.
INIT_ONLY_MODEL_ARGS = ("backbone",)


def _architecture(model_args: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in dict(model_args).items() if k not in INIT_ONLY_MODEL_ARGS}


def load_weights(model: nn.Module, ckpt: Dict[str, Any], path: Union[str, Path]) -> None:
    """``model.load_state_dict(ckpt["model"])``; a mismatch is a ValueError naming the path."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {path}: its weights do not fit the model "
                         f"({str(err).strip().splitlines()[0][:200]})") from None


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Config]:
    """A trained model (eval mode) and its config from a checkpoint written by :func:`nclib.train.train`."""
    ckpt = load_checkpoint(path)
    try:
        cfg = Config.from_dict(ckpt["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {path}: its config is not valid ({err})") from None
    model = build_model(ckpt["model_name"], ckpt["num_classes"], **cfg.model_args)
    load_weights(model, ckpt, path)
    return model.to(device).eval(), cfg


def resolve_checkpoint_path(p: Union[str, Path]) -> Path:
    """``p`` as given, or under the results root when relative and found only there (``<run>/model.pt``)."""
    from .results import results_root

    path = Path(p)
    if not path.is_absolute() and not path.exists() and (results_root() / path).exists():
        return results_root() / path
    return path
