"""DeepLab models: architecture facts from the DeepLab / torchvision papers, ImageNet key mapping, fc decimation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nclib.models import (
    MODELS,
    build_model,
    decimate_vgg_fc,
    load_imagenet,
    param_groups,
)

from _torchvision import VGG16_CONV, he_synthetic, resnet101_spec, vgg16_spec


# ---- torchvision-like specs, written from the VGG / ResNet papers (not read from our models) ------------------
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


# ---- the networks against references written from the papers ---------------------------------------------------
# Each check below compares a model with an independent statement of the architecture (DeepLab v1/v2 papers,
# torchvision's ImageNet preprocessing): every conv's stride / dilation / padding, every mapped ImageNet tensor by
# name, the input normalisation numerically, and the whole forward pass against a functional re-implementation
# that reads the torchvision weights directly. test_each_mutation_is_caught applies, one at a time, the mistakes
# these checks exist for (swapped same-shape convs, a moved ResNet stride, a dropped BatchNorm, a wrong dilation,
# BGR input, mean-only normalisation) and asserts that a check fails on it.

# torchvision's ImageNet normalisation of RGB in 0..1 (https://pytorch.org/vision/stable/models.html)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
ASPP_RATES = (6, 12, 18, 24)  # DeepLab v2 ASPP-L
RESNET_DILATION = {1: 1, 2: 1, 3: 2, 4: 4}  # DeepLab v2: res4 (layer3) rate 2, res5 (layer4) rate 4 -> stride 8


def rgb_normalised(x):
    """(B, 3, H, W) RGB 0..255 -> ImageNet-normalised, written from torchvision's constants."""
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def vgg16_reference(sd, x):
    """DeepLab's VGG16 trunk (v1 paper Sec 3.1 / 4.1): pools 1-3 3x3 stride 2, pools 4-5 3x3 stride 1, conv5 rate 2."""
    h, idx, pools = rgb_normalised(x), 0, 0
    for v in VGG16_CONV:
        if v == "M":
            pools += 1
            h = F.max_pool2d(h, 3, stride=2 if pools <= 3 else 1, padding=1, ceil_mode=True)
            idx += 1
        else:
            rate = 2 if pools == 4 else 1
            h = F.relu(F.conv2d(h, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], padding=rate,
                                dilation=rate))
            idx += 2
    return h


def vgg_fc_head_reference(sd, h, rate, fc8):
    """fc6 (fc6 of VGG decimated: every 4th output, taps 0/3/6, rate ``rate``) -> fc7 (every 4th) -> fc8 (model's)."""
    w6 = sd["classifier.0.weight"].reshape(4096, 512, 7, 7)[0::4, :, 0::3, 0::3]
    w7 = sd["classifier.3.weight"][0::4, 0::4].reshape(1024, 1024, 1, 1)
    h = F.relu(F.conv2d(h, w6, sd["classifier.0.bias"][0::4], padding=rate, dilation=rate))
    h = F.relu(F.conv2d(h, w7, sd["classifier.3.bias"][0::4]))
    return F.conv2d(h, fc8.weight, fc8.bias)


def resnet101_reference(sd, x, aspp):
    """DeepLab-v2 ResNet-101 on torchvision's weights (stride on each first 3x3 conv of layer2; layer3/4 dilated)."""
    def bn(h, p):
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(rgb_normalised(x), sd["conv1.weight"], stride=2, padding=3), "bn1"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    for li, n in zip((1, 2, 3, 4), (3, 4, 23, 3)):
        rate = RESNET_DILATION[li]
        for b in range(n):
            p, stride = f"layer{li}.{b}", 2 if (li == 2 and b == 0) else 1
            y = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.relu(bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=rate, dilation=rate), f"{p}.bn2"))
            y = bn(F.conv2d(y, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            idt = bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if b == 0 else h
            h = F.relu(y + idt)
    return sum(F.conv2d(h, a.weight, a.bias, padding=r, dilation=r) for a, r in zip(aspp, ASPP_RATES))


def conv_geometry(model):
    """{name: (kernel, stride, dilation, padding)} of every Conv2d / MaxPool2d, {name} of every BatchNorm2d."""
    geo, bns = {}, set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            geo[name] = (mod.kernel_size[0], mod.stride[0], mod.dilation[0], mod.padding[0])
        elif isinstance(mod, nn.MaxPool2d):
            geo[name] = ("pool", mod.kernel_size, mod.stride, mod.padding)
        elif isinstance(mod, nn.BatchNorm2d):
            bns.add(name)
    return geo, bns


def expected_vgg_geometry(heads):
    """DeepLab v1/v2 VGG16: 3x3 convs stride 1, conv5 rate 2 (pad 2); pools 3x3 pad 1, stride 2 then 1."""
    geo, idx, pools = {}, 0, 0
    for v in VGG16_CONV:
        if v == "M":
            pools += 1
            geo[f"features.{idx}"] = ("pool", 3, 2 if pools <= 3 else 1, 1)
            idx += 1
        else:
            rate = 2 if pools == 4 else 1
            geo[f"features.{idx}"] = (3, 1, rate, rate)
            idx += 2
    for prefix, rate in heads:
        geo.update({f"{prefix}fc6": (3, 1, rate, rate), f"{prefix}fc7": (1, 1, 1, 0), f"{prefix}fc8": (1, 1, 1, 0)})
    return geo


def expected_resnet_geometry():
    """DeepLab-v2 ResNet-101 (torchvision layout): stride 2 in conv1, maxpool and layer2's first 3x3 conv only."""
    geo = {"conv1": (7, 2, 1, 3), "maxpool": ("pool", 3, 2, 1)}
    bns = {"bn1"}
    for li, n in zip((1, 2, 3, 4), (3, 4, 23, 3)):
        rate = RESNET_DILATION[li]
        for b in range(n):
            p, stride = f"layer{li}.{b}", 2 if (li == 2 and b == 0) else 1
            geo.update({f"{p}.conv1": (1, 1, 1, 0), f"{p}.conv2": (3, stride, rate, rate), f"{p}.conv3": (1, 1, 1, 0)})
            bns |= {f"{p}.bn1", f"{p}.bn2", f"{p}.bn3"}
            if b == 0:
                geo[f"{p}.downsample.0"] = (1, stride, 1, 0)
                bns.add(f"{p}.downsample.1")
    geo.update({f"aspp.{i}": (3, 1, r, r) for i, r in enumerate(ASPP_RATES)})
    return geo, bns


def check_geometry(name, model):
    geo, bns = conv_geometry(model)
    if name == "resnet101_aspp":
        want, want_bns = expected_resnet_geometry()
    else:
        heads = {"largefov": [("head.", 12)], "msc_largefov": [("head.", 12)],
                 "vgg16_aspp": [(f"branches.{i}.", r) for i, r in enumerate(ASPP_RATES)]}[name]
        want, want_bns = expected_vgg_geometry(heads), set()
        if name == "msc_largefov":
            want = {f"base.{k}": v for k, v in want.items()}
    wrong = {k: (geo.get(k), v) for k, v in want.items() if geo.get(k) != v}
    assert not wrong and set(geo) == set(want), f"layers that differ from DeepLab (got, want): {wrong}, " \
        f"extra {sorted(set(geo) - set(want))[:5]}"
    assert bns == want_bns, f"BatchNorm layers missing {sorted(want_bns - bns)[:5]}, extra {sorted(bns - want_bns)[:5]}"


def check_normalisation(model):
    """Constant R, G, B planes through the model's normalisation: each channel gets (x - mean_c) / std_c."""
    x = torch.tensor([200.0, 100.0, 50.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    want = torch.tensor([(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225])
    got = model.normalize(x)
    torch.testing.assert_close(got, want.view(1, 3, 1, 1).expand(1, 3, 4, 4), rtol=1e-6, atol=1e-6)


def check_mapped_tensors(model, sd, backbone):
    """Every ImageNet tensor the model takes is the source tensor of the same name (fc6/fc7: decimated)."""
    own = model.state_dict()
    if backbone == "vgg16":
        names = [k for k in sd if k.startswith("features.")]
        heads = [k[:-len("fc6.weight")] for k in own if k.endswith("fc6.weight")]
        fc = {"fc6.weight": sd["classifier.0.weight"].reshape(4096, 512, 7, 7)[0::4, :, 0::3, 0::3],
              "fc6.bias": sd["classifier.0.bias"][0::4],
              "fc7.weight": sd["classifier.3.weight"][0::4, 0::4].reshape(1024, 1024, 1, 1),
              "fc7.bias": sd["classifier.3.bias"][0::4]}
        pairs = [(k, sd[k]) for k in names] + [(h + k, v) for h in heads for k, v in fc.items()]
        assert heads, "no fc6 in the model"
    else:
        pairs = [(k, v) for k, v in sd.items() if not k.startswith("fc.")]
    missing = [k for k, _ in pairs if k not in own]
    assert not missing, f"ImageNet tensors the model lacks: {missing[:5]}"
    differ = [k for k, v in pairs if not torch.equal(own[k], v)]
    assert not differ, f"model tensors that are not the ImageNet tensor of that name: {differ[:5]}"


def check_forward(name, model, sd, size=49):
    """The whole network (eval) against the functional reference on the same weights, RGB 0..255 input."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 255
    model.eval()
    with torch.no_grad():
        got = model(x)
        if name == "resnet101_aspp":
            ref = resnet101_reference(sd, x, model.aspp)
        else:
            trunk = vgg16_reference(sd, x)
            if name == "vgg16_aspp":
                ref = sum(vgg_fc_head_reference(sd, trunk, r, b.fc8) for b, r in zip(model.branches, ASPP_RATES))
            else:
                ref = vgg_fc_head_reference(sd, trunk, 12, model.head.fc8)
        assert ref.shape[-1] == (size - 1) // 8 + 1  # output stride 8
        ref = F.interpolate(ref, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def vgg_sd():
    return he_synthetic(vgg16_spec())


@pytest.fixture(scope="module")
def resnet_sd():
    return he_synthetic(resnet101_spec())


def loaded(name, vgg_sd, resnet_sd):
    torch.manual_seed(0)
    m = build_model(name, 21)
    sd = resnet_sd if name == "resnet101_aspp" else vgg_sd
    load_imagenet(m, sd)
    return m, sd


@pytest.mark.parametrize("name", ["largefov", "msc_largefov", "vgg16_aspp", "resnet101_aspp"])
def test_conv_strides_and_dilations_are_deeplabs(name):
    check_geometry(name, build_model(name, 21))


@pytest.mark.parametrize("name", ["largefov", "msc_largefov", "vgg16_aspp", "resnet101_aspp"])
def test_every_mapped_imagenet_tensor_is_the_source_tensor(name, vgg_sd, resnet_sd):
    m, sd = loaded(name, vgg_sd, resnet_sd)
    check_mapped_tensors(m.base if name == "msc_largefov" else m, sd, m.imagenet_backbone)


@pytest.mark.parametrize("name", ["largefov", "msc_largefov", "vgg16_aspp", "resnet101_aspp"])
def test_input_normalisation_is_imagenet_rgb_mean_and_std(name):
    m = build_model(name, 21)
    check_normalisation(m.base if name == "msc_largefov" else m)


@pytest.mark.parametrize("name", ["largefov", "vgg16_aspp", "resnet101_aspp"])
def test_forward_equals_the_reference_network_on_imagenet_weights(name, vgg_sd, resnet_sd):
    m, sd = loaded(name, vgg_sd, resnet_sd)
    check_forward(name, m, sd)


def _swap_vgg_conv5_weights(m):  # a mapping that crosses two same-shape convs (conv5_2 <-> conv5_3)
    with torch.no_grad():
        w = m.features[26].weight.clone()
        m.features[26].weight.copy_(m.features[28].weight)
        m.features[28].weight.copy_(w)


def _move_resnet_stride(m):  # ResNet v1 (stride on the 1x1 conv) instead of torchvision's v1.5: same shapes
    m.layer2[0].conv2.stride = (1, 1)
    m.layer2[0].conv1.stride = (2, 2)


def _drop_batchnorm(m):
    m.layer3[5].bn2 = nn.Identity()


def _wrong_vgg_dilation(m):  # conv5_2 at rate 1 (same output shape)
    m.features[26].dilation, m.features[26].padding = (1, 1), (1, 1)


def _wrong_resnet_dilation(m):  # a layer4 block at layer3's rate
    m.layer4[1].conv2.dilation, m.layer4[1].conv2.padding = (2, 2), (2, 2)


def _bgr_input(m):  # Caffe-style: treats the input as BGR, with the mean and std in BGR order
    norm = m.normalize
    norm.mean, norm.std = norm.mean.flip(1), norm.std.flip(1)


def _mean_only(m):
    m.normalize.std = torch.ones_like(m.normalize.std)


MUTATIONS = [
    ("largefov", _swap_vgg_conv5_weights, (check_mapped_tensors, check_forward)),
    ("resnet101_aspp", _move_resnet_stride, (check_geometry, check_forward)),
    ("resnet101_aspp", _drop_batchnorm, (check_geometry, check_mapped_tensors, check_forward)),
    ("largefov", _wrong_vgg_dilation, (check_geometry, check_forward)),
    ("vgg16_aspp", _wrong_vgg_dilation, (check_geometry, check_forward)),
    ("resnet101_aspp", _wrong_resnet_dilation, (check_geometry, check_forward)),
    ("largefov", _bgr_input, (check_normalisation, check_forward)),
    ("resnet101_aspp", _mean_only, (check_normalisation, check_forward)),
]


@pytest.mark.parametrize("name, mutate, checks", MUTATIONS,
                         ids=[f"{n}-{f.__name__.strip('_')}" for n, f, _ in MUTATIONS])
def test_each_mutation_is_caught(name, mutate, checks, vgg_sd, resnet_sd):
    """Each check above fails on the mistake it exists for (applied to one model instance, nothing global)."""
    m, sd = loaded(name, vgg_sd, resnet_sd)
    mutate(m)
    for check in checks:
        args = {check_geometry: (name, m), check_normalisation: (m,), check_forward: (name, m, sd),
                check_mapped_tensors: (m, sd, m.imagenet_backbone)}[check]
        with pytest.raises(AssertionError):
            check(*args)


# ---------------------------------------------------------------------------------- small net: stride 4, backbone
def test_small_output_stride_4_halves_the_grid_and_keeps_the_receptive_field():
    from nclib.models import SmallDeepLab

    x = torch.rand(1, 3, 96, 96) * 255
    m8, m4 = SmallDeepLab(7).eval(), SmallDeepLab(7, output_stride=4).eval()
    assert m8.scores(m8.normalize(x)).shape[-2:] == (12, 12)
    assert m4.scores(m4.normalize(x)).shape[-2:] == (24, 24)
    # same parameters (stride 8 weights load into stride 4), dilations doubled after the removed stride
    assert {k: v.shape for k, v in m8.state_dict().items()} == {k: v.shape for k, v in m4.state_dict().items()}
    convs = lambda m: [(c.stride[0], c.dilation[0]) for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert convs(m8) == [(2, 1), (1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 2), (1, 4), (1, 1), (1, 2), (1, 4)]
    assert convs(m4) == [(2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 2), (1, 4), (1, 8), (1, 2), (1, 4), (1, 8)]
    with pytest.raises(ValueError, match="output_stride"):
        SmallDeepLab(7, output_stride=16)


def test_small_backbone_loads_stem_and_context_only(tmp_path):
    from nclib.models import SmallDeepLab

    torch.manual_seed(0)
    src = SmallDeepLab(7)
    path = tmp_path / "model.pt"

    def save(model, to):  # a training checkpoint as nclib.train writes it
        torch.save({"model": model.state_dict(), "config": {}, "model_name": "small", "num_classes": 7,
                    "iteration": 1}, to)

    save(src, path)
    torch.manual_seed(1)
    ref = SmallDeepLab(7, output_stride=4)  # same seed, no backbone: the classifier it must keep
    torch.manual_seed(1)
    m = SmallDeepLab(7, output_stride=4, backbone=str(path))
    for k, v in m.state_dict().items():
        want = src.state_dict()[k] if k.startswith(("stem.", "context.")) else ref.state_dict()[k]
        assert torch.equal(v, want), k
    with pytest.raises(ValueError, match="not found"):
        SmallDeepLab(7, backbone=str(tmp_path / "nope.pt"))
    save(SmallDeepLab(7, width=16), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="does not fit"):
        SmallDeepLab(7, backbone=str(tmp_path / "narrow.pt"))
