"""Inference and scoring: multi-scale + flip testing, dense-CRF post-processing, mIoU, NC energy of predictions.

DeepLab's testing protocol: the network runs on the image at each scale (and its mirror), the softmax outputs are
resized to the image and averaged; optionally refined by the fully connected CRF (:func:`nclib.crf.dense_crf`);
the argmax is scored against the mask with one confusion matrix over the set (:mod:`nclib.metrics`).

The NC energy of predictions (Fig 3 of the paper) is the relaxed normalized cut ``sum_k S_k' W (1 - S_k) / d' S_k``
of the predicted probabilities, the very quantity the loss minimizes (no scribble clamping):
:func:`nclib.energies.nc_energy`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_rank
from .data.labels import IGNORE_LABEL, PAD_LABEL
from .energies import nc_energy as nc_energy_of
from .metrics import ConfusionMeter

__all__ = ["predict_probs", "evaluate"]



@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
                  ) -> torch.Tensor:
    """Softmax (B, K, H, W) averaged over ``scales`` (input resize factors) and, with ``flip``, mirrored inputs.

    images: (B, 3, H, W) RGB 0..255. The model must be in eval mode (the caller's choice; not changed here).
    """
    check_rank("images", images, 4, "(B, 3, H, W)")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales!r}")
    size = images.shape[-2:]
    acc: Optional[torch.Tensor] = None
    n = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=float(s), mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if mirrored else x
            logits = model(xi).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            p = torch.softmax(logits, dim=1)
            acc = p if acc is None else acc + p
            n += 1
    return acc / n


def evaluate(model: nn.Module, dataset, num_classes: int, device: Union[str, torch.device] = "cpu",
             scales: Sequence[float] = (1.0,), flip: bool = False, crf: bool = False,
             crf_kwargs: Optional[Dict[str, Any]] = None, nc_energy: bool = False, sigma_rgb: float = 15.0,
             sigma_xy: float = 100.0, max_images: Optional[int] = None, kmeans_energy: bool = False) -> Dict[str, Any]:
    """Score ``model`` on ``dataset`` (samples with "image" (3, H, W) RGB 0..255 and "mask" (H, W); 255 void,
    254 padding). Returns ``miou``, ``pixel_acc``, per-class ``iou`` (and ``*_crf`` with ``crf``), and with
    ``nc_energy`` the mean NC energy of the predictions (``nc_energy``) and of the ground truth (``nc_energy_gt``),
    with ``kmeans_energy`` the mean soft K-means energy (RGB, per pixel) of the predictions (Fig 5b).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = ConfusionMeter(num_classes)
    meter_crf = ConfusionMeter(num_classes) if crf else None
    energies, energies_gt, km = [], [], []
    n = len(dataset) if not max_images else min(len(dataset), int(max_images))
    if n == 0:
        raise ValueError("evaluation data set is empty")
    try:
        for i in range(n):
            sample = dataset[i]
            img = sample["image"][None].to(device).float()
            mask = sample["mask"][None].to(device).long()
            target = mask.masked_fill(mask == PAD_LABEL, IGNORE_LABEL)
            probs = predict_probs(model, img, scales, flip)
            meter.update(probs.argmax(1), target)
            if meter_crf is not None:
                from .crf import dense_crf

                refined = dense_crf(probs, img, **(crf_kwargs or {}))
                meter_crf.update(refined.argmax(1), target)
            if nc_energy:
                roi = mask != PAD_LABEL
                energies.append(float(nc_energy_of(probs, img, sigma_rgb, sigma_xy, roi)[0]))
                valid = mask < PAD_LABEL
                onehot = F.one_hot(target.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
                energies_gt.append(float(nc_energy_of(onehot, img, sigma_rgb, sigma_xy, valid)[0]))
            if kmeans_energy:
                from .losses import kmeans_loss

                km.append(float(kmeans_loss(probs, img)))
    finally:
        model.train(was_training)
    out: Dict[str, Any] = {"images": n, **_rounded(meter.summary())}
    if meter_crf is not None:
        out.update({k + "_crf": v for k, v in _rounded(meter_crf.summary()).items()})
    if nc_energy:
        out["nc_energy"] = round(sum(energies) / n, 6)
        out["nc_energy_gt"] = round(sum(energies_gt) / n, 6)
    if kmeans_energy:
        out["kmeans_energy"] = round(sum(km) / n, 4)
    return out


def _rounded(summary: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}
