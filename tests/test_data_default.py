"""The embedded default data set: deterministic, complete layout, atomic generation, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nclib.data.default as default
from nclib.data import DEFAULT_CLASS_NAMES, default_root, ensure_default, make_default, read_image, read_label
from nclib.data.__main__ import main as cli


def _files(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_default(tmp_path_factory.mktemp("a") / "default", seed=0, count=3)


def test_same_seed_gives_identical_bytes(small, tmp_path):
    again = make_default(tmp_path / "default", seed=0, count=3)
    a, b = _files(small), _files(again)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert a[k] == b[k], k


def test_other_seed_gives_other_images(small, tmp_path):
    other = make_default(tmp_path / "default", seed=1, count=3)
    rel = "scribble/JPEGImages/train_0000.jpg"
    assert (small / rel).read_bytes() != (other / rel).read_bytes()


def test_subset_reproduces_the_first_images_of_a_larger_build(small, tmp_path):
    bigger = make_default(tmp_path / "default", seed=0, count=5)
    for rel in ("scribble/SegmentationClassAug/val_0002.png", "scribble/pascal_2012_scribble/train_0001.png",
                "salient/Imgs/sal_0002.jpg"):
        assert (small / rel).read_bytes() == (bigger / rel).read_bytes()


def test_counts_set_split_sizes_and_a_mismatch_rebuilds(tmp_path):
    root = make_default(tmp_path / "pre", seed=1, counts={"train": 4, "val": 1, "salient_train": 0, "salient_val": 0})
    ids = (root / "scribble/ImageSets/Segmentation/train.txt").read_text().split()
    assert len(ids) == 4 and not list((root / "salient/Imgs").glob("*.jpg"))
    assert json.loads((root / "meta.json").read_text())["counts"]["train"] == 4
    # the same request keeps the set; another size (or seed) is rebuilt instead of silently kept
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert make_default(root, seed=1, counts={"train": 4, "val": 1, "salient_train": 0, "salient_val": 0}) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    make_default(root, seed=1, counts={"train": 5, "val": 1, "salient_train": 0, "salient_val": 0})
    assert len((root / "scribble/ImageSets/Segmentation/train.txt").read_text().split()) == 5
    with pytest.raises(ValueError, match="counts"):
        make_default(tmp_path / "bad", counts={"trian": 4})


def test_layout_and_contents(small):
    sc = small / "scribble"
    for split in ("train", "val"):
        ids = (sc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == 3
        for iid in ids:
            img = read_image(sc / "JPEGImages" / f"{iid}.jpg")
            mask = read_label(sc / "SegmentationClassAug" / f"{iid}.png")
            scr = read_label(sc / "pascal_2012_scribble" / f"{iid}.png")
            assert img.shape == (default.DEFAULT_SIZE, default.DEFAULT_SIZE, 3) and img.dtype == np.uint8
            assert mask.shape == scr.shape == img.shape[:2]
            assert mask.max() < len(DEFAULT_CLASS_NAMES)
            lab = scr != 255
            np.testing.assert_array_equal(scr[lab], mask[lab])
    assert (sc / "class_names.txt").read_text().split() == list(DEFAULT_CLASS_NAMES)
    sal = small / "salient"
    tr = (sal / "ImageSets/train.txt").read_text().split()
    va = (sal / "ImageSets/val.txt").read_text().split()
    assert len(tr) == len(va) == 3 and not set(tr) & set(va)
    for iid in tr + va:
        m = read_label(sal / "Imgs" / f"{iid}.png")
        assert set(np.unique(m).tolist()) <= {0, 255} and (m == 255).any()
        assert (sal / "Imgs" / f"{iid}.jpg").is_file()
    meta = json.loads((small / "meta.json").read_text())
    assert meta["generator_version"] == default.GENERATOR_VERSION and meta["seed"] == 0


def _border_contrast(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean |horizontal RGB step| across label borders divided by the mean step inside regions."""
    d = np.abs(np.diff(img.astype(float), axis=1)).sum(-1)
    across = mask[:, 1:] != mask[:, :-1]
    return d[across].mean() / d[~across].mean()


def test_masks_are_exact_image_edges_sit_on_mask_borders():
    """The stored mask is the compositing mask: shifting it by one pixel must lower the border contrast."""
    exact, shifted = [], []
    for i in range(10):
        img, mask = default.render_scene(0, 0, i)
        exact.append(_border_contrast(img, mask))
        shifted.append(_border_contrast(img, np.roll(mask, 1, axis=1)))
        img2, mask2 = default.render_scene(0, 0, i)  # no hidden global state
        np.testing.assert_array_equal(img, img2)
        np.testing.assert_array_equal(mask, mask2)
    assert min(exact) > 1.5
    assert all(e > s * 1.2 for e, s in zip(exact, shifted)), (exact, shifted)


def test_full_default_meets_the_size_requirements():
    c = default.DEFAULT_COUNTS
    assert c["train"] >= 300 and c["val"] >= 100 and len(DEFAULT_CLASS_NAMES) >= 7


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NCLIB_DATA", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv("NCLIB_DATA")
    assert default_root() == Path(default.__file__).resolve().parents[2] / "data" / "default"


def test_ensure_default_generates_once(monkeypatch, tmp_path):
    monkeypatch.setattr(default, "DEFAULT_COUNTS", {"train": 2, "val": 1, "salient_train": 1, "salient_val": 1})
    root = ensure_default(tmp_path / "d")
    assert (root / "meta.json").is_file()
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert ensure_default(tmp_path / "d") == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp


def test_ensure_default_regenerates_older_versions_only(monkeypatch, tmp_path):
    monkeypatch.setattr(default, "DEFAULT_COUNTS", {"train": 1, "val": 1, "salient_train": 1, "salient_val": 1})
    root = ensure_default(tmp_path / "d")
    meta = json.loads((root / "meta.json").read_text())
    for version, regenerated in ((default.GENERATOR_VERSION + 1, False), (default.GENERATOR_VERSION - 1, True)):
        meta["generator_version"] = version
        (root / "meta.json").write_text(json.dumps(meta))
        ensure_default(root)
        got = json.loads((root / "meta.json").read_text())["generator_version"]
        assert got == (default.GENERATOR_VERSION if regenerated else version)


def test_concurrent_callers_generate_once(monkeypatch, tmp_path):
    import threading

    monkeypatch.setattr(default, "DEFAULT_COUNTS", {"train": 2, "val": 1, "salient_train": 1, "salient_val": 1})
    builds = []
    real = default._build

    def counting(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(default, "_build", counting)
    out = []
    threads = [threading.Thread(target=lambda: out.append(ensure_default(tmp_path / "d"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_ensure_default_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="make-default --root"):
        ensure_default(tmp_path / "d")


def test_failed_generation_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    calls = {"n": 0}
    real = default.render_scene

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(default, "render_scene", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_default(tmp_path / "d", count=3)
    assert list(tmp_path.iterdir()) == []


def test_cli_make_default(tmp_path, capsys):
    assert cli(["make-default", "--root", str(tmp_path / "d"), "--count", "1", "--seed", "3"]) == 0
    assert "labelled_fraction_mean" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["seed"] == 3
    assert cli(["make-default", "--root", str(tmp_path / "d"), "--count", "1"]) == 0
    assert "already at" in capsys.readouterr().out
    assert cli(["make-default", "--root", str(tmp_path / "d"), "--count", "0", "--force"]) == 2
    assert "count" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    assert cli(["make-default", "--root", str(tmp_path / "other")]) == 2
    assert "not a default data set" in capsys.readouterr().err
    assert (tmp_path / "other" / "mine.txt").read_text() == "keep me"
