"""Datasets: sample shapes and dtypes, label checks with file names, the MSRA and paired-folder layouts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nclib.data import (
    DEFAULT_CLASS_NAMES,
    VOC_CLASS_NAMES,
    MaskFolderDataset,
    TrainTransform,
    VOCScribbleDataset,
    make_default,
    read_label,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_default(tmp_path_factory.mktemp("d") / "default", seed=0, count=4)


@pytest.fixture
def voc_copy(small, tmp_path) -> Path:
    dst = tmp_path / "sc"
    shutil.copytree(small / "scribble", dst)
    return dst


def _check_sample(s, h, w):
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, h, w)
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 255
    assert s["scribble"].dtype == torch.int64 and s["scribble"].shape == (h, w)
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == (h, w)
    assert isinstance(s["id"], str)


def test_voc_layout_sample(small):
    ds = VOCScribbleDataset(small / "scribble", "train")
    assert len(ds) == 4 and ds.num_classes == 7 and ds.class_names == DEFAULT_CLASS_NAMES
    s = ds[1]
    _check_sample(s, 112, 112)
    assert s["id"] == "train_0001"
    raw = read_label(small / "scribble" / "SegmentationClassAug" / "train_0001.png")
    np.testing.assert_array_equal(s["mask"].numpy(), raw)
    img = np.asarray(Image.open(small / "scribble" / "JPEGImages" / "train_0001.jpg").convert("RGB"))
    np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), img.astype(np.float32))
    lab = s["scribble"] != 255
    assert lab.any() and torch.equal(s["scribble"][lab], s["mask"][lab])


def test_batches_stack_with_default_collate(small):
    ds = VOCScribbleDataset(small / "scribble", "train", transform=TrainTransform(crop=64))
    b = next(iter(DataLoader(ds, batch_size=4)))
    assert b["image"].shape == (4, 3, 64, 64) and b["mask"].shape == (4, 64, 64) and len(b["id"]) == 4


def test_voc_palette_pngs_give_indices(voc_copy):
    """VOC's own PNGs are palette images: the class is the index, not the colour."""
    p = voc_copy / "SegmentationClassAug" / "train_0000.png"
    m = read_label(p)
    m[:3, :3] = 255
    pal = Image.fromarray(m, mode="P")
    pal.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    pal.save(p)
    ds = VOCScribbleDataset(voc_copy, "train")
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), m)
    assert ds[0]["mask"][0, 0] == 255


def test_scribble_label_outside_class_range_is_rejected_with_file_name(voc_copy):
    p = voc_copy / "pascal_2012_scribble" / "train_0002.png"
    s = read_label(p)
    s[5, 5] = 9  # 7 classes
    Image.fromarray(s, mode="L").save(p)
    ds = VOCScribbleDataset(voc_copy, "train")
    with pytest.raises(ValueError, match=r"train_0002\.png.*\[9\]"):
        ds[2]
    ds[1]  # the others still load


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(ValueError, match=r"python -m nclib\.data prepare voc --root .*voc"):
        VOCScribbleDataset(tmp_path / "voc", "train_aug")
    (tmp_path / "voc2").mkdir()
    with pytest.raises(ValueError, match=r"train_aug\.txt.*python -m nclib\.data prepare voc --root"):
        VOCScribbleDataset(tmp_path / "voc2", "train_aug")
    with pytest.raises(ValueError, match=r"prepare msra10k --root"):
        MaskFolderDataset(tmp_path / "msra10k")


def test_missing_files_are_named(voc_copy):
    (voc_copy / "pascal_2012_scribble" / "train_0003.png").unlink()
    (voc_copy / "SegmentationClassAug" / "train_0001.png").unlink()
    ds = VOCScribbleDataset(voc_copy, "train")
    with pytest.raises(ValueError, match=r"scribble file not found: .*train_0003\.png"):
        ds[3]
    with pytest.raises(ValueError, match=r"label file not found: .*train_0001\.png"):
        ds[1]
    # Evaluation splits do without scribbles: all unlabelled.
    shutil.rmtree(voc_copy / "pascal_2012_scribble")
    val = VOCScribbleDataset(voc_copy, "val")
    assert (val[0]["scribble"] == 255).all()
    with pytest.raises(ValueError, match="scribble folder not found"):
        VOCScribbleDataset(voc_copy, "train")


def test_corrupt_image_is_named(voc_copy):
    (voc_copy / "JPEGImages" / "train_0000.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"train_0000\.jpg"):
        VOCScribbleDataset(voc_copy, "train")[0]


def test_voc_class_names_without_class_file(voc_copy):
    (voc_copy / "class_names.txt").unlink()
    ds = VOCScribbleDataset(voc_copy, "train")
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASS_NAMES


def test_msra_layout_default_salient(small):
    ds = MaskFolderDataset(small / "salient", "train")
    assert len(ds) == 4 and ds.num_classes == 2 and ds.layout == "msra"
    s = ds[0]
    _check_sample(s, 112, 112)
    raw = read_label(small / "salient" / "Imgs" / f"{s['id']}.png")
    np.testing.assert_array_equal(s["mask"].numpy(), (raw >= 128).astype(np.int64))
    lab = s["scribble"] != 255
    assert (s["scribble"][lab] == s["mask"][lab]).all() and (s["scribble"] == 1).any()
    assert torch.equal(ds[0]["scribble"], s["scribble"])  # synthesized deterministically per id
    assert len(MaskFolderDataset(small / "salient")) == 8
    assert (MaskFolderDataset(small / "salient", "val", scribbles="none")[0]["scribble"] == 255).all()


def _pairs(root: Path, n: int = 5) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        m = np.zeros((30, 40), np.uint8)
        m[8:22, 10 + i : 30 + i] = 255
        img = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)  # twice the mask size, as the horses
        Image.fromarray(img).save(root / "images" / f"p{i:03d}.jpg")
        Image.fromarray(m).save(root / "masks" / f"p{i:03d}.jpg", quality=60)  # JPEG ringing


def test_pair_folders_resize_the_image_and_threshold_the_mask(tmp_path):
    _pairs(tmp_path)
    ds = MaskFolderDataset(tmp_path)
    assert ds.layout == "pairs" and len(ds) == 5
    s = ds[2]
    _check_sample(s, 30, 40)
    expect = np.zeros((30, 40), np.int64)
    expect[8:22, 12:32] = 1
    # JPEG ringing stays on the right side of 128 except possibly right at the border
    assert (s["mask"].numpy() != expect).mean() < 0.01
    tr, va = MaskFolderDataset(tmp_path, "train"), MaskFolderDataset(tmp_path, "val", val_every=2)
    assert len(tr) == 5 and va.ids == ["p001", "p003"]


def test_image_without_mask_is_named(tmp_path):
    _pairs(tmp_path)
    (tmp_path / "masks" / "p003.jpg").unlink()
    with pytest.raises(ValueError, match=r"image without mask: .*p003\.jpg"):
        MaskFolderDataset(tmp_path)


def test_weizmann_horses(horses):
    ds = MaskFolderDataset(horses)
    assert len(ds) == 328
    fg = []
    for i in (0, 100, 327):
        s = ds[i]
        m = Image.open(horses / "masks" / f"{s['id']}.jpg")
        _check_sample(s, m.size[1], m.size[0])
        fg.append(float(s["mask"].float().mean()))
    assert 0.1 < np.mean(fg) < 0.45  # SOURCE.md: mean foreground fraction 0.25
