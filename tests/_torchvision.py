"""Synthetic stand-ins for torchvision's ImageNet checkpoints (nothing is downloaded in the tests).

The key names and shapes are written from the VGG / ResNet papers in torchvision's naming, so that
``nclib.models.load_imagenet`` is exercised on state dicts shaped exactly like the real ones.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

Spec = List[Tuple[str, Tuple[int, ...]]]
VGG16_CONV = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_spec() -> Spec:
    """(key, shape) of torchvision's vgg16 state dict: features.<i> convs, classifier.0/3/6."""
    spec, idx, cin = [], 0, 3
    for v in VGG16_CONV:
        if v == "M":
            idx += 1
            continue
        spec += [(f"features.{idx}.weight", (v, cin, 3, 3)), (f"features.{idx}.bias", (v,))]
        idx, cin = idx + 2, v  # conv + relu
    return spec + [("classifier.0.weight", (4096, 512 * 7 * 7)), ("classifier.0.bias", (4096,)),
                   ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
                   ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,))]


def resnet101_spec() -> Spec:
    """(key, shape) of torchvision's resnet101 state dict (bottleneck v1.5 naming)."""
    def bn(p, c):
        return [(f"{p}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + \
            [(f"{p}.num_batches_tracked", ())]

    spec = [("conv1.weight", (64, 3, 7, 7))] + bn("bn1", 64)
    cin = 64
    for li, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3)), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            spec += [(f"{p}.conv1.weight", (width, cin, 1, 1))] + bn(f"{p}.bn1", width)
            spec += [(f"{p}.conv2.weight", (width, width, 3, 3))] + bn(f"{p}.bn2", width)
            spec += [(f"{p}.conv3.weight", (4 * width, width, 1, 1))] + bn(f"{p}.bn3", 4 * width)
            if b == 0:
                spec += [(f"{p}.downsample.0.weight", (4 * width, cin, 1, 1))] + bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    return spec + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def torchvision_spec(backbone: str) -> Spec:
    return {"vgg16": vgg16_spec, "resnet101": resnet101_spec}[backbone]()


def he_synthetic(spec: Spec, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights an ImageNet net could have, so that a forward pass stays in float range: He-scaled
    filters, small biases, BN statistics of unit scale (residual branches' last BN scaled down, as trained
    ResNets have it, so 101 layers stay finite)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in spec:
        if not shape:  # num_batches_tracked
            sd[key] = torch.tensor(7)
        elif len(shape) >= 2:
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("running_mean", "bias")):
            sd[key] = 0.05 * torch.randn(shape, generator=g)
        else:  # BN scale
            sd[key] = (0.1 if ".bn3." in key else 0.5) + 0.5 * torch.rand(shape, generator=g)
    return sd
