"""The settings of a training run: :class:`Config` (dataclass, YAML), its validation, and :func:`config_hash`.

Every field is checked for type and range when a config is built (``from_dict`` / ``from_yaml`` / ``replace``),
so a typo fails before hours of training, with an error naming the key. Numbers written in scientific notation
(``5e-4``, which PyYAML reads as a string) are accepted for float fields.

Renamed keys keep their old spelling as an alias (:data:`LEGACY_KEYS`): old checkpoints and committed
``results/*/metrics.json`` load, and :func:`config_hash` is computed over the old names so the results cache keeps
its folder names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

__all__ = ["Config", "config_hash", "EVAL_ONLY", "LEGACY_KEYS"]

#: new key -> the key it replaced. Configs may use either; hashes use the old one (see :func:`config_hash`).
LEGACY_KEYS = {"nc_scale": "loss_scale"}

#: settings of the final evaluation only: a finished checkpoint can be re-scored under other values.
EVAL_ONLY = ("eval_scales", "eval_flip", "eval_crf", "crf_args", "eval_nc", "eval_kmeans")

# settings that cannot change the numbers: left out of the hash
_BOOKKEEPING = ("name", "device", "num_workers", "cache_data", "threads", "log_every", "ckpt_every")


@dataclass
class Config:
    """Every setting of a training run. Units: sigma_rgb in RGB 0..255 units, sigma_xy and crop in pixels."""

    name: str = "run"
    # model
    model: str = "small"
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: Union[bool, str] = False          # False | "imagenet" | path to torchvision weights
    init_checkpoint: Optional[str] = None          # stage 2: weights of a stage-1 run (model.pt)
    # data
    dataset: str = "scribble"                      # "scribble" (VOC + ScribbleSup layout) | "folder" (image/mask)
    root: Optional[str] = None                     # None: the embedded default (generated on first use)
    train_split: str = "train"
    val_split: str = "val"
    supervision: str = "scribble"                  # CE target: "scribble" (pCE) | "full" (masks) | "proposal" | "none"
    proposal_dir: Optional[str] = None             # supervision "proposal": mask folder under root (Proposals_grabcut)
    crop: int = 321
    scale_range: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    # losses
    ce_weight: float = 1.0
    nc_weight: float = 0.0                         # lambda (paper: 1.6)
    nel_weight: float = 0.0
    nc_present_only: bool = False                  # beyond the paper: NC over the scribbled labels only
    kmeans_weight: float = 0.0
    densecrf_weight: float = 0.0                   # beyond the paper: the authors' follow-up DenseCRF loss
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    nc_scale: float = 1.0                          # NC computed at this resolution factor (sigma_xy scaled alike)
    # optimisation (DeepLab)
    iterations: int = 6000
    batch_size: int = 10
    lr: float = 1e-3
    lr_classifier_mult: float = 10.0
    momentum: float = 0.9                          # SGD only
    optimizer: str = "sgd"                         # "sgd" (DeepLab's recipe) | "adam" (AdamW: training from scratch)
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    # run
    seed: int = 0
    device: str = "auto"                           # "auto" | "cpu" | "cuda" | "cuda:1"
    amp: bool = False                              # mixed precision (CUDA only); losses stay float32
    num_workers: int = 0
    cache_data: bool = True                        # keep decoded training images in memory (small sets)
    threads: int = 0                               # torch CPU threads (0: leave as is)
    val_every: int = 0                             # 0: no periodic validation
    val_max_images: int = 0                        # 0: whole val split
    val_nc: bool = False                           # also record the NC energy of val predictions (Fig 3)
    ckpt_every: int = 0                            # 0: only at the end / on interrupt
    log_every: int = 10
    # final evaluation (train_and_evaluate / run)
    eval_scales: Tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    eval_crf: bool = False
    crf_args: Dict[str, Any] = field(default_factory=dict)  # nclib.crf.dense_crf keywords (bandwidths in pixels)
    eval_nc: bool = False
    eval_kmeans: bool = False

    # ------------------------------------------------------------------ construction / validation
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        """A validated config from a mapping (unknown keys are an error; legacy key names are accepted)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a mapping, got {type(d).__name__}")
        kw = _rename_legacy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        for f in dataclasses.fields(cls):
            if f.name in kw:
                kw[f.name] = _coerce(f.name, kw[f.name])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "Config":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **kw) -> "Config":
        """A validated copy with ``kw`` changed (legacy key names accepted)."""
        return Config.from_dict({**self.to_dict(), **_rename_legacy(kw)})

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("scale_range", "eval_scales"):
            d[k] = list(d[k])
        return d

    def validate(self) -> None:
        """Type and range of every field, then the combinations; ValueError / TypeError naming the key."""
        for f in dataclasses.fields(self):
            _RULES[f.name](f.name, getattr(self, f.name))
        _check_combinations(self)


def _rename_legacy(d: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(d)
    for new, old in LEGACY_KEYS.items():
        if old in kw:
            if new in kw:
                raise ValueError(f"config key {old!r} is the old name of {new!r}: give only {new!r}")
            kw[new] = kw.pop(old)
    return kw


_FLOAT_FIELDS = ("ce_weight", "nc_weight", "nel_weight", "kmeans_weight", "densecrf_weight", "sigma_rgb", "sigma_xy", "nc_scale", "lr",
                 "lr_classifier_mult", "momentum", "weight_decay", "poly_power")


def _to_float(v: Any) -> Any:
    """30 -> 30.0 (one setting, one hash); '5e-4' (PyYAML's reading of 5e-4) -> 0.0005; anything else unchanged."""
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _coerce(key: str, v: Any) -> Any:
    if key in ("root", "init_checkpoint", "pretrained") and isinstance(v, os.PathLike):
        return str(v)
    if key in _FLOAT_FIELDS:
        return _to_float(v)
    if key in ("scale_range", "eval_scales") and isinstance(v, (list, tuple)):
        return tuple(_to_float(x) for x in v)
    return v


# ---------------------------------------------------------------------------------------------- field rules
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int, hi: Optional[int] = None) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{key} must be an int {rng}, got {v!r}")
    return check


def _float(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        ok = _is_number(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise ValueError(f"{key} must be a finite number in {rng}, got {v!r}")
    return check


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")


def _choice(*options: str) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if v not in options:
            raise ValueError(f"{key} must be one of {list(options)}, got {v!r}")
    return check


def _text(optional: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if optional and v is None:
            return
        if not isinstance(v, str) or not v:
            raise ValueError(f"{key} must be a non-empty string{' or null' if optional else ''}, got {v!r}")
    return check


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def _name(key: str, v: Any) -> None:
    """The results folder is ``<name>-<hash>``: a plain file name, never a path (``../x`` would escape it)."""
    if not isinstance(v, str) or not _NAME.fullmatch(v) or ".." in v:
        raise ValueError(f"{key} must be a plain folder name (letters, digits, '.', '_', '-', '+', '='; no '/' "
                         f"or '..'), got {v!r}")


def _proposal_dir(key: str, v: Any) -> None:
    """A folder directly under the data root (``Proposals_<method>``): a plain name, never a path."""
    if v is not None:
        _name(key, v)


def _model(key: str, v: Any) -> None:
    from ..models import MODELS

    _choice(*MODELS)(key, v)


def _str_keyed_dict(key: str, v: Any) -> None:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError(f"{key} must be a mapping with string keys, got {v!r}")


def _pretrained(key: str, v: Any) -> None:
    if not (isinstance(v, bool) or (isinstance(v, str) and v)):
        raise ValueError(f"{key} must be false, true / 'imagenet' or a path to weights, got {v!r}")


def _scales(n: Optional[int]) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        ok = isinstance(v, (tuple, list)) and (len(v) == n if n else len(v) >= 1)
        ok = ok and all(_is_number(x) and math.isfinite(x) and x > 0 for x in v)
        if not ok:
            what = f"{n} numbers > 0" if n else "a non-empty list of numbers > 0"
            raise ValueError(f"{key} must be {what}, got {list(v) if isinstance(v, (tuple, list)) else v!r}")
        if n == 2 and v[0] > v[1]:
            raise ValueError(f"{key} must be [low, high] with low <= high, got {list(v)}")
    return check


def _device(key: str, v: Any) -> None:
    import torch

    if v == "auto":
        return
    try:
        torch.device(v)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}") from None


def _crf_args(key: str, v: Any) -> None:
    import inspect

    from ..crf import dense_crf

    _str_keyed_dict(key, v)
    allowed = sorted(set(inspect.signature(dense_crf).parameters) - {"probs", "images", "roi"})
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise ValueError(f"{key} has unknown keys {unknown}; nclib.crf.dense_crf takes {allowed}")
    for k, x in v.items():  # dense_crf checks the ranges; the types are caught here, before the training
        if not (isinstance(x, str) if k == "normalization" else _is_number(x)):
            raise ValueError(f"{key}[{k!r}] must be a {'string' if k == 'normalization' else 'number'}, got {x!r}")


_RULES: Dict[str, Callable[[str, Any], None]] = {
    "name": _name, "model": _model, "model_args": _str_keyed_dict, "pretrained": _pretrained,
    "init_checkpoint": _text(optional=True),
    "dataset": _choice("scribble", "folder"), "root": _text(optional=True), "train_split": _text(),
    "val_split": _text(), "supervision": _choice("scribble", "full", "proposal", "none"),
    "proposal_dir": _proposal_dir, "crop": _int(1),
    "scale_range": _scales(2), "flip": _bool,
    "ce_weight": _float(0), "nc_weight": _float(0), "nel_weight": _float(0), "nc_present_only": _bool,
    "kmeans_weight": _float(0), "densecrf_weight": _float(0), "sigma_rgb": _float(0, lo_open=True), "sigma_xy": _float(0, lo_open=True),
    "nc_scale": _float(0, 1, lo_open=True),
    "iterations": _int(1), "batch_size": _int(1), "lr": _float(0, lo_open=True),
    "lr_classifier_mult": _float(0, lo_open=True), "momentum": _float(0, 1, hi_open=True),
    "optimizer": _choice("sgd", "adam"),
    "weight_decay": _float(0), "poly_power": _float(0),
    "seed": _int(0, 2**32 - 1), "device": _device, "amp": _bool, "num_workers": _int(0), "cache_data": _bool,
    "threads": _int(0), "val_every": _int(0), "val_max_images": _int(0), "val_nc": _bool, "ckpt_every": _int(0),
    "log_every": _int(1),
    "eval_scales": _scales(None), "eval_flip": _bool, "eval_crf": _bool, "crf_args": _crf_args, "eval_nc": _bool,
    "eval_kmeans": _bool,
}


def _check_combinations(cfg: Config) -> None:
    if cfg.ce_weight > 0 and cfg.supervision == "none":
        raise ValueError("ce_weight > 0 needs supervision 'scribble', 'full' or 'proposal' (got 'none')")
    if (cfg.supervision == "proposal") != (cfg.proposal_dir is not None):
        raise ValueError("supervision 'proposal' and proposal_dir go together (proposal_dir names the mask folder "
                         f"under root, e.g. Proposals_grabcut); got supervision {cfg.supervision!r}, proposal_dir "
                         f"{cfg.proposal_dir!r}")
    if cfg.supervision == "proposal" and cfg.dataset != "scribble":
        raise ValueError("supervision 'proposal' needs dataset 'scribble' (proposals are made from scribbles)")
    if cfg.nc_present_only and cfg.supervision != "scribble":
        raise ValueError("nc_present_only needs scribbles (supervision 'scribble')")
    if cfg.nel_weight > 0 and cfg.dataset != "scribble" and cfg.supervision != "scribble":
        raise ValueError("nel_weight > 0 needs scribbles (dataset 'scribble', or dataset 'folder' with supervision "
                         "'scribble', whose scribbles are synthesized)")
    if cfg.amp and not str(cfg.device).startswith(("cuda", "auto")):
        raise ValueError(f"amp needs a CUDA device, got device {cfg.device!r}")


# ---------------------------------------------------------------------------------------------- hash
def config_hash(cfg: Config, training_only: bool = False) -> str:
    """8 hex digits over every setting that can change the numbers (not name, device, workers, logging).

    Only settings that differ from the defaults enter (a new option keeps old hashes valid), under their legacy
    names (:data:`LEGACY_KEYS`, so a rename keeps them valid too). ``training_only`` leaves out the
    final-evaluation settings (:data:`EVAL_ONLY`): two configs with the same training hash produce the same
    checkpoint, so one may resume / re-score the other's.
    """
    defaults = Config().to_dict()
    d = {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}
    for k in _BOOKKEEPING + (EVAL_ONLY if training_only else ()):
        d.pop(k, None)
    d = {LEGACY_KEYS.get(k, k): v for k, v in d.items()}
    if cfg.root is None:  # the embedded default: a new generator version is new data
        from ..data.default import GENERATOR_VERSION

        d["default_data_version"] = GENERATOR_VERSION
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]
