"""Reliability of the data side (issue 12, items 9, 17, 18): binary masks in {0, 1} or {0, 255} only, no silent
resize in the msra layout, PIL's decompression-bomb error named, make-default leaves no temporary folder behind and
gives one-line errors. Each test fails on the code before these fixes."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nclib.data import MaskFolderDataset, make_default, read_image, read_label
from nclib.data import prepare as prep
from nclib.data.__main__ import main as cli

from _http import FileServer

REPO = Path(__file__).resolve().parents[1]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def object_mask(i: int, shape=(30, 40)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[6:20, 8 + i:28 + i] = 1
    return m


def msra_folder(root: Path, masks, image_shape=None) -> Path:
    """An msra-layout folder: Imgs/<id>.jpg + Imgs/<id>.png for each mask array given."""
    (root / "Imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, m in enumerate(masks):
        shape = image_shape or m.shape
        (root / "Imgs" / f"{i}.jpg").write_bytes(jpg_bytes(rng.integers(0, 256, (*shape, 3)).astype(np.uint8)))
        (root / "Imgs" / f"{i}.png").write_bytes(png_bytes(m))
    return root


def msra_zip(masks) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as z:
        for i, m in enumerate(masks):
            z.writestr(f"MSRA10K_Imgs_GT/Imgs/{i}.jpg",
                       jpg_bytes(rng.integers(0, 256, (*m.shape, 3)).astype(np.uint8)))
            z.writestr(f"MSRA10K_Imgs_GT/Imgs/{i}.png", png_bytes(m))
    return buf.getvalue()


# ---- 9: binary masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 255])
def test_mask_folder_reads_0_1_and_0_255_masks_alike(tmp_path, scale):
    masks = [object_mask(i) for i in range(3)]
    ds = MaskFolderDataset(msra_folder(tmp_path, [scale * m for m in masks]), scribbles="none")
    for i, m in enumerate(masks):
        assert np.array_equal(ds[i]["mask"].numpy(), m.astype(np.int64))


def test_mask_folder_rejects_other_values_and_msra_size_mismatch(tmp_path):
    ds = MaskFolderDataset(msra_folder(tmp_path / "a", [7 * object_mask(0)]), scribbles="none")
    with pytest.raises(ValueError, match=r"mask .*0\.png has values \[0, 7\]"):
        ds[0]
    ds = MaskFolderDataset(msra_folder(tmp_path / "b", [255 * object_mask(0)], image_shape=(36, 40)),
                           scribbles="none")
    with pytest.raises(ValueError, match=r"mask .*0\.png has size \(30, 40\) but image .*0\.jpg has \(36, 40\)"):
        ds[0]


def test_prepare_msra10k_keeps_0_1_masks_and_rejects_others(tmp_path):
    masks = [object_mask(i) for i in range(4)]
    with FileServer({"MSRA10K_Imgs_GT.zip": msra_zip(masks)}) as srv:
        root = prep.prepare_msra10k(tmp_path / "m", base_url=srv.url, progress=False)
    for i, m in enumerate(masks):
        assert np.array_equal(read_label(root / "Imgs" / f"{i}.png"), 255 * m)
    with FileServer({"MSRA10K_Imgs_GT.zip": msra_zip([255 * masks[0], 3 * masks[1]])}) as srv:
        with pytest.raises(ValueError, match=r"MSRA10K_Imgs_GT\.zip:MSRA10K_Imgs_GT/Imgs/1\.png has values \[0, 3\]"):
            prep.prepare_msra10k(tmp_path / "m2", base_url=srv.url, progress=False)


# ---- 17: decompression bombs ---------------------------------------------------------------------------------------
def test_decompression_bomb_is_a_named_error(tmp_path, monkeypatch):
    root = msra_folder(tmp_path / "f", [255 * object_mask(0)])
    zdata = msra_zip([255 * object_mask(0)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 30 x 40 = 1200 pixels: over twice the limit
    with pytest.raises(ValueError, match=r"0\.jpg.*decompression bomb"):
        read_image(root / "Imgs" / "0.jpg")
    with pytest.raises(ValueError, match=r"0\.(jpg|png).*decompression bomb"):
        MaskFolderDataset(root, scribbles="none")[0]
    with FileServer({"MSRA10K_Imgs_GT.zip": zdata}) as srv:
        with pytest.raises(ValueError, match=r"Imgs/0\.(jpg|png).*decompression bomb"):
            prep.prepare_msra10k(tmp_path / "m", base_url=srv.url, progress=False)


# ---- 18: make-default ----------------------------------------------------------------------------------------------
def test_make_default_terminated_leaves_no_temporary_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nclib.data", "make-default", "--root", str(tmp_path / "d")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".d.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert list(tmp_path.glob(".d.tmp-*")), "the build never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.glob(".d.tmp-*")) == [] and not (tmp_path / "d").exists()


def test_make_default_sweeps_folders_of_killed_builds(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".d.tmp-{int(dead.stdout)}-abc123"
    (stale / "scribble").mkdir(parents=True)
    live = tmp_path / f".d.tmp-{os.getpid()}-def456"  # a build still running in a live process: left alone
    live.mkdir()
    make_default(tmp_path / "d", count=1, force=True)
    assert not stale.exists() and live.exists() and (tmp_path / "d" / "meta.json").is_file()


def test_make_default_one_line_errors(tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli(["make-default", "--root", str(f)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli(["make-default", "--root", str(f / "d")]) == 2  # the parent is a file
    err = capsys.readouterr().err
    assert str(f) in err and len(err.strip().splitlines()) == 1

    def denied(*a, **k):  # the tests run as root, where chmod cannot make a folder unwritable
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    assert cli(["make-default", "--root", str(tmp_path / "ro" / "d")]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(tmp_path / "ro") in err and len(err.strip().splitlines()) == 1
