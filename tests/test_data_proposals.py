"""Proposal mask sets (Table 2): written per training image from its scribbles by the library's methods, resumable,
deterministic, the unsure band of the ignore variant, and bad input named."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nclib.clustering import seeded_normalized_cut
from nclib.data import make_default, read_image, read_label
from nclib.data import proposal_masks as PM
from nclib.data.__main__ import main
from nclib.proposals import grabcut_proposals, kernelcut_proposals

N_TRAIN = 3


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_default(tmp_path_factory.mktemp("d") / "default", seed=0, count=N_TRAIN) / "scribble"


@pytest.fixture
def root(small, tmp_path) -> Path:
    dst = tmp_path / "sc"
    shutil.copytree(small, dst)
    return dst


def _ids(root: Path):
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _library(method: str, root: Path, iid: str) -> np.ndarray:
    """The proposal straight from the library function (an independent path to the same numbers)."""
    img = torch.from_numpy(read_image(root / "JPEGImages" / f"{iid}.jpg").transpose(2, 0, 1).copy()).float()[None]
    scr = torch.from_numpy(read_label(root / "pascal_2012_scribble" / f"{iid}.png").astype(np.int64))[None]
    if method == "grabcut":
        import cv2

        cv2.setRNGSeed(0)
        return grabcut_proposals(img, scr)[0].numpy()
    if method == "nc":
        return seeded_normalized_cut(img, scr, num_classes=7).labels[0].numpy()
    pytest.importorskip("maxflow")
    return kernelcut_proposals(img, scr, num_classes=7).labels[0].numpy()


@pytest.mark.parametrize("method", PM.PROPOSAL_METHODS)
def test_masks_written_in_voc_layout(root, method):
    out = PM.write_proposal_masks(root, method, progress=False)
    assert out == root / f"Proposals_{method}" and not any(p.name.startswith(".") for p in root.iterdir())
    ids = _ids(root)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    labelled = total = 0
    for iid in ids:
        im = Image.open(out / f"{iid}.png")
        assert im.mode == "L" and im.palette is None
        mask = np.asarray(im)
        np.testing.assert_array_equal(mask, _library(method, root, iid))
        scr = read_label(root / "pascal_2012_scribble" / f"{iid}.png")
        assert np.array_equal(mask[scr != 255], scr[scr != 255])  # agrees with every scribble
        labelled, total = labelled + (mask != 255).sum(), total + mask.size
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == method and meta["params"] == PM.DEFAULT_PARAMS[method] and meta["images"] == N_TRAIN
    assert meta["nclib_version"] and meta["labelled_fraction"] == pytest.approx(labelled / total)
    assert meta["no_scribble_images"] == 0 and meta["unsure_ignore"] is False


def test_resumable_and_finished_set_left_alone(root, monkeypatch):
    ids = _ids(root)
    partial = root / ".Proposals_nc.partial"
    partial.mkdir()
    sentinel = np.full((112, 112), 3, np.uint8)  # not what NC gives: shows the file was kept, not recomputed
    Image.fromarray(sentinel).save(partial / f"{ids[0]}.png")
    calls = []
    real = PM.compute_proposal
    monkeypatch.setattr(PM, "compute_proposal", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = PM.write_proposal_masks(root, "nc", progress=False)
    assert len(calls) == N_TRAIN - 1 and not partial.exists()
    np.testing.assert_array_equal(read_label(out / f"{ids[0]}.png"), sentinel)
    np.testing.assert_array_equal(read_label(out / f"{ids[1]}.png"), _library("nc", root, ids[1]))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert PM.write_proposal_masks(root, "nc", progress=False) == out and len(calls) == N_TRAIN - 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_deterministic(root, tmp_path):
    a = PM.write_proposal_masks(root, "grabcut", out=tmp_path / "a", progress=False)
    b = PM.write_proposal_masks(root, "grabcut", out=tmp_path / "b", progress=False)
    for p in a.glob("*.png"):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    assert (a / "meta.json").read_text() == (b / "meta.json").read_text()


def _band_reference(mask: np.ndarray, band: int) -> np.ndarray:
    """Pixels with another label within Chebyshev distance ``band`` (brute force over the window's offsets)."""
    h, w = mask.shape
    pad = np.pad(mask.astype(int), band, mode="edge")
    out = np.zeros((h, w), bool)
    for dy in range(-band, band + 1):
        for dx in range(-band, band + 1):
            out |= pad[band + dy: band + dy + h, band + dx: band + dx + w] != mask
    return out


def test_ignore_variant_marks_the_boundary_band(root):
    plain = PM.write_proposal_masks(root, "kernelcut" if _has_maxflow() else "nc", progress=False)
    method = plain.name.split("_", 1)[1]
    ign = PM.write_proposal_masks(root, method, unsure_ignore=True, band=2, progress=False)
    assert ign.name == f"Proposals_{method}_ignore"
    for iid in _ids(root):
        p, q = read_label(plain / f"{iid}.png"), read_label(ign / f"{iid}.png")
        scr = read_label(root / "pascal_2012_scribble" / f"{iid}.png")
        want = _band_reference(p, 2) & (scr == 255)
        assert want.any() and not want.all()
        np.testing.assert_array_equal(q == 255, want)
        np.testing.assert_array_equal(q[~want], p[~want])
    meta = json.loads((ign / "meta.json").read_text())
    assert meta["unsure_ignore"] is True and meta["band"] == 2 and 0 < meta["labelled_fraction"] < 1


def _has_maxflow() -> bool:
    try:
        import maxflow  # noqa: F401
    except ImportError:
        return False
    return True


def test_image_without_scribbles_is_all_ignore_and_counted(root):
    iid = _ids(root)[1]
    Image.fromarray(np.full((112, 112), 255, np.uint8)).save(root / "pascal_2012_scribble" / f"{iid}.png")
    out = PM.write_proposal_masks(root, "grabcut", progress=False)
    assert (read_label(out / f"{iid}.png") == 255).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["no_scribble_images"] == 1 and meta["no_scribble_ids"] == [iid]
    assert meta["labelled_fraction"] == pytest.approx((N_TRAIN - 1) / N_TRAIN)


def test_bad_input_is_named(root, tmp_path, capsys):
    with pytest.raises(ValueError, match="data root not found"):
        PM.write_proposal_masks(tmp_path / "nowhere", "nc")
    with pytest.raises(ValueError, match=r"method must be one of \['grabcut', 'nc', 'kernelcut'\], got 'slic'"):
        PM.write_proposal_masks(root, "slic")
    with pytest.raises(ValueError, match="band must be an int >= 1"):
        PM.write_proposal_masks(root, "nc", unsure_ignore=True, band=0)
    with pytest.raises(ValueError, match=r"params has keys \['sigma'\] that grabcut does not take"):
        PM.write_proposal_masks(root, "grabcut", params={"sigma": 3})
    with pytest.raises(ValueError, match="split list not found"):
        PM.write_proposal_masks(root, "nc", split="nosplit")
    PM.write_proposal_masks(root, "grabcut", out=tmp_path / "g", limit=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        PM.write_proposal_masks(root, "grabcut", out=tmp_path / "g", limit=2, progress=False)
    bad = np.full((112, 112), 255, np.uint8)
    bad[5, 5] = 9  # 7 classes
    Image.fromarray(bad).save(root / "pascal_2012_scribble" / f"{_ids(root)[0]}.png")
    with pytest.raises(ValueError, match=r"train_0000.png has labels \[9\] outside \[0, 7\)"):
        PM.write_proposal_masks(root, "nc")
    # the command: one line on stderr, exit status 2
    assert main(["proposals", "--method", "slic", "--root", str(root)]) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert main(["proposals", "--method", "nc", "--root", str(tmp_path / "nowhere")]) == 2
    assert "data root not found" in capsys.readouterr().err
    assert main(["proposals", "--method", "nc", "--root", str(root), "--param", "sigma_xy"]) == 2
    assert "--param must be KEY=VALUE" in capsys.readouterr().err


def test_command_writes_the_set(root, capsys):
    assert main(["proposals", "--method", "grabcut", "--root", str(root), "--param", "iters=3", "--no-progress"]) == 0
    assert f"{N_TRAIN} proposals at {root / 'Proposals_grabcut'}" in capsys.readouterr().out
    assert json.loads((root / "Proposals_grabcut" / "meta.json").read_text())["params"] == {"iters": 3, "margin": 0.1}


@pytest.mark.parametrize("tqdm_disable", [None, "1"])
def test_progress_bar_shown_unless_tqdm_disable(root, tmp_path, tqdm_disable):
    """The bar is on by default; TQDM_DISABLE=1 (the Makefile's notebook runs; tqdm reads it at import, hence a
    fresh interpreter) keeps it out of executed notebooks."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if tqdm_disable:
        env["TQDM_DISABLE"] = tqdm_disable
    code = ("import sys; from nclib.data import proposal_masks as PM; "
            "PM.write_proposal_masks(sys.argv[1], 'grabcut', out=sys.argv[2], limit=1)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / "a")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("grabcut proposals" in out.stderr) is (tqdm_disable is None), out.stderr
