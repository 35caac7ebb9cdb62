"""Transforms keep image, scribble and mask aligned through scale, pad, crop and flip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from nclib.data import IGNORE_LABEL, MEAN_RGB, PAD_LABEL, EvalTransform, TrainTransform, pad_sample, roi_of


def _coded_sample(h=50, w=70, seed=0, erode=0):
    """Label map of random rectangles; the image encodes each pixel's label in its colour (label * 20 + 10).

    ``scribble`` holds the label only on pixels at least ``erode`` px inside their region (255 elsewhere):
    there bilinear image values are pure, so image and labels can be compared exactly after resizing.
    """
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    for k in range(1, 6):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        lab[y : y + rng.integers(8, 25), x : x + rng.integers(8, 30)] = k
    core = np.full((h, w), IGNORE_LABEL, np.int64)
    for k in np.unique(lab):
        inner = ndimage.binary_erosion(lab == k, np.ones((2 * erode + 1,) * 2)) if erode else lab == k
        core[inner] = k
    img = np.stack([lab * 20 + 10, lab * 7 + 3, np.broadcast_to(np.arange(w), (h, w))]).astype(np.float32)
    return {"image": torch.from_numpy(img), "scribble": torch.from_numpy(core), "mask": torch.from_numpy(lab),
            "id": "x"}


def test_crop_pad_flip_keep_exact_alignment():
    t = TrainTransform(crop=(64, 90), scale=(1.0, 1.0))  # 50x70 image: pads then crops
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(_coded_sample())
        img, m, s = out["image"], out["mask"], out["scribble"]
        assert img.shape == (3, 64, 90) and m.shape == s.shape == (64, 90)
        pad = m == PAD_LABEL
        assert pad.sum() == 64 * 90 - 50 * 70
        assert torch.equal(pad, s == PAD_LABEL) and torch.equal(roi_of(m), ~pad)
        assert torch.equal(img[0][~pad], (m[~pad] * 20 + 10).float())
        for c in range(3):
            assert torch.allclose(img[c][pad], torch.tensor(MEAN_RGB[c]))
        # Column code (channel 2) decreases to the right iff the sample was flipped.
        row = img[2][~pad].view(50, 70)[0]
        flips += bool(row[0] > row[-1])
        assert torch.equal(row, torch.arange(70.0)) or torch.equal(row, torch.arange(69.0, -1, -1))
    assert 4 <= flips <= 16


@pytest.mark.parametrize("seed", range(12))
def test_random_scale_keeps_labels_on_their_pixels(seed):
    """Where the (eroded) scribble is labelled the bilinear image must still show that label's colour."""
    t = TrainTransform(crop=48, scale=(0.5, 2.0))
    torch.manual_seed(seed)
    out = t(_coded_sample(seed=seed, erode=2))
    img, s, m = out["image"], out["scribble"], out["mask"]
    lab = (s != IGNORE_LABEL) & (s != PAD_LABEL)
    assert lab.any()
    torch.testing.assert_close(img[0][lab], (s[lab] * 20 + 10).float(), atol=1e-3, rtol=0)
    assert torch.equal(m[lab], s[lab])
    mk = m != PAD_LABEL
    # Every mask pixel is a nearest neighbour: a value present in the source, never an interpolated one.
    assert set(m[mk].unique().tolist()) <= set(range(6))


@pytest.mark.parametrize("seed", range(8))
def test_labels_are_resampled_on_the_bilinear_grid(seed):
    """Labels = row / column index, image = the same ramps: after scaling, the nearest label must be within half
    a source pixel of the bilinear value (OpenCV's plain INTER_NEAREST is off by up to one pixel)."""
    h, w = 50, 70
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None], (h, w))
    img = np.stack([rows, rows, cols]).astype(np.float32)
    s = {"image": torch.from_numpy(img), "scribble": torch.from_numpy(rows.astype(np.int64)),
         "mask": torch.from_numpy(cols.astype(np.int64)), "id": "ramp"}
    torch.manual_seed(seed)
    out = TrainTransform(crop=40, scale=(0.5, 2.0))(s)
    roi = roi_of(out["mask"])
    assert roi.sum() > 100
    assert (out["mask"][roi].float() - out["image"][2][roi]).abs().max() <= 0.5 + 1e-3
    assert (out["scribble"][roi].float() - out["image"][1][roi]).abs().max() <= 0.5 + 1e-3


def test_same_seed_same_crop_and_dataloader_generator():
    t = TrainTransform(crop=40)
    torch.manual_seed(3)
    a = t(_coded_sample())
    torch.manual_seed(3)
    b = t(_coded_sample())
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    g = torch.Generator().manual_seed(5)
    c = TrainTransform(crop=40, generator=g)(_coded_sample())
    g.manual_seed(5)
    d = TrainTransform(crop=40, generator=g)(_coded_sample())
    assert torch.equal(c["image"], d["image"])

    class DS(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return t(_coded_sample(seed=i))

    def run():
        dl = DataLoader(DS(), batch_size=3, num_workers=2, generator=torch.Generator().manual_seed(7))
        return torch.cat([b["image"] for b in dl])

    x, y = run(), run()
    assert x.shape == (6, 3, 40, 40) and torch.equal(x, y)


def test_eval_transform_identity_and_pad():
    s = _coded_sample()
    out = EvalTransform()(s)
    assert all(torch.equal(out[k], s[k]) for k in ("image", "mask", "scribble"))
    out = EvalTransform(pad_to=(64, 80), mean_fill=False)(s)
    assert out["image"].shape == (3, 64, 80)
    assert torch.equal(out["image"][:, :50, :70], s["image"]) and (out["image"][:, 50:] == 0).all()
    assert (out["mask"][50:] == PAD_LABEL).all() and (out["mask"][:, 70:] == PAD_LABEL).all()
    assert torch.equal(out["mask"][:50, :70], s["mask"])
    with pytest.raises(ValueError, match="exceeds pad_to"):
        EvalTransform(pad_to=32)(s)


def test_pad_sample_is_a_no_op_when_large_enough():
    s = _coded_sample()
    out = pad_sample(s, (10, 10))
    assert out["image"] is s["image"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(scale=(0, 1))
    with pytest.raises(ValueError, match="pad_label"):
        TrainTransform(pad_label=255)
    with pytest.raises(ValueError, match="crop"):
        TrainTransform(crop=0)
    s = _coded_sample()
    s["mask"] = s["mask"][:10]
    with pytest.raises(ValueError, match="mask"):
        TrainTransform(crop=8)(s)
