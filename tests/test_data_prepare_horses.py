"""prepare horses: the Weizmann layout (photos larger than their JPEG masks) from a zip served on 127.0.0.1 or a
local folder, and each bad input named."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nclib.data import MaskFolderDataset, read_image, read_label
from nclib.data import prepare as prep
from nclib.data.__main__ import main as cli

from _http import FileServer, zip_bytes

ZIP_NAME = prep.HORSES_URL.rsplit("/", 1)[-1]
PREFIX = "image_segmentation-2653401d6ea617026895aac17059eb57e017abcb/weizmann_horse_db"
N = 6


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _horse(i):
    """(photo (2H, 2W, 3), mask (H, W) 0/255): the photo at twice the mask's size, as in the archive."""
    h, w = 20 + 2 * i, 30 + i
    rng = np.random.default_rng(i)
    photo = rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[4 : h - 4, 5 : 12 + i] = 255
    return photo, mask


def _files(photo_fmt="JPEG", drop_mask=None, drop_image=None, masks=None):
    """{member: bytes} in the archive's layout; ``masks`` replaces some masks (id -> encoded bytes)."""
    files = {}
    for i in range(N):
        iid = f"horse{i + 1:03d}"
        photo, mask = _horse(i)
        if iid != drop_image:
            files[f"{PREFIX}/rgb/{iid}.jpg"] = _encode(photo, photo_fmt)
        if iid != drop_mask:
            files[f"{PREFIX}/figure_ground/{iid}.jpg"] = (masks or {}).get(iid, _encode(mask, "JPEG"))
    files[f"{PREFIX}/gray/horse001.jpg"] = b"not used"
    return files


def _folder(tmp_path, files):
    """The same pairs in the local layout (images/ + masks/) of /work/shared/data/weizmann_horse."""
    src = tmp_path / f"src{len(list(tmp_path.iterdir()))}"  # fresh: no file of an earlier case
    for name, data in files.items():
        sub = {"rgb": "images", "figure_ground": "masks"}.get(name.split("/")[-2])
        if sub:
            (src / sub).mkdir(parents=True, exist_ok=True)
            (src / sub / name.split("/")[-1]).write_bytes(data)
    return src


def test_prepare_horses_from_the_archive_and_from_a_folder(tmp_path):
    files = _files(photo_fmt="PNG")  # lossless photos: the area resize can be checked exactly
    with FileServer({ZIP_NAME: zip_bytes(files)}) as srv:
        assert cli(["prepare", "horses", "--root", str(tmp_path / "h"), "--base-url", srv.url, "--no-progress",
                    "--val-count", "2"]) == 0
    root = tmp_path / "h"
    assert json.loads((root / "meta.json").read_text())["dataset"] == "horses"
    for i in range(N):
        iid = f"horse{i + 1:03d}"
        photo, mask = _horse(i)
        img, m = read_image(root / "images" / f"{iid}.png"), read_label(root / "masks" / f"{iid}.png")
        assert img.shape == mask.shape + (3,) and m.shape == mask.shape
        # area interpolation at an exact factor 2 is the mean of each 2x2 block
        ref = photo.reshape(mask.shape[0], 2, mask.shape[1], 2, 3).astype(np.float64).mean(axis=(1, 3))
        assert np.abs(img - ref).max() <= 0.5 + 1e-9
        assert set(np.unique(m).tolist()) <= {0, 255} and (m == mask).mean() > 0.99  # JPEG ringing thresholded
    # the folder path gives the same bytes, and a fixed split
    out = prep.prepare_horses(tmp_path / "f", source=_folder(tmp_path, files), progress=False, val_count=2)
    out2 = prep.prepare_horses(tmp_path / "f2", source=_folder(tmp_path, files), progress=False, val_count=2)
    for i in range(N):
        for sub in ("images", "masks", "ImageSets"):
            p = f"{sub}/horse{i + 1:03d}.png" if sub != "ImageSets" else "ImageSets/val.txt"
            assert (out / p).read_bytes() == (root / p).read_bytes()
    tr = (out / "ImageSets" / "train.txt").read_text().split()
    va = (out / "ImageSets" / "val.txt").read_text().split()
    assert len(va) == 2 and len(tr) == N - 2 and sorted(tr + va) == [f"horse{i + 1:03d}" for i in range(N)]
    assert va == (out2 / "ImageSets" / "val.txt").read_text().split()
    ds = MaskFolderDataset(out, "train")
    assert ds.layout == "pairs" and len(ds) == N - 2 and ds[0]["mask"].max() == 1


def _bad(tmp_path, files, match, via_folder=False):
    root = tmp_path / f"h{len(list(tmp_path.iterdir()))}"  # a fresh root: no cached download of an earlier case
    with pytest.raises(ValueError, match=match):
        if via_folder:
            prep.prepare_horses(root, source=_folder(tmp_path, files), progress=False, val_count=2)
        else:
            with FileServer({ZIP_NAME: zip_bytes(files)}) as srv:
                prep.prepare_horses(root, base_url=srv.url, progress=False, val_count=2)
    assert not (root / "meta.json").exists()


@pytest.mark.parametrize("via_folder", [False, True])
def test_lonely_images_and_masks_are_named(tmp_path, via_folder):
    _bad(tmp_path, _files(drop_mask="horse004"), r"image without mask: .*(rgb|images)/horse004\.jpg", via_folder)
    _bad(tmp_path, _files(drop_image="horse002"), r"mask without image: .*(figure_ground|masks)/horse002\.jpg", via_folder)


def test_a_mask_of_another_aspect_ratio_is_named(tmp_path):
    _, mask = _horse(2)
    wrong = np.zeros((mask.shape[0], mask.shape[1] + 4), np.uint8)  # 4 px wider: >10 % off
    _bad(tmp_path, _files(masks={"horse003": _encode(wrong, "JPEG")}),
         r"mask .*figure_ground/horse003\.jpg \(\d+x\d+\) is not a resized copy of image .*horse003\.jpg")


def test_non_binary_and_colour_masks_are_named(tmp_path):
    _, mask = _horse(1)
    ramp = np.tile(np.linspace(0, 255, mask.shape[1]).astype(np.uint8), (mask.shape[0], 1))
    _bad(tmp_path, _files(masks={"horse002": _encode(ramp, "PNG")}), r"mask .*horse002\.jpg is not binary")
    colour = np.zeros(mask.shape + (3,), np.uint8)
    colour[..., 0] = mask
    _bad(tmp_path, _files(masks={"horse005": _encode(colour, "PNG")}), r"mask .*horse005\.jpg is a colour image")


def test_horse_mask_tolerates_ringing_only():
    # a 0/255 mask with mild noise (JPEG-like) thresholds at 128; an independent reference: the clean mask
    _, mask = _horse(3)
    noisy = np.clip(mask.astype(np.int16) + np.random.default_rng(0).integers(-40, 41, mask.shape), 0, 255)
    out = prep.horse_mask(_encode(noisy.astype(np.uint8), "PNG"), "x.png")
    assert np.array_equal(out, mask)
    assert np.array_equal(prep.horse_mask(_encode((mask // 255).astype(np.uint8), "PNG"), "y.png"), mask)  # 0/1


def test_source_and_val_count_are_for_horses_only(tmp_path, capsys):
    assert cli(["prepare", "msra10k", "--root", str(tmp_path / "m"), "--source", str(tmp_path)]) == 2
    assert "--source" in capsys.readouterr().err
    assert cli(["prepare", "msra10k", "--root", str(tmp_path / "m"), "--val-count", "3"]) == 2
    assert "--val-count" in capsys.readouterr().err
    with pytest.raises(ValueError, match="val_count 6 leaves no training images among 6"):
        prep.prepare_horses(tmp_path / "h", source=_folder(tmp_path, _files()), progress=False, val_count=6)


def test_a_missing_horse_folder_names_the_command(tmp_path):
    with pytest.raises(ValueError, match=r"prepare horses --root .*nowhere"):
        MaskFolderDataset(tmp_path / "nowhere", "train")
