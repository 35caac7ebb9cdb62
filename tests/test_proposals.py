"""GrabCut proposals from scribbles on real photos (and real horses when ../shared/data exists)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nclib.photos import photo
from nclib.proposals import grabcut_proposals

HORSES = Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"


def resized_photo(name: str, size: int) -> torch.Tensor:
    img = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float()
    return F.interpolate(img, size=(size, size), mode="area").clamp(0, 255)


def test_proposals_agree_with_every_scribble_multiclass():
    img = torch.cat([resized_photo("astronaut", 96), resized_photo("coffee", 96), resized_photo("chelsea", 96)])
    scr = torch.full((3, 96, 96), 255, dtype=torch.long)
    scr[0, 3:5, 5:90] = 0  # background
    scr[0, 40:43, 30:60] = 15  # person
    scr[0, 80:82, 60:90] = 5
    scr[1, 90, 5:90] = 0
    scr[1, 45:48, 30:60] = 9
    scr[2, 50:52, 20:70] = 8  # no background scribble in this image
    scr[2, 5, 5:40] = 12
    prop = grabcut_proposals(img, scr)
    seeded = scr != 255
    assert torch.equal(prop[seeded], scr[seeded])
    for b in range(3):
        present = set(scr[b][scr[b] != 255].unique().tolist())
        assert set(prop[b].unique().tolist()) <= present
        assert len(set(prop[b].unique().tolist())) >= 2
    # the person class spreads beyond its scribble: GrabCut did segment something
    assert int((prop[0] == 15).sum()) > 3 * int((scr[0] == 15).sum())


def test_no_scribble_gives_ignore_and_single_class_claims():
    img = resized_photo("rocket", 48)
    scr = torch.full((1, 48, 48), 255, dtype=torch.long)
    assert bool((grabcut_proposals(img, scr) == 255).all())
    scr[0, 20, 10:30] = 0
    assert bool((grabcut_proposals(img, scr) == 0).all())  # only background scribbled


def load_horse(index: int):
    """(1, 3, H, W) image resized to its mask's size, (H, W) bool horse mask (pairing rule of SOURCE.md)."""
    import cv2

    name = f"horse{index:03d}.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(HORSES / "images" / name)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(HORSES / "masks" / name), cv2.IMREAD_GRAYSCALE) >= 128
    rgb = cv2.resize(rgb, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), mask


def horse_scribbles(mask: np.ndarray) -> torch.Tensor:
    """Synthetic scribbles: a horizontal stroke through the horse's middle row, two border strokes of background."""
    h, w = mask.shape
    scr = torch.full((1, h, w), 255, dtype=torch.long)
    ys, _ = np.nonzero(mask)
    cy = int(np.median(ys))
    row = np.nonzero(mask[cy])[0]
    scr[0, cy, row.min() + 2 : row.max() - 1] = 1
    scr[0, cy, torch.from_numpy(~mask[cy])] = 255
    scr[0, 2, :] = 0
    scr[0, h - 3, :] = 0
    return scr


@pytest.mark.skipif(not HORSES.exists(), reason="real horse photos absent (../shared/data/weizmann_horse)")
def test_grabcut_on_real_horses():
    ious = []
    for index in (1, 2, 3, 4):
        img, mask = load_horse(index)
        scr = horse_scribbles(mask)
        prop = grabcut_proposals(img, scr)[0].numpy()
        seeded = scr[0].numpy() != 255
        assert (prop[seeded] == scr[0].numpy()[seeded]).all()
        ious.append(((prop == 1) & mask).sum() / ((prop == 1) | mask).sum())
    stroke_iou = np.mean([(horse_scribbles(load_horse(i)[1])[0].numpy() == 1).sum() / load_horse(i)[1].sum()
                          for i in (1, 2, 3, 4)])
    assert np.mean(ious) > max(0.5, 2 * stroke_iou), ious


def test_kernelcut_agrees_with_scribbles_and_lowers_its_energy():
    pytest.importorskip("maxflow")
    from nclib.proposals import kernelcut_proposals

    img = torch.cat([resized_photo("astronaut", 64), resized_photo("coffee", 64)])
    scr = torch.full((2, 64, 64), 255, dtype=torch.long)
    scr[0, 3, 5:60] = 0
    scr[0, 30:32, 20:40] = 15
    scr[1, 60, 5:60] = 0
    scr[1, 30:32, 20:45] = 9
    scr[1, 10, 5:20] = 4
    res = kernelcut_proposals(img, scr, potts_weight=2.0, iters=6)
    seeded = scr != 255
    assert torch.equal(res.labels[seeded], scr[seeded])
    assert set(res.labels[1].unique().tolist()) <= {0, 4, 9}
    e = torch.stack(res.energies)
    assert bool((e[1:] <= e[:-1] + 1e-9).all()), e
    assert bool((e[-1] < e[0]).all())
