"""The training loop: DeepLab's SGD with poly learning rate, the loss terms, AMP, DDP, NaN guard, checkpoints.

:func:`train` trains a :class:`~nclib.train.config.Config` into a folder (``model.pt``), resuming exactly from a
checkpoint found there. Under ``torchrun`` (WORLD_SIZE > 1) the global batch is split over the processes and
gradients are averaged by DistributedDataParallel; the data stream (:mod:`nclib.train.stream`) makes 2 processes
see the batches of 1.
"""
from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..data.labels import IGNORE_LABEL, PAD_LABEL
from ..models import build_model, param_groups
from .checkpoint import (
    atomic_save,
    check_compatible,
    load_checkpoint,
    load_weights,
    resolve_checkpoint_path,
    rng_state,
    set_rng_state,
)
from .config import Config, config_hash
from .stream import SeededDataset, StreamSampler, build_datasets, collate

__all__ = ["train", "NonFiniteLossError", "MAX_LOGIT", "loss_terms", "nc_term", "batch_targets", "poly_lr", "dist_env",
           "resolve_device", "make_optimizer"]

Callback = Callable[[int, Dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """Raised when the logits, a loss term or the weights turn NaN/inf, or the logits exceed :data:`MAX_LOGIT`:
    the run stops instead of training on garbage. The message names the iteration, the loss terms and the likely
    fix (a lower ``lr``)."""


# |logits| beyond this: float32 softmax is exactly one-hot (exp underflows past ~100), so the gradients of the
# losses vanish and the weights stay garbage with finite, plausible-looking losses (NC alone at lr 1e6 reaches 1e9
# in one step). A trained network stays in the tens.
MAX_LOGIT = 1e4


# --------------------------------------------------------------------------------------- distributed
def dist_env() -> Tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """``cfg.device`` made concrete: "auto" is CUDA when present, "cuda" is this process's GPU."""
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for but CUDA is not available")
    return torch.device(dev)


# ------------------------------------------------------------------------------------------ losses
def batch_targets(batch: Dict[str, Any], cfg: Config, device: torch.device):
    """images, CE target (padding -> ignore), scribbles for NC/NEL (or None), roi (label != padding)."""
    images = batch["image"].to(device, non_blocking=True).float()
    mask = batch["mask"].to(device, non_blocking=True).long()
    roi = mask != PAD_LABEL
    scrib = batch.get("scribble")
    scrib = None if scrib is None else scrib.to(device, non_blocking=True).long().masked_fill(~roi, IGNORE_LABEL)
    mask = mask.masked_fill(~roi, IGNORE_LABEL)
    # "proposal": the training set's masks are the proposal folder (build_datasets), so the target is the mask
    target = {"scribble": scrib, "full": mask, "proposal": mask, "none": None}[cfg.supervision]
    if cfg.supervision == "scribble" and scrib is None:
        raise ValueError("supervision 'scribble' needs a dataset with scribbles (dataset 'scribble')")
    return images, target, scrib, roi


def nc_term(logits: torch.Tensor, probs: torch.Tensor, images: torch.Tensor, scribbles: Optional[torch.Tensor],
            roi: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The unweighted NC loss of a batch: over all K labels (the paper), or with ``cfg.nc_present_only`` over the
    labels present in each image's scribbles. logits / probs (B, K, H, W), images (B, 3, H, W) RGB 0..255,
    scribbles (B, H, W) (None without scribbles), roi (B, H, W) bool."""
    from .. import losses as L

    if cfg.nc_present_only:
        return L.normalized_cut_loss(logits, images, scribbles, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy,
                                     scale=cfg.nc_scale, roi=roi, from_logits=True, labels="present")
    clamp = scribbles if cfg.supervision == "scribble" else None
    return L.normalized_cut_loss(probs, images, clamp, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy,
                                 scale=cfg.nc_scale, roi=roi)


def loss_terms(logits: torch.Tensor, images: torch.Tensor, target: Optional[torch.Tensor],
               scribbles: Optional[torch.Tensor], roi: torch.Tensor, cfg: Config) -> Dict[str, torch.Tensor]:
    """The weighted loss terms of one batch, all float32. ``total`` is their sum.

    CE is the mean over images of each image's mean over its labelled pixels, so that the loss of a global batch
    is the mean of per-rank losses (DDP = one process).
    """
    from .. import losses as L

    logits = logits.float()
    terms: Dict[str, torch.Tensor] = {}
    if cfg.ce_weight > 0:
        ce = torch.stack([L.partial_cross_entropy(logits[i:i + 1], target[i:i + 1]) for i in range(logits.shape[0])])
        terms["ce"] = cfg.ce_weight * ce.mean()
    if cfg.nc_weight > 0 or cfg.nel_weight > 0 or cfg.kmeans_weight > 0 or cfg.densecrf_weight > 0:
        probs = torch.softmax(logits, dim=1)
        if cfg.nc_weight > 0:
            terms["nc"] = cfg.nc_weight * nc_term(logits, probs, images, scribbles, roi, cfg)
        if cfg.nel_weight > 0:
            terms["nel"] = cfg.nel_weight * L.nel_loss(probs, scribbles)
        if cfg.kmeans_weight > 0:  # crop padding is left out, or it would form a cluster of its own
            terms["kmeans"] = cfg.kmeans_weight * L.kmeans_loss(probs, images, roi=roi)
        if cfg.densecrf_weight > 0:  # same kernel and resolution as the NC term
            terms["densecrf"] = cfg.densecrf_weight * L.densecrf_loss(
                probs, images, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy, scale=cfg.nc_scale, roi=roi)
    if not terms:
        raise ValueError("every loss weight is 0: nothing to train")
    terms["total"] = sum(terms.values())
    return terms


def poly_lr(cfg: Config, it: int) -> float:
    """DeepLab's poly schedule: ``lr * (1 - it / iterations) ** poly_power``."""
    return cfg.lr * (1.0 - it / cfg.iterations) ** cfg.poly_power


# ------------------------------------------------------------------------------------------- training
def train(cfg: Config, out_dir: Union[str, Path], resume: bool = True, progress: bool = True,
          callback: Optional[Callback] = None) -> Dict[str, Any]:
    """Train ``cfg`` writing ``out_dir/model.pt`` (checkpoint: model, optimizer, iteration, RNG states, history).

    An existing ``model.pt`` in ``out_dir`` is resumed (exactly) when ``resume``. ``callback(iteration, terms)``
    runs after every step (tests use it to interrupt). Under ``torchrun`` (WORLD_SIZE > 1) the global batch
    ``batch_size`` is split over the processes and gradients are averaged by DistributedDataParallel.
    Returns ``{"history": [...], "checkpoint": path, "iterations": n, "seconds": s}``.
    """
    import torch.distributed as dist

    cfg.validate()
    rank, world, local_rank = dist_env()
    device = resolve_device(cfg, local_rank)
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
        state = _setup(cfg, Path(out_dir), resume, rank, world, device)
        return _loop(state, progress and rank == 0, callback)
    finally:
        if own_group:
            dist.destroy_process_group()


@dataclass
class _State:
    """Everything one training run carries between steps."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    train_set: Any
    val_set: Any
    num_classes: int
    ckpt_path: Path
    start: int = 0
    history: Dict[str, list] = field(default_factory=lambda: {"train": [], "val": []})
    net: Optional[nn.Module] = None
    last_terms: Optional[Dict[str, float]] = None


def _setup(cfg: Config, out_dir: Path, resume: bool, rank: int, world: int, device: torch.device) -> _State:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    train_set, val_set, num_classes = build_datasets(cfg)
    model = build_model(cfg.model, num_classes, pretrained=cfg.pretrained, **cfg.model_args)
    if cfg.init_checkpoint:
        init_path = resolve_checkpoint_path(cfg.init_checkpoint)
        if not init_path.is_file():
            raise ValueError(f"init_checkpoint {cfg.init_checkpoint} not found (nor under the results root): train "
                             f"stage 1 first; run() and `python -m nclib train` retrain a stage 1 of the results "
                             f"cache whose metrics.json is there but whose model.pt is not")
        ck = load_checkpoint(init_path)
        check_compatible(ck, cfg.model, num_classes, init_path, cfg.model_args)
        _check_finished(ck, init_path)
        load_weights(model, ck, init_path)
    model.to(device)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=bool(cfg.amp and device.type == "cuda"))
    st = _State(cfg, rank, world, device, model, opt, scaler, train_set, val_set, num_classes, out_dir / "model.pt")
    if resume and st.ckpt_path.is_file():
        _resume(st)
    st.net = model
    if world > 1:
        st.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return st


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """DeepLab's SGD (momentum) or AdamW over :func:`nclib.models.param_groups`; the poly schedule rescales
    both through each group's ``lr_mult``. AdamW trains a small network from scratch in far fewer iterations
    (the miniature's pre-training, notebook 03); fine-tuning keeps DeepLab's SGD."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_classifier_mult)
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _check_finished(ck: Dict[str, Any], path: Path) -> None:
    """An ``init_checkpoint`` must be a finished run, not a periodic save of an interrupted one."""
    total = ck["config"].get("iterations")
    if not isinstance(total, int) or int(ck["iteration"]) < total:
        raise ValueError(f"init_checkpoint {path} stopped at iteration {ck['iteration']} of {total}: that run did "
                         f"not finish; finish it first (run it again: it resumes), then start this stage")


def _resume(st: _State) -> None:
    ck = load_checkpoint(st.ckpt_path)
    check_compatible(ck, st.cfg.model, st.num_classes, st.ckpt_path)
    if config_hash(Config.from_dict(ck["config"]), True) != config_hash(st.cfg, True):
        raise ValueError(f"checkpoint {st.ckpt_path} was written by another config; remove it or use another "
                         f"output folder")
    load_weights(st.model, ck, st.ckpt_path)
    try:
        st.opt.load_state_dict(ck["optimizer"])
        st.scaler.load_state_dict(ck["scaler"])
        st.start, st.history = int(ck["iteration"]), ck["history"]
        set_rng_state(ck["rng"][st.rank] if isinstance(ck["rng"], list) else ck["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"checkpoint {st.ckpt_path} cannot be resumed: its optimizer / RNG state is missing or "
                         f"malformed ({type(err).__name__}: {err}); remove it to start over") from None


def _save(st: _State, it: int) -> None:
    """Checkpoint at iteration ``it`` (rank 0 writes; under DDP every rank's RNG state is kept)."""
    import torch.distributed as dist

    rngs: Any = rng_state()
    if st.world > 1:
        gathered: List[Any] = [None] * st.world
        dist.all_gather_object(gathered, rngs)
        rngs = gathered
    if st.rank == 0:
        atomic_save({"config": st.cfg.to_dict(), "model_name": st.cfg.model, "num_classes": st.num_classes,
                     "model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
                     "scaler": st.scaler.state_dict(), "iteration": it, "rng": rngs, "history": st.history},
                    st.ckpt_path)
    if st.world > 1:
        dist.barrier()


def _validate(st: _State, it: int) -> None:
    """Periodic validation on rank 0 (the others wait): mIoU, and the NC energy with ``val_nc``."""
    import torch.distributed as dist

    from ..evaluate import evaluate

    cfg = st.cfg
    if st.rank == 0:
        res = evaluate(st.model, st.val_set, st.num_classes, device=st.device, max_images=cfg.val_max_images or None,
                       nc_energy=cfg.val_nc, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy)
        st.history["val"].append({"iteration": it, "miou": round(res["miou"], 5),
                                  **({"nc": round(res["nc_energy"], 5)} if cfg.val_nc else {})})
        st.model.train()
    if st.world > 1:
        dist.barrier()


def _loader(st: _State) -> torch.utils.data.DataLoader:
    cfg = st.cfg
    sampler = StreamSampler(len(st.train_set), cfg.batch_size, cfg.seed, st.start, cfg.iterations, st.rank, st.world)
    return torch.utils.data.DataLoader(SeededDataset(st.train_set, cfg.cache_data), batch_sampler=sampler,
                                       num_workers=cfg.num_workers, collate_fn=collate,
                                       pin_memory=st.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(cfg.seed))


def _step(st: _State, batch: Dict[str, Any], it: int) -> Dict[str, float]:
    """One optimizer step at iteration ``it``; the float loss terms. NonFiniteLossError before a NaN is applied."""
    cfg = st.cfg
    for g in st.opt.param_groups:
        g["lr"] = poly_lr(cfg, it) * g["lr_mult"]
    images, target, scrib, roi = batch_targets(batch, cfg, st.device)
    with torch.autocast(device_type=st.device.type, dtype=torch.float16, enabled=st.scaler.is_enabled()):
        logits = st.net(images)
    peak = float(logits.detach().float().abs().max())
    if not peak <= MAX_LOGIT:  # also NaN
        raise NonFiniteLossError(_diverged(st, it, f"the network's output (logits) reached {peak:.3g} (beyond "
                                                   f"{MAX_LOGIT:g} the softmax is one-hot: the weights blew up)"))
    terms = loss_terms(logits, images, target, scrib, roi, cfg)
    vals = {k: float(v.detach()) for k, v in terms.items()}
    if not all(math.isfinite(v) for v in vals.values()):
        raise NonFiniteLossError(_diverged(st, it, "non-finite loss", vals))
    st.opt.zero_grad(set_to_none=True)
    st.scaler.scale(terms["total"]).backward()
    st.scaler.step(st.opt)
    st.scaler.update()
    params = [p.detach() for p in st.model.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise NonFiniteLossError(_diverged(st, it, "the weights are not finite after the optimizer step", vals))
    st.last_terms = vals
    return vals


def _diverged(st: _State, it: int, what: str, vals: Optional[Dict[str, float]] = None) -> str:
    """The NonFiniteLossError message: iteration, loss terms (this step's, else the last finite ones), the fix."""
    terms = vals if vals is not None else st.last_terms
    label = "loss terms" if vals is not None else "loss terms of the previous step"
    return (f"training diverged at iteration {it}: {what}; {label}: {terms or 'none yet'}. Likely fix: a lower "
            f"learning rate (lr is {st.cfg.lr:g}; try 10x lower) or smaller loss weights")


def _after_step(st: _State, it: int, vals: Dict[str, float]) -> None:
    """Bookkeeping once iteration ``it`` is done (``done = it + 1`` iterations): log, validate, checkpoint."""
    cfg, done = st.cfg, it + 1
    if it % cfg.log_every == 0 or done == cfg.iterations:
        st.history["train"].append({"iteration": done, **{k: round(v, 5) for k, v in vals.items()}})
    if cfg.val_every and done % cfg.val_every == 0 and done < cfg.iterations:
        _validate(st, done)
    if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.iterations:
        _save(st, done)


class _Interrupt:
    """SIGINT sets a flag; the loop saves and stops at the next iteration boundary (the state as of that boundary:
    weights, optimizer and RNG states all after the same finished iteration). A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.flag = False
        self.installed = False
        self.prev: Any = signal.default_int_handler

    def _handler(self, signum, frame) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, self.prev)  # a second Ctrl-C: the previous behaviour (stop now, no save)

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            prev = signal.signal(signal.SIGINT, self._handler)
            self.prev = prev if prev is not None else signal.SIG_DFL  # None: a handler not set from Python
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.prev)

    def pending(self, st: _State) -> bool:
        """Whether any rank was interrupted (under DDP all ranks stop at the same boundary)."""
        if st.world == 1:
            return self.flag
        import torch.distributed as dist

        t = torch.tensor([int(self.flag)], device=st.device if st.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _next_batch(st: _State, data, done: int):
    """The next batch; a data error (a missing or unreadable file) saves the finished iterations first."""
    try:
        return next(data)
    except StopIteration:
        return None
    except Exception as err:
        if st.world == 1 and done > st.start:
            _save(st, done)
            err.add_note(f"nclib: the {done} finished iterations were saved to {st.ckpt_path}; fix the data and "
                         f"run again to resume")
        raise


def _loop(st: _State, progress: bool, callback: Optional[Callback]) -> Dict[str, Any]:
    if progress:  # tqdm.auto warns inside a Jupyter kernel without ipywidgets, even for a disabled bar
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    cfg = st.cfg
    data = iter(_loader(st))
    st.model.train()
    t0, done = time.time(), st.start
    bar = tqdm(total=cfg.iterations, initial=st.start, disable=not progress, desc=cfg.name, dynamic_ncols=True)
    with _Interrupt() as stop:
        try:
            while done < cfg.iterations:
                batch = _next_batch(st, data, done)
                if batch is None:
                    break
                vals = _step(st, batch, done)
                _after_step(st, done, vals)
                done += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in vals.items()}, refresh=False)
                if callback is not None:
                    callback(done, vals)
                if done < cfg.iterations and stop.pending(st):
                    _save(st, done)  # Ctrl-C: keep the finished iterations, exactly
                    raise KeyboardInterrupt(f"interrupted after iteration {done}; saved to {st.ckpt_path}")
        finally:
            bar.close()
        if cfg.val_every and (not st.history["val"] or st.history["val"][-1]["iteration"] != cfg.iterations):
            _validate(st, cfg.iterations)
        _save(st, cfg.iterations)
    if stop.flag:
        raise KeyboardInterrupt(f"interrupted; the finished run was saved to {st.ckpt_path}")
    return {"history": st.history, "checkpoint": str(st.ckpt_path), "iterations": cfg.iterations,
            "seconds": round(time.time() - t0, 1)}
