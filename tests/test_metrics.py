"""Confusion matrix / IoU / mIoU against independent references (pixel loops, hand-computed closed forms)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nclib.metrics import (
    ConfusionMeter,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)


def loop_confusion(pred, target, k, ignore=255):
    conf = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != ignore:
            conf[t, p] += 1
    return conf


def test_confusion_matches_a_pixel_loop_with_ignore():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(3, 17, 19))
    target = rng.integers(0, 5, size=(3, 17, 19))
    target[rng.random(target.shape) < 0.2] = 255
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    np.testing.assert_array_equal(got.numpy(), loop_confusion(pred, target, 5))


def test_iou_closed_form():
    # ground truth:  0 0 1 1      prediction: 0 1 1 1   (last pixel void)
    #                2 2 2 255                 2 2 0 1
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    p = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    conf = confusion_matrix(p, t, 4)
    # class 0: TP 1, FP 1 (gt 2 -> 0), FN 1 (gt 0 -> 1): 1/3. class 1: TP 2, FP 1: 2/3. class 2: TP 2, FN 1: 2/3.
    iou = iou_per_class(conf)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    assert torch.isnan(iou[3])  # class 3 neither present nor predicted: left out of the mean
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)


def test_false_positive_class_counts_with_zero_iou():
    t = torch.zeros(2, 2, dtype=torch.long)
    p = torch.tensor([[0, 0], [0, 1]])
    conf = confusion_matrix(p, t, 2)
    assert mean_iou(conf) == pytest.approx((3 / 4 + 0) / 2)


def test_meter_accumulates_over_the_set_not_per_image():
    rng = np.random.default_rng(1)
    meter = ConfusionMeter(3)
    preds, targets = [], []
    for _ in range(4):
        p, t = rng.integers(0, 3, (8, 8)), rng.integers(0, 3, (8, 8))
        meter.update(torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p), targets.append(t)
    ref = loop_confusion(np.stack(preds), np.stack(targets), 3)
    np.testing.assert_array_equal(meter.conf.numpy(), ref)
    tp = np.diag(ref)
    want = np.mean(tp / (ref.sum(0) + ref.sum(1) - tp))
    assert meter.summary()["miou"] == pytest.approx(want)


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3)
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.long), 3)


# ---- nclib.evaluate: multi-scale + flip testing, CRF hook, NC energy of predictions -----------------------------
class _Tiny(torch.nn.Module):
    """A fixed, position-dependent 'network' so that flips and rescaling change its output."""

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(x.shape[0], 1, h, w)
        return torch.cat([x[:, :1] / 255 + ramp, x[:, 1:2] / 255 * 2, 1 - ramp], dim=1)


def test_multiscale_flip_is_the_mean_of_the_softmaxes():
    import torch.nn.functional as F

    from nclib.evaluate import predict_probs
    from nclib.photos import photo_tensor

    img = photo_tensor("coffee", crop=32)
    m = _Tiny()
    got = predict_probs(m, img, scales=(0.5, 1.0), flip=True)
    ref = []
    for s in (0.5, 1.0):
        x = F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else img
        for fl in (False, True):
            y = m(x.flip(-1) if fl else x)
            y = y.flip(-1) if fl else y
            ref.append(torch.softmax(F.interpolate(y, size=(32, 32), mode="bilinear", align_corners=False), 1))
    torch.testing.assert_close(got, torch.stack(ref).mean(0))
    assert not torch.allclose(got, predict_probs(m, img))  # flipping / scaling made a difference


def test_evaluate_scores_and_nc_energy(monkeypatch):
    from nclib.energies import nc_energy
    from nclib.evaluate import evaluate
    from nclib.losses import normalized_cut_loss
    from nclib.photos import photo_tensor

    img = photo_tensor("astronaut", crop=24)
    mask = (img[0].mean(0) > img.mean()).long()
    mask[:2] = 254  # padding rows are not scored
    ds = [{"image": img[0], "mask": mask}] * 2
    m = _Tiny()
    res = evaluate(m, ds, 3, nc_energy=True, sigma_rgb=15, sigma_xy=10)
    pred = torch.softmax(m(img), 1).argmax(1)[0]
    conf = confusion_matrix(pred[2:], mask[2:], 3)
    assert res["miou"] == pytest.approx(mean_iou(conf), abs=1e-6) and res["images"] == 2
    probs = torch.softmax(m(img), 1)
    roi = (mask != 254)[None]
    want = float(normalized_cut_loss(probs, img, None, sigma_rgb=15, sigma_xy=10, roi=roi))
    assert res["nc_energy"] == pytest.approx(want, abs=1e-5)
    assert float(nc_energy(probs, img, 15, 10, roi)[0]) == pytest.approx(want, abs=1e-6)

    import nclib.crf

    seen = {}

    def fake_crf(probs, images, **kw):  # the CRF hook receives the averaged probabilities and the image
        seen.update(kw, shape=tuple(probs.shape))
        return probs

    monkeypatch.setattr(nclib.crf, "dense_crf", fake_crf)
    res = evaluate(m, ds, 3, crf=True, crf_kwargs={"iterations": 3})
    assert res["miou_crf"] == res["miou"] and seen == {"iterations": 3, "shape": (1, 3, 24, 24)}


# ---------------------------------------------------------------------------------------------- boundary bands
def test_boundary_band_hand_computed():
    from nclib.metrics import band_accuracy, boundary_band

    # left 3 columns label 0, right 3 columns label 1: the boundary pixels are columns 2 and 3
    t = torch.zeros(1, 6, 6, dtype=torch.long)
    t[:, :, 3:] = 1
    cols = lambda band: sorted(set(torch.nonzero(band[0])[:, 1].tolist()))
    assert cols(boundary_band(t, 1)) == [2, 3]
    assert cols(boundary_band(t, 2)) == [1, 2, 3, 4]
    assert cols(boundary_band(t, 3)) == [0, 1, 2, 3, 4, 5]
    assert int(boundary_band(t, 2).sum()) == 24
    pred = torch.zeros_like(t)  # right on the 0 side only
    assert band_accuracy(pred, t, 1) == (6, 12)
    assert band_accuracy(pred, t, 2) == (12, 24)
    # ignored pixels are neither boundaries nor scored: void the first row
    t2 = t.clone()
    t2[:, 0] = 255
    assert band_accuracy(pred, t2, 1) == (5, 10)


def test_boundary_band_corner_and_errors():
    from nclib.metrics import band_accuracy, boundary_band

    # a single pixel of label 1 at (2, 2) in a 5x5 zero image: it and its 4 neighbours are boundary pixels;
    # width 2 adds their chessboard neighbours, i.e. the whole 5x5 except the 4 corners
    t = torch.zeros(1, 5, 5, dtype=torch.long)
    t[0, 2, 2] = 1
    expect1 = torch.zeros(5, 5, dtype=torch.bool)
    expect1[2, 2] = expect1[1, 2] = expect1[3, 2] = expect1[2, 1] = expect1[2, 3] = True
    assert torch.equal(boundary_band(t, 1)[0], expect1)
    expect2 = torch.ones(5, 5, dtype=torch.bool)
    expect2[0, 0] = expect2[0, 4] = expect2[4, 0] = expect2[4, 4] = False
    assert torch.equal(boundary_band(t, 2)[0], expect2)
    with pytest.raises(ValueError, match="width"):
        boundary_band(t, 0)
    with pytest.raises(TypeError, match="target"):
        boundary_band(t.numpy(), 1)
    with pytest.raises(ValueError, match="same shape"):
        band_accuracy(t[:, :4], t, 1)
