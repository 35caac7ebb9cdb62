"""Segmentation scores as the VOC benchmark computes them: one confusion matrix accumulated over the whole set.

IoU_k = TP_k / (TP_k + FP_k + FN_k); mIoU is the mean over classes that occur in the ground truth or the
predictions (a class absent from both has an undefined IoU and is left out). Pixels labelled ``ignore_index``
(255, VOC's void; crop padding must be mapped to it) are not scored.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ._checks import check_rank, check_same_device, check_tensor
from .data.labels import IGNORE_LABEL

__all__ = ["confusion_matrix", "iou_per_class", "mean_iou", "pixel_accuracy", "ConfusionMeter", "boundary_band",
           "band_accuracy"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction.

    Args:
        pred: (B, H, W) or (H, W) integer labels in [0, K).
        target: same shape; labels in [0, K) or ``ignore_index``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_tensor("pred", pred, "(B, H, W) or (H, W)")
    check_tensor("target", target, "(B, H, W) or (H, W)")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(f"pred and target must be integer label maps, got {pred.dtype} and {target.dtype}")
    check_same_device("pred", pred, "target", target)
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel():
        t_lo, t_hi, p_lo, p_hi = torch.stack([t.min(), t.max(), p.min(), p.max()]).tolist()  # one read
        if t_lo < 0 or t_hi >= num_classes:
            raise ValueError(f"target labels must lie in [0, {num_classes}) or be {ignore_index}; "
                             f"found {sorted(set(t.unique().tolist()) - set(range(num_classes)))[:5]}")
        if p_lo < 0 or p_hi >= num_classes:
            raise ValueError(f"pred labels must lie in [0, {num_classes}), found range [{p_lo}, {p_hi}]")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """(K,) float64 IoU per class; NaN for a class absent from both ground truth and predictions."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean IoU over the classes with a defined IoU (VOC's rule)."""
    iou = iou_per_class(conf)
    valid = ~torch.isnan(iou)
    return float(iou[valid].mean()) if bool(valid.any()) else float("nan")


def pixel_accuracy(conf: torch.Tensor) -> float:
    total = conf.sum()
    return float(conf.diag().sum().double() / total) if int(total) > 0 else float("nan")


class ConfusionMeter:
    """Accumulates a confusion matrix over batches; ``summary()`` gives mIoU, per-class IoU and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL, class_names: Optional[List[str]] = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.conf += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def summary(self) -> Dict[str, object]:
        iou = iou_per_class(self.conf)
        return {
            "miou": mean_iou(self.conf),
            "pixel_acc": pixel_accuracy(self.conf),
            "iou": [None if v != v else round(float(v), 6) for v in iou.tolist()],
        }


def boundary_band(target: torch.Tensor, width: int, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """(B, H, W) bool: scored pixels within ``width`` px of a ground-truth boundary (DeepLab's trimap protocol).

    A boundary pixel has a 4-neighbour of another (scored) label; the band holds the scored pixels whose
    chessboard distance to a boundary pixel is below ``width``, i.e. ``width`` px on each side of an edge.
    ``target`` (B, H, W) integer labels; ``ignore_index`` pixels are neither boundaries nor scored.
    """
    check_tensor("target", target, "(B, H, W)")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1 (pixels), got {width!r}")
    check_rank("target", target, 3, "(B, H, W)")
    t = target.long()
    valid = t != ignore_index
    edge = torch.zeros_like(valid)
    vert = (t[:, 1:] != t[:, :-1]) & valid[:, 1:] & valid[:, :-1]  # both pixels of a differing pair are boundary
    edge[:, 1:] |= vert
    edge[:, :-1] |= vert
    horiz = (t[:, :, 1:] != t[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    edge[:, :, 1:] |= horiz
    edge[:, :, :-1] |= horiz
    k = 2 * width - 1
    band = torch.nn.functional.max_pool2d(edge[:, None].float(), k, stride=1, padding=width - 1)[:, 0] > 0
    return band & valid


def band_accuracy(pred: torch.Tensor, target: torch.Tensor, width: int, ignore_index: int = IGNORE_LABEL):
    """(correct, total) pixel counts inside :func:`boundary_band` of ``target``; sum them over a set, then divide.

    pred, target (B, H, W) integer labels on the same device.
    """
    check_tensor("pred", pred, "(B, H, W)")
    check_tensor("target", target, "(B, H, W)")
    check_same_device("pred", pred, "target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    band = boundary_band(target, width, ignore_index)
    return int(((pred.long() == target.long()) & band).sum()), int(band.sum())
