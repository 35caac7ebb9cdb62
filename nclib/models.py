"""DeepLab segmentation networks used in the paper, plus a small network of the same family for CPU runs.

Every model takes images (B, 3, H, W) in RGB 0..255 (like the losses) and returns logits (B, K, H, W) at the input
size (bilinear upsampling of the output-stride-8 score map, as the PyTorch ports of DeepLab do).

* ``largefov``      DeepLab-LargeFOV (v1): VGG16, output stride 8 (pool4/pool5 stride 1, conv5 dilation 2),
                    fc6 3x3 dilation 12 with 1024 channels, fc7 1x1 1024, fc8 classifier.
* ``msc_largefov``  DeepLab-MSc-LargeFOV: the same network applied to the input at scales 1, 0.75, 0.5; the score
                    maps are upsampled to the input size and fused by an element-wise max (DeepLab v2's MSC). Note:
                    DeepLab v1's "MSc" instead concatenated MLP branches on the input and pool1-4; the max-fused
                    multi-scale input is the variant used by the PyTorch reproductions and asked for here.
* ``vgg16_aspp``    DeepLab-v2 VGG16 with ASPP-L: four fc6 (3x3, dilation 6/12/18/24, 1024) -> fc7 -> fc8
                    branches, summed.
* ``resnet101_aspp`` DeepLab-v2 ResNet-101 (layer3 dilation 2, layer4 dilation 4, output stride 8), ASPP with
                    rates 6/12/18/24 straight to the classes, summed; BatchNorm frozen (DeepLab trained with it
                    frozen at batch 10).
* ``small``         a few dilated conv blocks (GroupNorm, output stride 8 or 4), a light ASPP (rates 1/2/4, summed):
                    minutes on 2 CPU cores; batch-independent, so DDP and single-process runs agree.

ImageNet initialisation (``build_model(..., pretrained="imagenet" | path)``) reads torchvision's published weight
files (``torch.hub.load_state_dict_from_url``, or a local ``.pth``), maps their keys, and for the fc layers applies
DeepLab's decimation (see :func:`decimate_vgg_fc`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_rank

__all__ = [
    "MODELS",
    "IMAGENET_URLS",
    "build_model",
    "load_imagenet",
    "decimate_vgg_fc",
    "param_groups",
    "DeepLabLargeFOV",
    "DeepLabMSc",
    "DeepLabVGG16ASPP",
    "DeepLabResNet101",
    "SmallDeepLab",
    "load_small_backbone",
]

#: torchvision's published ImageNet weights (the hash prefix in the file name is checked by torch.hub).
IMAGENET_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

# torchvision's ImageNet normalisation, applied inside the model to RGB 0..255 inputs.
_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# VGG16 configuration (torchvision's "D"): channels, "M" = max pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _Normalize(nn.Module):
    """RGB 0..255 -> ImageNet-normalised input (fixed buffers, no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _SegNet(nn.Module):
    """Base: checks input, normalises, runs ``scores`` at output stride 8 and upsamples to the input size."""

    #: name prefixes of the classifier parameters (they get ``lr_classifier_mult``).
    classifier_prefixes: Tuple[str, ...] = ()
    #: torchvision backbone whose ImageNet weights fit (None: no ImageNet init).
    imagenet_backbone: Optional[str] = None

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.normalize = _Normalize()

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, images: torch.Tensor) -> None:
        check_rank("images", images, 4, "(B, 3, H, W)")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) RGB 0..255 -> logits (B, K, H, W)."""
        self._check(images)
        out = self.scores(self.normalize(images))
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _classifier(in_ch: int, num_classes: int, kernel: int = 1, dilation: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, num_classes, kernel, padding=dilation * (kernel // 2), dilation=dilation)
    nn.init.normal_(conv.weight, std=0.01)  # DeepLab's fc8 initialisation
    nn.init.zeros_(conv.bias)
    return conv


def _vgg16_features() -> nn.Sequential:
    """VGG16 conv layers with DeepLab's output-stride-8 changes, indexed exactly like torchvision's ``features``.

    pool1-3: 3x3 stride 2 pad 1; pool4, pool5: 3x3 stride 1 pad 1; conv5_x: dilation 2.
    """
    layers: List[nn.Module] = []
    in_ch, n_pool = 3, 0
    for v in _VGG16_CFG:
        if v == "M":
            n_pool += 1
            stride = 2 if n_pool <= 3 else 1
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1, ceil_mode=True))
        else:
            dil = 2 if n_pool == 4 else 1
            layers += [nn.Conv2d(in_ch, v, 3, padding=dil, dilation=dil), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


class _FCHead(nn.Module):
    """fc6 (3x3, dilation d, 1024) -> ReLU -> dropout -> fc7 (1x1, 1024) -> ReLU -> dropout -> fc8 (classes)."""

    def __init__(self, num_classes: int, dilation: int, width: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc6 = nn.Conv2d(512, width, 3, padding=dilation, dilation=dilation)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.drop = nn.Dropout2d(dropout)
        self.fc8 = _classifier(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)


class DeepLabLargeFOV(_SegNet):
    """DeepLab-LargeFOV (v1): VGG16 at output stride 8 with a 1024-channel fc6, 3x3 dilation 12."""

    classifier_prefixes = ("head.fc8.",)
    imagenet_backbone = "vgg16"

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.features = _vgg16_features()
        self.head = _FCHead(num_classes, dilation=12)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DeepLabMSc(_SegNet):
    """Multi-scale inputs (default 1, 0.75, 0.5) through one shared network, score maps fused by max."""

    def __init__(self, base: _SegNet, scales: Sequence[float] = (1.0, 0.75, 0.5)) -> None:
        super().__init__(base.num_classes)
        self.base = base
        self.scales = tuple(float(s) for s in scales)
        self.classifier_prefixes = tuple("base." + p for p in base.classifier_prefixes)
        self.imagenet_backbone = base.imagenet_backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        size = images.shape[-2:]
        fused = None
        for s in self.scales:
            x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            y = self.base(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused = y if fused is None else torch.maximum(fused, y)
        return fused


class DeepLabVGG16ASPP(_SegNet):
    """DeepLab-v2 VGG16 with ASPP-L: four fc6/fc7/fc8 branches at dilations 6/12/18/24, summed."""

    imagenet_backbone = "vgg16"

    def __init__(self, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__(num_classes)
        self.features = _vgg16_features()
        self.branches = nn.ModuleList([_FCHead(num_classes, dilation=r) for r in rates])
        self.classifier_prefixes = tuple(f"branches.{i}.fc8." for i in range(len(rates)))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return sum(b(f) for b in self.branches)


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3 conv), with dilation."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, dilation: int, downsample: Optional[nn.Module]) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class DeepLabResNet101(_SegNet):
    """DeepLab-v2 ResNet-101: output stride 8 (layer3/layer4 dilated 2/4), ASPP 6/12/18/24 summed, frozen BN."""

    imagenet_backbone = "resnet101"

    def __init__(
        self, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24), blocks: Sequence[int] = (3, 4, 23, 3),
        freeze_bn: bool = True,
    ) -> None:
        super().__init__(num_classes)
        self.freeze_bn = freeze_bn
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        specs = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))  # width, stride, dilation
        for i, ((width, stride, dil), n) in enumerate(zip(specs, blocks), start=1):
            layer, in_ch = self._layer(in_ch, width, n, stride, dil)
            setattr(self, f"layer{i}", layer)
        self.aspp = nn.ModuleList([_classifier(in_ch, num_classes, kernel=3, dilation=r) for r in rates])
        self.classifier_prefixes = ("aspp.",)
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    @staticmethod
    def _layer(in_ch: int, width: int, n: int, stride: int, dilation: int) -> Tuple[nn.Sequential, int]:
        out = width * _Bottleneck.expansion
        down = None
        if stride != 1 or in_ch != out:
            down = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        blocks = [_Bottleneck(in_ch, width, stride, dilation, down)]
        blocks += [_Bottleneck(out, width, 1, dilation, None) for _ in range(n - 1)]
        return nn.Sequential(*blocks), out

    def train(self, mode: bool = True) -> "DeepLabResNet101":
        super().train(mode)
        if self.freeze_bn:  # BN statistics stay those of ImageNet
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return sum(a(x) for a in self.aspp)


class _ConvGN(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.GroupNorm(8, out_ch),
            nn.ReLU(inplace=True),
        )


class SmallDeepLab(_SegNet):
    """A small DeepLab: strided conv stem to output stride 8 (or 4), dilated blocks, light ASPP summed; GroupNorm
    keeps it batch-independent (DDP = single process). ``output_stride`` 4 drops the third stride and doubles every
    later dilation (DeepLab's rule): same receptive field in pixels, a logit grid twice as fine (a default object,
    ~37 px, spans ~9 cells instead of 4.6). ``backbone``: a SmallDeepLab checkpoint (``<run>/model.pt``) whose
    ``stem`` and ``context`` initialise this one (the miniature's "ImageNet", notebook 03); ``aspp`` stays random.
    """

    classifier_prefixes = ("aspp.",)

    def __init__(self, num_classes: int, width: int = 32, rates: Sequence[int] = (1, 2, 4), dropout: float = 0.1,
                 output_stride: int = 8, backbone: Optional[str] = None):
        super().__init__(num_classes)
        if output_stride not in (4, 8):
            raise ValueError(f"output_stride must be 4 or 8, got {output_stride!r}")
        w, k, self.output_stride = width, 8 // output_stride, output_stride
        self.stem = nn.Sequential(_ConvGN(3, w, stride=2), _ConvGN(w, w), _ConvGN(w, 2 * w, stride=2),
                                  _ConvGN(2 * w, 2 * w), _ConvGN(2 * w, 4 * w, stride=2 // k),
                                  _ConvGN(4 * w, 4 * w, dilation=k))
        self.context = nn.Sequential(_ConvGN(4 * w, 4 * w, dilation=2 * k), _ConvGN(4 * w, 4 * w, dilation=4 * k))
        self.drop = nn.Dropout2d(dropout)
        self.aspp = nn.ModuleList([_classifier(4 * w, num_classes, kernel=3, dilation=r * k) for r in rates])
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in set(self.aspp):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if backbone is not None:
            load_small_backbone(self, backbone)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        f = self.drop(self.context(self.stem(x)))
        return sum(a(f) for a in self.aspp)


def load_small_backbone(model: SmallDeepLab, checkpoint: Union[str, Path]) -> List[str]:
    """Copy ``stem`` / ``context`` from a SmallDeepLab training checkpoint; returns the keys left (the classifier)."""
    from .train.checkpoint import load_checkpoint, resolve_checkpoint_path

    path, part = resolve_checkpoint_path(checkpoint), ("stem.", "context.")
    if not path.is_file():
        raise ValueError(f"backbone checkpoint {path} not found (train the pre-training run first)")
    mapped = {k: v for k, v in load_checkpoint(path).get("model", {}).items() if k.startswith(part)}
    own = model.state_dict()
    bad = [k for k in own if k.startswith(part) and (k not in mapped or mapped[k].shape != own[k].shape)]
    if bad or not mapped:
        raise ValueError(f"backbone checkpoint {path} does not fit this SmallDeepLab (width / output stride?): "
                         f"{bad[:5] or 'no stem/context weights'}")
    model.load_state_dict(mapped, strict=False)
    return sorted(k for k in own if k not in mapped)


MODELS = ("small", "largefov", "msc_largefov", "vgg16_aspp", "resnet101_aspp")


def decimate_vgg_fc(fc6_w: torch.Tensor, fc6_b: torch.Tensor, fc7_w: torch.Tensor, fc7_b: torch.Tensor,
                    channel_step: int = 4, tap_step: int = 3) -> Dict[str, torch.Tensor]:
    """DeepLab's decimation of VGG16's fully connected layers into LargeFOV's fc6/fc7.

    fc6 (4096, 25088) is viewed as a (4096, 512, 7, 7) convolution; keeping every ``channel_step``-th output
    channel (0, 4, ..., 4092) and every ``tap_step``-th spatial tap (rows/cols 0, 3, 6) gives (1024, 512, 3, 3).
    Subsampled taps 3 apart on the stride-32 grid are 12 apart at output stride 8: hence fc6's dilation 12
    (Chen et al., ICLR 2015, Sec 4.1: "spatially subsample (by simple decimation) the first FC layer"; 4096 -> 1024
    channels for LargeFOV). fc7 (4096, 4096) keeps every ``channel_step``-th output and input -> (1024, 1024, 1, 1).
    """
    if tuple(fc6_w.shape) != (4096, 512 * 7 * 7) or tuple(fc7_w.shape) != (4096, 4096):
        raise ValueError(
            f"expected VGG16 fc weights (4096, 25088) and (4096, 4096), got {tuple(fc6_w.shape)} and "
            f"{tuple(fc7_w.shape)}"
        )
    c, t = channel_step, tap_step
    w6 = fc6_w.view(4096, 512, 7, 7)[::c, :, ::t, ::t].contiguous()
    w7 = fc7_w[::c, ::c].contiguous().view(4096 // c, 4096 // c, 1, 1)
    return {"fc6.weight": w6, "fc6.bias": fc6_b[::c].contiguous(), "fc7.weight": w7, "fc7.bias": fc7_b[::c].contiguous()}


def _read_state_dict(source: Union[str, Path], backbone: str) -> Dict[str, torch.Tensor]:
    if str(source) == "imagenet":
        return torch.hub.load_state_dict_from_url(IMAGENET_URLS[backbone], map_location="cpu", check_hash=True)
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"pretrained weights file {path} not found; pass pretrained='imagenet' to download torchvision's "
            f"{backbone} weights from {IMAGENET_URLS[backbone]}, or a path to that file"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _vgg_map(sd: Dict[str, torch.Tensor], head_prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if k.startswith("features.")}
    need = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"VGG16 state dict lacks {missing}: not torchvision's vgg16 weights?")
    fc = decimate_vgg_fc(*(sd[k] for k in need))
    for p in head_prefixes:
        out.update({p + k: v for k, v in fc.items()})
    return out


def load_imagenet(model: nn.Module, source: Union[str, Path, Dict[str, torch.Tensor]] = "imagenet") -> List[str]:
    """Initialise ``model``'s backbone from torchvision ImageNet weights; returns the keys left at random init.

    ``source``: "imagenet" (download through torch.hub, cached), a path to the ``.pth`` file, or a state dict
    already loaded (with torchvision's key names). Shapes are checked; a wrong file raises ValueError.
    """
    base = model.base if isinstance(model, DeepLabMSc) else model
    backbone = getattr(base, "imagenet_backbone", None)
    if backbone is None:
        raise ValueError(f"{type(base).__name__} has no ImageNet initialisation (train it from scratch)")
    sd = source if isinstance(source, dict) else _read_state_dict(source, backbone)
    if backbone == "vgg16":
        heads = ["head."] if isinstance(base, DeepLabLargeFOV) else [f"branches.{i}." for i in range(len(base.branches))]
        mapped = _vgg_map(sd, heads)
    else:
        mapped = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = base.state_dict()
    unexpected = sorted(k for k in mapped if k not in own)
    if unexpected:
        raise ValueError(f"weights do not fit {type(base).__name__} ({backbone}): unexpected keys {unexpected[:5]}")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"weights do not fit {type(base).__name__}: shape mismatch {bad[:5]}")
    base.load_state_dict(mapped, strict=False)
    return sorted(k for k in own if k not in mapped)


def build_model(name: str, num_classes: int, pretrained: Union[bool, str, Path] = False, **kwargs) -> _SegNet:
    """Build a model by name (see :data:`MODELS`); ``pretrained`` False, "imagenet" or a path to torchvision weights."""
    if name == "small":
        model: _SegNet = SmallDeepLab(num_classes, **kwargs)
    elif name == "largefov":
        model = DeepLabLargeFOV(num_classes, **kwargs)
    elif name == "msc_largefov":
        model = DeepLabMSc(DeepLabLargeFOV(num_classes), **kwargs)
    elif name == "vgg16_aspp":
        model = DeepLabVGG16ASPP(num_classes, **kwargs)
    elif name == "resnet101_aspp":
        model = DeepLabResNet101(num_classes, **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if pretrained:
        load_imagenet(model, "imagenet" if pretrained is True else pretrained)
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float, classifier_mult: float = 10.0) -> List[dict]:
    """DeepLab's SGD groups: weights x1 (decay), biases x2 (no decay); classifier x``classifier_mult`` on both.

    Each group keeps its multiplier in ``"lr_mult"`` so the poly schedule can rescale it.
    """
    net = model.module if hasattr(model, "module") else model
    prefixes = tuple(getattr(net, "classifier_prefixes", ()))
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith(prefixes) if prefixes else False, p.dim() == 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_cls, is_bias), params in sorted(groups.items()):
        mult = (classifier_mult if is_cls else 1.0) * (2.0 if is_bias else 1.0)
        out.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                    "weight_decay": 0.0 if is_bias else weight_decay})
    return out
