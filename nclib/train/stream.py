"""The deterministic data stream: datasets of a config, seeded samples, and the iteration-indexed sampler.

Sample ``t`` of the run (``t = iteration * batch + j``) is image ``perm_epoch[t mod n]`` with a per-epoch
permutation drawn from ``seed``, and its augmentation is drawn from RNGs seeded by ``(seed, t)``. The data stream is
therefore a function of the iteration alone: a resumed run sees the very samples the uninterrupted run would, and a
run split over R processes sees the same global batches as one process (each rank takes a contiguous slice).
This is why ``torch.utils.data.DistributedSampler`` is not used: its padding and shuffling depend on the world
size, so 2 processes would not see 1 process's batches.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .config import Config

__all__ = ["build_datasets", "SeededDataset", "StreamSampler", "collate"]


def build_datasets(cfg: Config):
    """(train, val, num_classes) for the config; the embedded default when ``root`` is None."""
    from .. import data as D

    train_tf = D.TrainTransform(crop=cfg.crop, scale=tuple(cfg.scale_range), flip=cfg.flip)
    if cfg.dataset == "scribble":
        root = Path(cfg.root) if cfg.root else D.ensure_default() / "scribble"
        mask_dir = _proposal_masks(cfg, root) if cfg.supervision == "proposal" else "SegmentationClassAug"
        train = D.VOCScribbleDataset(root, cfg.train_split, transform=train_tf, mask_dir=mask_dir)
        val = D.VOCScribbleDataset(root, cfg.val_split, transform=D.EvalTransform())
    else:
        root = Path(cfg.root) if cfg.root else D.ensure_default() / "salient"
        scrib = "synthesize" if cfg.supervision == "scribble" else "none"
        train = D.MaskFolderDataset(root, cfg.train_split, transform=train_tf, scribbles=scrib)
        val = D.MaskFolderDataset(root, cfg.val_split, transform=D.EvalTransform(), scribbles="none")
    return train, val, int(train.num_classes)


def _proposal_masks(cfg: Config, root: Path) -> str:
    """The proposal folder as the training split's masks (validation stays on the ground truth). A missing standard
    folder (``Proposals_<method>[_ignore]``) is made now from the scribbles, as a missing stage 1 is retrained (e.g.
    ``make figures FORCE=1`` on a clean clone); any other missing folder is an error naming the command."""
    from .. import data as D

    folder = root / cfg.proposal_dir
    if folder.is_dir():
        return cfg.proposal_dir
    name = cfg.proposal_dir
    known = {D.proposal_folder(m, ig): (m, ig) for m in D.PROPOSAL_METHODS for ig in (False, True)}
    if name in known:
        method, ignore = known[name]
        print(f"{folder} not found: computing the {method} proposals of the {cfg.train_split} split now")
        D.write_proposal_masks(root, method, split=cfg.train_split, out=folder, unsure_ignore=ignore)
        return cfg.proposal_dir
    raise ValueError(f"proposal folder not found: {folder}. Make it with `python -m nclib.data proposals --method "
                     f"<grabcut|nc|kernelcut> --root {root} --split {cfg.train_split} --out {folder}`")


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset: item ``(index, seed)`` runs the base transform under RNGs seeded by ``seed``.

    With ``cache`` (datasets with ``load(i)`` + ``transform``, like nclib.data's), decoded samples stay in memory
    and only the random transform runs per draw (small sets; decoding dominated the small network's step).
    The global RNG states (torch, numpy, random) are left as they were.
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


class StreamSampler(torch.utils.data.Sampler):
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


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Sample dicts -> one batch dict: tensors stacked (B, ...), other values (ids) as lists."""
    out: Dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
