"""DeepLab models: architecture facts from the DeepLab / torchvision papers, ImageNet key mapping, fc decimation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nclib.models import (
    MODELS,
    build_model,
    decimate_vgg_fc,
    load_imagenet,
    param_groups,
)

# ---- torchvision-like specs, written from the VGG / ResNet papers (not read from our models) ------------------
VGG16_CONV = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_spec():
    """(key, shape) of torchvision's vgg16 state dict: features.<i> convs, classifier.0/3/6."""
    spec, idx, cin = [], 0, 3
    for v in VGG16_CONV:
        if v == "M":
            idx += 1
            continue
        spec += [(f"features.{idx}.weight", (v, cin, 3, 3)), (f"features.{idx}.bias", (v,))]
        idx += 2  # conv + relu
        cin = v
    spec += [("classifier.0.weight", (4096, 512 * 7 * 7)), ("classifier.0.bias", (4096,)),
             ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
             ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,))]
    return spec


def resnet101_spec():
    """(key, shape) of torchvision's resnet101 state dict (bottleneck v1.5 naming)."""
    def bn(p, c):
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)),
                (f"{p}.running_var", (c,)), (f"{p}.num_batches_tracked", ())]

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
    spec += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return spec


def synthetic(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in spec}


def nparams(module, prefix=""):
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


# ---- architecture ----------------------------------------------------------------------------------------------
def test_largefov_parameter_count_matches_deeplab():
    # DeepLab v1 (Chen et al. ICLR 2015, Table 2): DeepLab-LargeFOV has 20.5M parameters (21 classes).
    m = build_model("largefov", 21)
    assert round(nparams(m) / 1e6, 1) == 20.5
    assert m.head.fc6.dilation == (12, 12) and m.head.fc6.weight.shape == (1024, 512, 3, 3)
    assert m.head.fc7.weight.shape == (1024, 1024, 1, 1)


def test_vgg_and_resnet_backbones_have_torchvision_sizes():
    # torchvision: vgg16 conv part 14,714,688 params; resnet101 44,549,160 in all, of which fc 2048*1000+1000.
    assert nparams(build_model("largefov", 21), "features.") == 14_714_688
    r = build_model("resnet101_aspp", 21)
    assert nparams(r) - nparams(r, "aspp.") == 44_549_160 - (2048 * 1000 + 1000)
    aspp = [a.dilation[0] for a in r.aspp]
    assert aspp == [6, 12, 18, 24]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_gives_logits_at_input_size(name):
    m = build_model(name, 5).eval()
    x = torch.rand(2, 3, 41, 47) * 255
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 5, 41, 47) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["small", "largefov", "resnet101_aspp"])
def test_output_stride_is_8(name):
    m = build_model(name, 3).eval()
    # DeepLab's convention: an input of 8k + 1 pixels gives k + 1 scores (321 -> 41).
    x = torch.rand(1, 3, 65, 65) * 255
    with torch.no_grad():
        s = m.scores(m.normalize(x))
    assert s.shape[-2:] == (9, 9)


def test_msc_is_max_over_scales_of_the_shared_net():
    torch.manual_seed(0)
    m = build_model("msc_largefov", 3).eval()
    x = torch.rand(1, 3, 48, 48) * 255
    with torch.no_grad():
        got = m(x)
        outs = []
        for s in (1.0, 0.75, 0.5):
            xi = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            outs.append(F.interpolate(m.base(xi), size=(48, 48), mode="bilinear", align_corners=False))
        want = torch.stack(outs).amax(0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_resnet_batchnorm_stays_frozen_in_train_mode():
    m = build_model("resnet101_aspp", 3)
    m.train()
    before = m.bn1.running_mean.clone()
    m(torch.rand(2, 3, 33, 33) * 255)
    assert torch.equal(m.bn1.running_mean, before)
    assert m.training and not m.bn1.training and not m.bn1.weight.requires_grad  # model trains, BN does not


def test_small_network_is_batch_independent():
    # GroupNorm: an image's output does not depend on the other images of the batch (DDP == 1 process).
    torch.manual_seed(0)
    m = build_model("small", 4, dropout=0.0).train()
    x = torch.rand(4, 3, 40, 40) * 255
    torch.testing.assert_close(m(x)[:2], m(x[:2]), rtol=1e-5, atol=1e-5)


# ---- ImageNet initialisation -------------------------------------------------------------------------------------
def test_fc_decimation_takes_every_4th_channel_and_every_3rd_tap():
    g = torch.Generator().manual_seed(1)
    w6, b6 = torch.randn(4096, 25088, generator=g), torch.randn(4096, generator=g)
    w7, b7 = torch.randn(4096, 4096, generator=g), torch.randn(4096, generator=g)
    out = decimate_vgg_fc(w6, b6, w7, b7)
    assert out["fc6.weight"].shape == (1024, 512, 3, 3) and out["fc7.weight"].shape == (1024, 1024, 1, 1)
    # element-wise reference: fc6 input index of (c, y, x) in the flattened 512x7x7 pool5 is c*49 + y*7 + x
    for o, c, i, j in [(0, 0, 0, 0), (5, 17, 1, 2), (1023, 511, 2, 2), (300, 256, 2, 0)]:
        assert out["fc6.weight"][o, c, i, j] == w6[4 * o, c * 49 + (3 * i) * 7 + 3 * j]
    assert torch.equal(out["fc6.bias"], b6[[4 * o for o in range(1024)]])
    assert out["fc7.weight"][10, 20, 0, 0] == w7[40, 80]
    with pytest.raises(ValueError, match="4096"):
        decimate_vgg_fc(w6[:10], b6, w7, b7)


@pytest.mark.parametrize("name", ["largefov", "vgg16_aspp"])
def test_vgg_imagenet_mapping(name):
    sd = synthetic(vgg16_spec())
    m = build_model(name, 21)
    left = load_imagenet(m, sd)
    assert torch.equal(m.features[28].weight, sd["features.28.weight"])  # conv5_3
    assert torch.equal(m.features[0].bias, sd["features.0.bias"])
    heads = [m.head] if name == "largefov" else list(m.branches)
    ref = decimate_vgg_fc(*(sd[k] for k in ("classifier.0.weight", "classifier.0.bias",
                                            "classifier.3.weight", "classifier.3.bias")))
    for h in heads:
        assert torch.equal(h.fc6.weight, ref["fc6.weight"]) and torch.equal(h.fc7.bias, ref["fc7.bias"])
    assert left and all(".fc8." in k for k in left)  # only the classifiers stay random


def test_resnet_imagenet_mapping_and_file_round_trip(tmp_path):
    sd = synthetic(resnet101_spec())
    path = tmp_path / "resnet101.pth"
    torch.save(sd, path)
    m = build_model("resnet101_aspp", 21, pretrained=str(path))
    assert torch.equal(m.layer3[22].conv2.weight, sd["layer3.22.conv2.weight"])
    assert torch.equal(m.layer2[0].downsample[1].running_var, sd["layer2.0.downsample.1.running_var"])
    left = load_imagenet(m, sd)
    assert left and all(k.startswith("aspp.") for k in left)


def test_wrong_weights_are_refused():
    with pytest.raises(ValueError, match="unexpected keys|lacks"):
        load_imagenet(build_model("largefov", 21), synthetic(resnet101_spec()))
    bad = synthetic(vgg16_spec())
    bad["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_imagenet(build_model("largefov", 21), bad)
    with pytest.raises(ValueError, match="no ImageNet"):
        load_imagenet(build_model("small", 21), {})


def test_missing_weights_file_names_the_url(tmp_path):
    with pytest.raises(ValueError, match="download.pytorch.org"):
        build_model("largefov", 21, pretrained=str(tmp_path / "nope.pth"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("fcn", 21)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small", 1)
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        build_model("small", 3)(torch.rand(1, 1, 16, 16))


def test_param_groups_follow_deeplab_multipliers():
    m = build_model("largefov", 21)
    groups = param_groups(m, lr=1e-3, weight_decay=5e-4, classifier_mult=10)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.head.fc8.weight)]["lr"] == pytest.approx(1e-2)
    assert by_id[id(m.head.fc8.bias)]["lr"] == pytest.approx(2e-2) and by_id[id(m.head.fc8.bias)]["weight_decay"] == 0
    assert by_id[id(m.features[0].weight)]["lr"] == pytest.approx(1e-3)
    assert by_id[id(m.features[0].weight)]["weight_decay"] == 5e-4
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
