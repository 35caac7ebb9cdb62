"""Training engine: DeepLab's SGD recipe with pCE / full CE and the paper's regularizers (NC, NEL, K-means).

* :class:`Config` -- every setting of a run (YAML or dict; unknown keys are an error).
* :func:`train` -- the loop: poly learning rate, 10x classifier rate, progress bar, periodic validation, atomic
  checkpoints with exact resume, AMP on GPU (losses in float32), DistributedDataParallel under ``torchrun``,
  NaN guard.
* :func:`run` -- the results cache: train + evaluate once per config, stored under
  ``results/<name>-<hash of config>/`` (``metrics.json`` small enough to commit, ``model.pt`` git-ignored).

Two-stage recipe of the paper (Sec 5.2): stage 1 trains with pCE only; stage 2 starts from stage 1's weights
(``init_checkpoint``) and minimizes pCE + lambda * NC (+ NEL).

Determinism: sample ``t`` of the run (``t = iteration * batch + j``) is image ``perm_epoch[t mod n]`` with a per-epoch
permutation drawn from ``seed``, and its augmentation is drawn from RNGs seeded by ``(seed, t)``. The data stream is
therefore a function of the iteration alone: a resumed run sees the very samples the uninterrupted run would, and a
run split over R processes sees the same global batches as one process (each rank takes a contiguous slice).
This is why ``torch.utils.data.DistributedSampler`` is not used: its padding and shuffling depend on the world
size, so 2 processes would not see 1 process's batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .models import MODELS, build_model, param_groups

__all__ = ["Config", "train", "run", "results_root", "config_hash", "load_checkpoint", "load_model",
           "NonFiniteLossError", "build_datasets"]

IGNORE = 255
PAD = 254


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term turns NaN/inf: the run stops instead of training on garbage."""


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
    supervision: str = "scribble"                  # CE target: "scribble" (pCE) | "full" (masks) | "none"
    crop: int = 321
    scale_range: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    # losses
    ce_weight: float = 1.0
    nc_weight: float = 0.0                         # lambda (paper: 1.6)
    nel_weight: float = 0.0
    nc_present_only: bool = False                  # beyond the paper: NC over the scribbled labels only
    kmeans_weight: float = 0.0
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    loss_scale: float = 1.0                        # NC computed at this resolution factor (sigma_xy scaled alike)
    # optimisation (DeepLab)
    iterations: int = 6000
    batch_size: int = 10
    lr: float = 1e-3
    lr_classifier_mult: float = 10.0
    momentum: float = 0.9
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
    # final evaluation (run())
    eval_scales: Tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    eval_crf: bool = False
    crf_args: Dict[str, Any] = field(default_factory=dict)  # nclib.crf.dense_crf keywords (bandwidths in pixels)
    eval_nc: bool = False
    eval_kmeans: bool = False

    # ------------------------------------------------------------------ construction / validation
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        kw = dict(d)
        for f in dataclasses.fields(cls):  # 30 and 30.0 are one setting (and one hash)
            v = kw.get(f.name)
            if isinstance(f.default, float) and isinstance(v, int) and not isinstance(v, bool):
                kw[f.name] = float(v)
        for k in ("scale_range", "eval_scales"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(float(v) for v in kw[k])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "Config":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **kw) -> "Config":
        return Config.from_dict({**self.to_dict(), **kw})

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("scale_range", "eval_scales"):
            d[k] = list(d[k])
        return d

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.dataset not in ("scribble", "folder"):
            raise ValueError(f"dataset must be 'scribble' or 'folder', got {self.dataset!r}")
        if self.supervision not in ("scribble", "full", "none"):
            raise ValueError(f"supervision must be 'scribble', 'full' or 'none', got {self.supervision!r}")
        for k in ("iterations", "batch_size", "crop"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        for k in ("lr", "sigma_rgb", "sigma_xy", "loss_scale"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{k} must be a finite number > 0, got {v!r}")
        if self.loss_scale > 1:
            raise ValueError(f"loss_scale must be in (0, 1], got {self.loss_scale}")
        for k in ("ce_weight", "nc_weight", "nel_weight", "kmeans_weight", "weight_decay", "momentum"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        if self.ce_weight > 0 and self.supervision == "none":
            raise ValueError("ce_weight > 0 needs supervision 'scribble' or 'full' (got 'none')")
        if self.nc_present_only and self.supervision != "scribble":
            raise ValueError("nc_present_only needs scribbles (supervision 'scribble')")
        if (self.nel_weight > 0) and self.dataset != "scribble":
            raise ValueError("nel_weight > 0 needs scribbles (dataset 'scribble')")
        if self.amp and not str(self.device).startswith(("cuda", "auto")):
            raise ValueError(f"amp needs a CUDA device, got device {self.device!r}")


#: settings of the final evaluation only: a finished checkpoint can be re-scored under other values.
EVAL_ONLY = ("eval_scales", "eval_flip", "eval_crf", "crf_args", "eval_nc", "eval_kmeans")


def config_hash(cfg: Config, training_only: bool = False) -> str:
    """8 hex digits over every setting that can change the numbers (not name, device, workers, logging).

    ``training_only`` leaves out the final-evaluation settings (:data:`EVAL_ONLY`): two configs with the same
    training hash produce the same checkpoint, so one may resume / re-score the other's.
    """
    defaults = Config().to_dict()
    d = {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}  # a new option keeps old hashes valid
    for k in ("name", "device", "num_workers", "cache_data", "threads", "log_every", "ckpt_every"):
        d.pop(k, None)
    if training_only:
        for k in EVAL_ONLY:
            d.pop(k, None)
    if cfg.root is None:  # the embedded default: a new generator version is new data
        from .data.default import GENERATOR_VERSION

        d["default_data_version"] = GENERATOR_VERSION
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------- data
def build_datasets(cfg: Config):
    """(train, val, num_classes) for the config; the embedded default when ``root`` is None."""
    from . import data as D

    train_tf = D.TrainTransform(crop=cfg.crop, scale=tuple(cfg.scale_range), flip=cfg.flip)
    if cfg.dataset == "scribble":
        root = Path(cfg.root) if cfg.root else D.ensure_default() / "scribble"
        train = D.VOCScribbleDataset(root, cfg.train_split, transform=train_tf)
        val = D.VOCScribbleDataset(root, cfg.val_split, transform=D.EvalTransform())
    else:
        root = Path(cfg.root) if cfg.root else D.ensure_default() / "salient"
        scrib = "synthesize" if cfg.supervision == "scribble" else "none"
        train = D.MaskFolderDataset(root, cfg.train_split, transform=train_tf, scribbles=scrib)
        val = D.MaskFolderDataset(root, cfg.val_split, transform=D.EvalTransform(), scribbles="none")
    return train, val, int(train.num_classes)


class _Seeded(torch.utils.data.Dataset):
    """Wraps a dataset: item ``(index, seed)`` runs the base transform under RNGs seeded by ``seed``.

    With ``cache`` (datasets with ``load(i)`` + ``transform``, like nclib.data's), decoded samples stay in memory
    and only the random transform runs per draw (small sets; decoding dominated the small network's step).
    """

    def __init__(self, base, cache: bool = False) -> None:
        self.base = base
        self.cache: Optional[Dict[int, Any]] = {} if cache and hasattr(base, "load") and hasattr(base, "transform") \
            else None

    def _get(self, index: int):
        if self.cache is None:
            return self.base[index]
        if index not in self.cache:
            self.cache[index] = self.base.load(index)
        tf = self.base.transform
        return tf(self.cache[index]) if tf is not None else self.cache[index]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                return self._get(index)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


class _StreamSampler(torch.utils.data.Sampler):
    """Batches of ``(index, sample_seed)`` for iterations ``start .. stop-1``; rank r of R takes its slice."""

    def __init__(self, n: int, batch: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.stop = n, batch, seed, start, stop
        self.rank, self.world = rank, world
        self.local = batch // world
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for it in range(self.start, self.stop):
            out = []
            for j in range(self.rank * self.local, (self.rank + 1) * self.local):
                t = it * self.batch + j
                idx = int(self._perm(t // self.n)[t % self.n])
                out.append((idx, (self.seed * 2_000_003 + t) % 2**62))
            yield out


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


# --------------------------------------------------------------------------------------- distributed
def _dist_env() -> Tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def _resolve_device(cfg: Config, local_rank: int) -> torch.device:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for but CUDA is not available")
    return torch.device(dev)


# ------------------------------------------------------------------------------------------ losses
def _targets(batch: Dict[str, Any], cfg: Config, device: torch.device):
    """images, CE target (254 -> 255), scribbles for NC/NEL (or None), roi (mask != padding)."""
    images = batch["image"].to(device, non_blocking=True).float()
    mask = batch["mask"].to(device, non_blocking=True).long()
    roi = mask != PAD
    scrib = batch.get("scribble")
    scrib = None if scrib is None else scrib.to(device, non_blocking=True).long().masked_fill(~roi, IGNORE)
    mask = mask.masked_fill(~roi, IGNORE)
    target = {"scribble": scrib, "full": mask, "none": None}[cfg.supervision]
    if cfg.supervision == "scribble" and scrib is None:
        raise ValueError("supervision 'scribble' needs a dataset with scribbles (dataset 'scribble')")
    return images, target, scrib, roi


def _nc_present_only(logits: torch.Tensor, images: torch.Tensor, scribbles: torch.Tensor, roi: torch.Tensor,
                     cfg: Config) -> torch.Tensor:
    """NC over the labels present in each image's scribbles: softmax over those logits only, mean over images.

    Beyond the paper (its Eq. 6 sums over all K labels). Why: the ratio ``S_k'W(1 - S_k) / d'S_k`` does not depend
    on the scale of ``S_k``, so an absent label with a faint, diffuse softmax residue contributes ~1 however small
    its mass; with K labels and a few present, those residues dominate the loss and its gradient pushes absent
    labels onto colour clusters. Restricting the partition to the scribbled labels removes that term (labels
    absent from the scribbles are left to pCE / NEL). Images without scribbles contribute 0.
    """
    from . import losses as L

    vals = []
    for i in range(logits.shape[0]):
        s = scribbles[i]
        present = torch.unique(s[s != IGNORE])
        if present.numel() < 2:  # one label: the partition is trivial, NC = 0
            vals.append(logits.new_zeros(()))
            continue
        remap = torch.full((logits.shape[1],), IGNORE, dtype=torch.long, device=logits.device)
        remap[present] = torch.arange(present.numel(), device=logits.device)
        sub = torch.where(s != IGNORE, remap[s.clamp_max(logits.shape[1] - 1)], s)
        probs = torch.softmax(logits[i:i + 1, present], dim=1)
        vals.append(L.normalized_cut_loss(probs, images[i:i + 1], sub[None], sigma_rgb=cfg.sigma_rgb,
                                          sigma_xy=cfg.sigma_xy, scale=cfg.loss_scale, roi=roi[i:i + 1]))
    return torch.stack(vals).mean()


def loss_terms(logits: torch.Tensor, images: torch.Tensor, target: Optional[torch.Tensor],
               scribbles: Optional[torch.Tensor], roi: torch.Tensor, cfg: Config) -> Dict[str, torch.Tensor]:
    """The weighted loss terms of one batch, all float32. ``total`` is their sum.

    CE is the mean over images of each image's mean over its labelled pixels, so that the loss of a global batch
    is the mean of per-rank losses (DDP = one process).
    """
    from . import losses as L

    logits = logits.float()
    terms: Dict[str, torch.Tensor] = {}
    if cfg.ce_weight > 0:
        ce = torch.stack([L.partial_cross_entropy(logits[i:i + 1], target[i:i + 1]) for i in range(logits.shape[0])])
        terms["ce"] = cfg.ce_weight * ce.mean()
    if cfg.nc_weight > 0 or cfg.nel_weight > 0 or cfg.kmeans_weight > 0:
        probs = torch.softmax(logits, dim=1)
        clamp = scribbles if cfg.supervision == "scribble" else None
        if cfg.nc_weight > 0 and cfg.nc_present_only:
            terms["nc"] = cfg.nc_weight * _nc_present_only(logits, images, scribbles, roi, cfg)
        elif cfg.nc_weight > 0:
            terms["nc"] = cfg.nc_weight * L.normalized_cut_loss(
                probs, images, clamp, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy, scale=cfg.loss_scale,
                roi=roi)
        if cfg.nel_weight > 0:
            terms["nel"] = cfg.nel_weight * L.nel_loss(probs, scribbles)
        if cfg.kmeans_weight > 0:  # crop padding is left out, or it would form a cluster of its own
            terms["kmeans"] = cfg.kmeans_weight * L.kmeans_loss(probs, images, roi=roi)
    if not terms:
        raise ValueError("every loss weight is 0: nothing to train")
    terms["total"] = sum(terms.values())
    return terms


# -------------------------------------------------------------------------------------- checkpoints
def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
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


def _check_compatible(ckpt: Dict[str, Any], model_name: str, num_classes: int, path: Union[str, Path]) -> None:
    got = (ckpt.get("model_name"), ckpt.get("num_classes"))
    if got != (model_name, num_classes):
        raise ValueError(
            f"checkpoint {path} holds model {got[0]!r} with {got[1]} classes, but the config asks for "
            f"{model_name!r} with {num_classes} classes"
        )


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Config]:
    """A trained model (eval mode) and its config from a checkpoint written by :func:`train`."""
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(ckpt["model_name"], ckpt["num_classes"], **cfg.model_args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def _resolve_path(p: Union[str, Path]) -> Path:
    path = Path(p)
    if not path.is_absolute() and not path.exists() and (results_root() / path).exists():
        return results_root() / path
    return path


# ------------------------------------------------------------------------------------------- training
def _poly(cfg: Config, it: int) -> float:
    return cfg.lr * (1.0 - it / cfg.iterations) ** cfg.poly_power


def train(cfg: Config, out_dir: Union[str, Path], resume: bool = True, progress: bool = True,
          callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """Train ``cfg`` writing ``out_dir/model.pt`` (checkpoint: model, optimizer, iteration, RNG states, history).

    An existing ``model.pt`` in ``out_dir`` is resumed (exactly) when ``resume``. ``callback(iteration, terms)``
    runs after every step (tests use it to interrupt). Under ``torchrun`` (WORLD_SIZE > 1) the global batch
    ``batch_size`` is split over the processes and gradients are averaged by DistributedDataParallel.
    Returns ``{"history": [...], "checkpoint": path, "iterations": n, "seconds": s}``.
    """
    import torch.distributed as dist

    cfg.validate()
    out_dir = Path(out_dir)
    rank, world, local_rank = _dist_env()
    device = _resolve_device(cfg, local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out_dir, resume, progress and rank == 0, callback, rank, world, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(cfg, out_dir, resume, progress, callback, rank, world, device) -> Dict[str, Any]:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from .evaluate import evaluate

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    train_set, val_set, num_classes = build_datasets(cfg)
    model = build_model(cfg.model, num_classes, pretrained=cfg.pretrained, **cfg.model_args)
    if cfg.init_checkpoint:
        init_path = _resolve_path(cfg.init_checkpoint)
        ck = load_checkpoint(init_path)
        _check_compatible(ck, cfg.model, num_classes, init_path)
        model.load_state_dict(ck["model"])
    model.to(device)
    opt = torch.optim.SGD(param_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_classifier_mult),
                          lr=cfg.lr, momentum=cfg.momentum)
    use_amp = bool(cfg.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ckpt_path = out_dir / "model.pt"
    start, history = 0, {"train": [], "val": []}
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        _check_compatible(ck, cfg.model, num_classes, ckpt_path)
        if config_hash(Config.from_dict(ck["config"]), True) != config_hash(cfg, True):
            raise ValueError(f"checkpoint {ckpt_path} was written by another config; remove it or use another "
                             f"output folder")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, history = int(ck["iteration"]), ck["history"]
        _set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(it: int) -> None:
        rngs: Any = _rng_state()
        if world > 1:
            gathered: List[Any] = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if rank == 0:
            _atomic_save({"config": cfg.to_dict(), "model_name": cfg.model, "num_classes": num_classes,
                          "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                          "iteration": it, "rng": rngs, "history": history}, ckpt_path)
        if world > 1:
            dist.barrier()

    def validate(it: int) -> None:
        if rank == 0:
            res = evaluate(model, val_set, num_classes, device=device, max_images=cfg.val_max_images or None,
                           nc_energy=cfg.val_nc, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy)
            history["val"].append({"iteration": it, "miou": round(res["miou"], 5),
                                   **({"nc": round(res["nc_energy"], 5)} if cfg.val_nc else {})})
            model.train()
        if world > 1:
            dist.barrier()

    sampler = _StreamSampler(len(train_set), cfg.batch_size, cfg.seed, start, cfg.iterations, rank, world)
    loader = torch.utils.data.DataLoader(_Seeded(train_set, cfg.cache_data), batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    t0, it = time.time(), start
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=cfg.name, dynamic_ncols=True)
    try:
        for it, batch in enumerate(loader, start=start):
            for g in opt.param_groups:
                g["lr"] = _poly(cfg, it) * g["lr_mult"]
            images, target, scrib, roi = _targets(batch, cfg, device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = net(images)
            terms = loss_terms(logits, images, target, scrib, roi, cfg)
            vals = {k: float(v.detach()) for k, v in terms.items()}
            if not all(math.isfinite(v) for v in vals.values()):
                raise NonFiniteLossError(f"non-finite loss at iteration {it}: {vals}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            scaler.step(opt)
            scaler.update()
            done = it + 1
            if it % cfg.log_every == 0 or done == cfg.iterations:
                history["train"].append({"iteration": done, **{k: round(v, 5) for k, v in vals.items()}})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in vals.items()}, refresh=False)
            if cfg.val_every and done % cfg.val_every == 0 and done < cfg.iterations:
                validate(done)
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.iterations:
                save(done)
            if callback is not None:
                callback(done, vals)
            it = done
    except KeyboardInterrupt:
        save(it)  # Ctrl-C: keep the finished iterations
        raise
    finally:
        bar.close()
    if cfg.val_every and (not history["val"] or history["val"][-1]["iteration"] != cfg.iterations):
        validate(cfg.iterations)
    save(cfg.iterations)
    return {"history": history, "checkpoint": str(ckpt_path), "iterations": cfg.iterations,
            "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------ results cache
def results_root() -> Path:
    """``$NCLIB_RESULTS``, else ``<repo>/results`` in a source checkout, else ``./results``."""
    env = os.environ.get("NCLIB_RESULTS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    return repo / "results" if (repo / "pyproject.toml").is_file() else Path.cwd() / "results"


def run_dir(cfg: Config) -> Path:
    return results_root() / f"{cfg.name}-{config_hash(cfg)}"


def run(cfg: Union[Config, Dict[str, Any]], force: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Train and evaluate ``cfg`` once; later calls return the stored ``metrics.json`` (unless ``force``).

    Stored under ``results/<name>-<hash>/``: ``metrics.json`` (config, final scores, a thinned training history;
    a few kB, meant to be committed) and ``model.pt`` (the checkpoint; git-ignored). An interrupted run resumes
    from its checkpoint. The result's ``checkpoint`` is relative to :func:`results_root`, so it can serve as the
    ``init_checkpoint`` of a stage-2 config on any machine.
    """
    cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
    out = run_dir(cfg)
    if (out / "metrics.json").is_file() and not force:  # cached: read without taking the lock
        return json.loads((out / "metrics.json").read_text())
    with _run_lock(out):
        return _run(cfg, out, force, progress)


@contextlib.contextmanager
def _run_lock(out: Path):
    """One process at a time per results folder (a second one waits, then finds the stored result).

    An OS lock (released when the holder dies); skipped under torchrun, where every rank runs the same config.
    """
    if _dist_env()[1] > 1:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cfg: Config, out: Path, force: bool, progress: bool) -> Dict[str, Any]:
    from .evaluate import evaluate

    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not force:
        return json.loads(metrics_path.read_text())
    if force and (out / "model.pt").is_file():
        (out / "model.pt").unlink()
    tr = train(cfg, out, resume=True, progress=progress)
    rank, _, _ = _dist_env()
    if rank != 0:
        return tr
    model, _ = load_model(out / "model.pt", device=_resolve_device(cfg, 0))
    _, val_set, num_classes = build_datasets(cfg)
    res: Dict[str, Any] = {"name": cfg.name, "hash": config_hash(cfg), "config": cfg.to_dict(),
                           "checkpoint": f"{out.name}/model.pt", "train_seconds": tr["seconds"],
                           "history": _thin(tr["history"])}
    ev = evaluate(model, val_set, num_classes, device=next(model.parameters()).device, scales=(1.0,), flip=False,
                  crf=cfg.eval_crf, crf_kwargs=cfg.crf_args, nc_energy=cfg.eval_nc, sigma_rgb=cfg.sigma_rgb,
                  sigma_xy=cfg.sigma_xy, kmeans_energy=cfg.eval_kmeans)
    res["val"] = ev
    if tuple(cfg.eval_scales) != (1.0,) or cfg.eval_flip:
        res["val_msc"] = evaluate(model, val_set, num_classes, device=next(model.parameters()).device,
                                  scales=cfg.eval_scales, flip=cfg.eval_flip, crf=cfg.eval_crf,
                                  crf_kwargs=cfg.crf_args)
    tmp = metrics_path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
    os.replace(tmp, metrics_path)
    return res


def _thin(history: Dict[str, list], keep: int = 40) -> Dict[str, list]:
    """At most ``keep`` training-loss points (evenly spaced, last kept) so metrics.json stays small."""
    tr = history["train"]
    if len(tr) > keep:
        step = math.ceil(len(tr) / keep)
        tr = tr[::step] + ([tr[-1]] if (len(tr) - 1) % step else [])
    return {"train": tr, "val": history["val"]}
