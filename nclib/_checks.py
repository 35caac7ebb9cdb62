"""Input validation shared by every public function: clear ``TypeError``/``ValueError``s that name the argument.

Two kinds of checks:

* **shape / type** checks (a torch.Tensor, its rank, dtype, matching sizes and devices) read only metadata and are
  always on;
* **value** checks (finite, ranges, label values) read the tensor: each costs one reduction and one device-to-host
  read per tensor. They can be switched off for hot training loops whose inputs are known to be good:
  ``nclib.set_checks(False)``, the context manager ``with nclib.checks(False): ...``, or the environment variable
  ``NCLIB_CHECKS=0`` (read at import). Off, bad values give wrong numbers or a late error instead of a clear one.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Iterator, Optional, Sequence

import torch

_ENABLED = os.environ.get("NCLIB_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


# ------------------------------------------------------------------------------------------------ the switch
def set_checks(enabled: bool) -> bool:
    """Turn the value checks (finite, ranges, label values) on or off for the process; returns the old setting."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    old, _ENABLED = _ENABLED, enabled
    return old


def checks_enabled() -> bool:
    """Whether value checks run (``NCLIB_CHECKS=0`` in the environment turns them off at import)."""
    return _ENABLED


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Context manager: value checks on or off inside the block, restored after (``with nclib.checks(False):``)."""
    old = set_checks(enabled)
    try:
        yield
    finally:
        set_checks(old)


# ------------------------------------------------------------------------------------------ generic checks
def check_tensor(name: str, t, layout: str) -> None:
    """TypeError unless ``t`` is a torch.Tensor: the first check of every public function."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__module__}.{type(t).__name__}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    check_tensor(name, t, layout)
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")


def _read(*scalars: torch.Tensor) -> Sequence[float]:
    """Several 0-dim tensors to Python floats with one device-to-host read."""
    return torch.stack([s.detach().double() for s in scalars]).tolist()


def _nonfinite(name: str, t: torch.Tensor) -> ValueError:
    bad = "NaN" if bool(torch.isnan(t.detach()).any()) else "inf"  # error path only
    return ValueError(f"{name} contains {bad} values (shape {tuple(t.shape)})")


def check_finite(name: str, t: torch.Tensor) -> float:
    """Raise if ``t`` has NaN or inf; return ``max |t|`` (0 for non-floating tensors) for range checks.

    Always on (callers such as the lattice need ``max |t|``); one reduction and one read.
    """
    if not t.is_floating_point():
        return 0.0
    # min and max propagate NaN and show inf: one fused reduction, ~40x cheaper than materialising isfinite(t).
    lo, hi = _read(*torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _nonfinite(name, t)
    return max(-lo, hi)


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_same_spatial(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{name_a} and {name_b} must share batch and spatial size: "
            f"{name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)}"
        )


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")


def check_scale(scale: float) -> None:
    check_positive("scale", scale)
    if scale > 1:
        raise ValueError(f"scale must be in (0, 1] (a downscaling factor), got {scale!r}")


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


# ------------------------------------------------------------------------------------ the tensors of the API
def check_probs(probs: torch.Tensor, from_logits: bool = False, name: str = "probs") -> torch.Tensor:
    """Validate (B, K, H, W) probabilities (or logits with ``from_logits``); return float32 probabilities.

    Value checks: finite; in [0, 1]; summing to 1 over dim 1 (looser for float16/bfloat16), one read.
    """
    check_rank(name, probs, 4, "(B, K, H, W)")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {probs.dtype}")
    low_precision = probs.dtype in (torch.float16, torch.bfloat16)
    p = _float32(probs)
    if _ENABLED:
        with torch.no_grad():
            pd = p.detach()
            lo, hi = torch.aminmax(pd)  # NaN propagates, inf shows
            if from_logits:
                lo, hi = _read(lo, hi)
                err = 0.0
            else:
                lo, hi, err = _read(lo, hi, (pd.sum(1) - 1).abs().amax())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _nonfinite(name, probs)
        tol = 1e-2 if low_precision else 1e-4
        if not from_logits and (lo < -tol or hi > 1 + tol):
            raise ValueError(
                f"{name} must be probabilities in [0, 1] (softmax over dim 1), got values in [{lo:.4g}, {hi:.4g}]; "
                "pass from_logits=True to give raw network scores"
            )
        if err > (2e-2 if low_precision else 1e-3):
            raise ValueError(
                f"{name} must sum to 1 over the class dimension (dim 1), max deviation {err:.3g}; "
                "pass from_logits=True to give raw network scores"
            )
    return torch.softmax(p, dim=1) if from_logits else p


def check_images(images: torch.Tensor, like: Optional[torch.Tensor] = None, like_name: str = "probs") -> torch.Tensor:
    """Validate (B, 3, H, W) RGB images in 0..255 (matching ``like`` in batch, size, device); return float32.

    Value checks (one read): finite, within 0..255; a warning when the maximum is in (0, 1], which looks like
    images scaled to 0..1 (bandwidths such as ``sigma_rgb=15`` are in 0..255 units).
    """
    check_rank("images", images, 4, "(B, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(images.shape)}")
    if like is not None:
        check_same_spatial("images", images, like_name, like)
        check_same_device("images", images, like_name, like)
    img = _float32(images)
    if _ENABLED:
        lo, hi = _read(*torch.aminmax(img.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _nonfinite("images", images)
        if lo < -1e-3 or hi > 255.001:
            raise ValueError(
                f"images must be RGB in 0..255 (not mean-subtracted), got values in [{lo:.4g}, {hi:.4g}]"
            )
        if 0 < hi <= 1.0:
            warnings.warn(
                f"images have values in [{lo:.4g}, {hi:.4g}]: this looks like RGB scaled to 0..1, but images must be "
                "RGB in 0..255 (multiply by 255)", UserWarning, stacklevel=3,
            )
    return img


def check_labels(
    name: str,
    labels: torch.Tensor,
    like: torch.Tensor,
    num_classes: Optional[int] = None,
    ignore_index: Optional[int] = None,
    like_name: str = "probs",
) -> torch.Tensor:
    """The one label-map check: (B, H, W) integer labels matching ``like`` (B, *, H, W); returns int64.

    Value check (one read): every label is in 0..num_classes-1 (or >= 0 without ``num_classes``) unless it is
    ``ignore_index``.
    """
    check_rank(name, labels, 3, "(B, H, W)")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must be an integer (int64) label map, got dtype {labels.dtype}")
    want = (like.shape[0],) + tuple(like.shape[-2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"{name} must have shape (B, H, W) = {want} to match {like_name}, got {tuple(labels.shape)}")
    check_same_device(name, labels, like_name, like)
    s = labels.long()
    if _ENABLED:
        bad = s < 0
        if num_classes is not None:
            bad |= s >= num_classes
        if ignore_index is not None:
            bad &= s != ignore_index
        if bool(bad.any()):
            vals = torch.unique(s[bad])[:5].tolist()
            where = f"0..{num_classes - 1} (num_classes = {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{name} has labels {vals} outside {where} that are not the ignore index {ignore_index}")
    return s


def check_roi(roi: Optional[torch.Tensor], like: torch.Tensor, like_name: str = "probs") -> Optional[torch.Tensor]:
    """None or a (B, H, W) mask matching ``like``; returned as bool."""
    if roi is None:
        return None
    check_rank("roi", roi, 3, "(B, H, W)")
    want = (like.shape[0],) + tuple(like.shape[-2:])
    if tuple(roi.shape) != want:
        raise ValueError(f"roi must have shape (B, H, W) = {want} to match {like_name}, got {tuple(roi.shape)}")
    check_same_device("roi", roi, like_name, like)
    return roi.bool()
