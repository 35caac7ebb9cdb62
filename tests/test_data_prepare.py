"""prepare voc / msra10k against small archives in the real formats, served from 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from nclib.data import MaskFolderDataset, VOCScribbleDataset, read_label
from nclib.data import prepare as prep
from nclib.data.__main__ import main as cli
from nclib.data.download import download

from _http import FileServer, zip_bytes

VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002"], ["2007_000101", "2007_000102"]
SBD_TRAIN, SBD_VAL = ["2008_000001", "2008_000002", "2007_000001"], ["2008_000003", "2007_000101"]
TRAIN_AUG = sorted({"2007_000001", "2007_000002", "2008_000001", "2008_000002", "2008_000003"})
ALL = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)) + ["2009_000999"]  # one image in no list


def _size(iid):
    return (30 + int(iid[-1]), 40 + int(iid[-2:]) % 7)  # different (H, W) per image


def _mask(iid, salt=0):
    h, w = _size(iid)
    m = np.zeros((h, w), np.uint8)
    k = 1 + (int(iid[-3:]) + salt) % 20
    m[5:20, 8 : 8 + 10 + salt] = k
    m[4, :] = 255  # a void line, as VOC's borders
    return m


def _jpg(iid):
    h, w = _size(iid)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(int(iid[-3:])).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def _png(arr, palette=False):
    buf = io.BytesIO()
    im = Image.fromarray(arr, mode="P" if palette else "L")
    if palette:
        im.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    im.save(buf, format="PNG")
    return buf.getvalue()


def _scribble(iid):
    m = _mask(iid)
    s = np.full(m.shape, 255, np.uint8)
    s[10:13, 10:16] = m[10, 12]
    s[25:28, 2:30] = 0
    return s


def _tar(files, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _mat(seg):
    buf = io.BytesIO()
    savemat(buf, {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1), "CategoriesPresent": np.array([1])}})
    return buf.getvalue()


def _xml(iid, polylines):
    h, w = _size(iid)
    parts = [f"<annotation><filename>{iid}.jpg</filename><size><width>{w}</width><height>{h}</height>"
             "<depth>3</depth></size>"]
    for tag, pts in polylines:
        parts.append("<polygon><tag>%s</tag>%s</polygon>" % (
            tag, "".join(f"<point><X>{x}</X><Y>{y}</Y></point>" for x, y in pts)))
    parts.append("</annotation>")
    return "".join(parts).encode()


def _archives(scribble_override=None):
    v = "VOCdevkit/VOC2012/"
    voc = {f"{v}ImageSets/Segmentation/train.txt": "\n".join(VOC_TRAIN).encode() + b"\n",
           f"{v}ImageSets/Segmentation/val.txt": "\n".join(VOC_VAL).encode() + b"\n"}
    for iid in ALL:
        voc[f"{v}JPEGImages/{iid}.jpg"] = _jpg(iid)
    for iid in VOC_TRAIN + VOC_VAL:
        voc[f"{v}SegmentationClass/{iid}.png"] = _png(_mask(iid), palette=True)
    sbd = {"benchmark_RELEASE/dataset/train.txt": "\n".join(SBD_TRAIN).encode(),
           "benchmark_RELEASE/dataset/val.txt": "\n".join(SBD_VAL).encode()}
    for iid in SBD_TRAIN + SBD_VAL:  # SBD's masks of VOC images differ: VOC's must win
        sbd[f"benchmark_RELEASE/dataset/cls/{iid}.mat"] = _mat(_mask(iid, salt=3))
    scr = {f"pascal_2012_scribble/{iid}.png": _png(_scribble(iid)) for iid in TRAIN_AUG}
    if scribble_override:
        scr.update(scribble_override)
    xml = {f"scribble_annotation/pascal_2012/{iid}.xml": _xml(iid, [("aeroplane", [(10, 12), (15, 12)]),
                                                                     ("background", [(2, 26), (29, 26)])])
           for iid in TRAIN_AUG}
    xml["scribble_annotation/pascal_context/2008_000001.xml"] = b"<annotation/>"  # other data set, skipped
    return {
        "VOCtrainval_11-May-2012.tar": _tar(voc, "w"),
        "benchmark.tgz": _tar(sbd, "w:gz"),
        "pascal_2012_scribble.zip": zip_bytes(scr),
        "scribble_annotation.zip": zip_bytes(xml),
    }


def _md5s(files):
    return {k: ("md5", hashlib.md5(v).hexdigest()) for k, v in files.items()}


@pytest.fixture(scope="module")
def archives():
    return _archives()


def test_prepare_voc_builds_the_layout(archives, tmp_path):
    with FileServer(archives) as srv:
        root = prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums=_md5s(archives))
        n_requests = len(srv.requests)
        assert prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False) == root
        assert len(srv.requests) == n_requests  # complete: nothing fetched again
    seg = root / "ImageSets" / "Segmentation"
    assert (seg / "train_aug.txt").read_text().split() == TRAIN_AUG
    assert (seg / "val.txt").read_text().split() == sorted(VOC_VAL)
    for iid in VOC_TRAIN + VOC_VAL:  # VOC's own masks (palette indices), not SBD's
        np.testing.assert_array_equal(read_label(root / "SegmentationClassAug" / f"{iid}.png"), _mask(iid))
    for iid in ("2008_000001", "2008_000003"):
        np.testing.assert_array_equal(read_label(root / "SegmentationClassAug" / f"{iid}.png"), _mask(iid, 3))
    for iid in TRAIN_AUG:
        np.testing.assert_array_equal(read_label(root / "pascal_2012_scribble" / f"{iid}.png"), _scribble(iid))
    meta = json.loads((root / "meta.json").read_text())
    assert meta["dataset"] == "voc" and meta["train_aug"] == 5 and meta["train_aug_without_scribble"] == 0
    ds = VOCScribbleDataset(root, "train_aug")
    assert len(ds) == 5 and ds.num_classes == 21
    s = ds[0]
    assert s["image"].shape[-2:] == s["mask"].shape == _size(s["id"])
    assert (VOCScribbleDataset(root, "val")[0]["scribble"] == 255).all()


def test_prepare_voc_from_scribblesup_xml(archives, tmp_path):
    with FileServer(archives) as srv:
        root = prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums={},
                                scribbles="xml")
    s = read_label(root / "pascal_2012_scribble" / "2008_000002.png")
    expect = np.full(s.shape, 255, np.uint8)
    expect[11:14, 10:16] = 1  # aeroplane from (10, 12) to (15, 12), 3 px wide
    expect[25:28, 2:30] = 0  # background from (2, 26) to (29, 26)
    core = expect != 255
    np.testing.assert_array_equal(s[core], expect[core])
    # Only the round caps (one pixel beyond each end) may add to the closed form.
    extra = np.argwhere((s != 255) & ~core)
    assert all(c in (9, 16, 1, 30) for c in extra[:, 1]), extra


def test_xml_rasterizer_closed_form_and_errors():
    """A polyline of width 3: every pixel within 1 px of the segment (exactly 3 rows/columns across), nothing
    farther than the round caps (distance <= 1.5 from the segment ends)."""
    xml = _xml("2008_000002", [("cat", [(5, 5), (5, 20)]), ("12", [(20, 8), (30, 8)])])
    s = prep.rasterize_scribble_xml(xml)
    assert s.shape == _size("2008_000002")
    assert prep.VOC_CLASS_NAMES[8] == "cat" and set(np.unique(s).tolist()) == {8, 12, 255}
    yy, xx = np.mgrid[: s.shape[0], : s.shape[1]]
    for cls, (x0, y0, x1, y1) in ((8, (5, 5, 5, 20)), (12, (20, 8, 30, 8))):
        # distance to the segment (axis-aligned here)
        dx = np.maximum(np.maximum(min(x0, x1) - xx, xx - max(x0, x1)), 0)
        dy = np.maximum(np.maximum(min(y0, y1) - yy, yy - max(y0, y1)), 0)
        dist = np.hypot(dx, dy)
        on = s == cls
        assert on[dist <= 1].all()
        assert (dist[on] <= 1.5).all()
        if y0 == y1:
            assert (on[:, x0 : x1 + 1].sum(0) == 3).all()
        else:
            assert (on[y0 : y1 + 1].sum(1) == 3).all()
    alias = prep.rasterize_scribble_xml(_xml("2008_000002", [("TV/Monitor", [(5, 5), (5, 20)]),
                                                             ("12", [(20, 8), (30, 8)])]))
    np.testing.assert_array_equal(alias == 20, s == 8)
    with pytest.raises(ValueError, match=r"x\.xml.*unknown class tag 'unicorn'"):
        prep.rasterize_scribble_xml(_xml("2008_000002", [("unicorn", [(1, 1), (2, 2)])]), name="x.xml")
    with pytest.raises(ValueError, match=r"cannot parse scribble XML y\.xml"):
        prep.rasterize_scribble_xml(b"<annotation>", name="y.xml")


def test_sbd_mat_roundtrip_and_bad_file():
    m = _mask("2008_000003")
    np.testing.assert_array_equal(prep.read_sbd_mat(_mat(m)), m)
    buf = io.BytesIO()
    savemat(buf, {"other": np.zeros(3)})
    with pytest.raises(ValueError, match=r"cannot read SBD annotation z\.mat"):
        prep.read_sbd_mat(buf.getvalue(), name="z.mat")


def test_train_aug_rule():
    assert prep.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == TRAIN_AUG


def test_interrupted_download_resumes_with_range(archives, tmp_path):
    name = "VOCtrainval_11-May-2012.tar"
    with FileServer(archives) as srv:
        srv.truncate_once[name] = 5000
        with pytest.raises(ValueError, match=r"VOCtrainval_11-May-2012\.tar.*rerun to resume"):
            prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums=_md5s(archives))
        part = tmp_path / "voc" / "downloads" / (name + ".part")
        assert part.stat().st_size == 5000
        assert not (tmp_path / "voc" / "meta.json").exists()
        assert not (tmp_path / "voc" / "downloads" / name).exists()
        prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums=_md5s(archives))
        assert (name, "bytes=5000-") in srv.requests
    assert (tmp_path / "voc" / "downloads" / name).read_bytes() == archives[name]
    assert (tmp_path / "voc" / "meta.json").is_file()


def test_checksum_mismatch_names_the_file_and_leaves_nothing(archives, tmp_path):
    sums = _md5s(archives)
    sums["benchmark.tgz"] = ("md5", "0" * 32)
    with FileServer(archives) as srv:
        with pytest.raises(ValueError, match=r"checksum mismatch for .*benchmark\.tgz"):
            prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums=sums)
    dl = tmp_path / "voc" / "downloads"
    assert sorted(p.name for p in dl.iterdir()) == ["VOCtrainval_11-May-2012.tar"]
    assert not (tmp_path / "voc" / "meta.json").exists()


def test_the_known_checksums_reject_other_files(archives, tmp_path, capsys):
    """The real VOC md5 is in the table: the small test archive must fail it (via the CLI: exit 2, message)."""
    with FileServer(archives) as srv:
        rc = cli(["prepare", "voc", "--root", str(tmp_path / "voc"), "--base-url", srv.url, "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "VOCtrainval_11-May-2012.tar" in err
    assert prep.KNOWN_CHECKSUMS["VOCtrainval_11-May-2012.tar"][1] in err


def test_corrupt_archives_are_named(archives, tmp_path):
    bad = dict(archives)
    bad["benchmark.tgz"] = archives["benchmark.tgz"][: len(archives["benchmark.tgz"]) // 2]
    with FileServer(bad) as srv:
        with pytest.raises(ValueError, match=r"corrupt or truncated archive .*benchmark\.tgz"):
            prep.prepare_voc(tmp_path / "a", base_url=srv.url, progress=False, checksums={})
    assert not (tmp_path / "a" / "meta.json").exists()
    assert not (tmp_path / "a" / "ImageSets" / "Segmentation" / "train_aug.txt").exists()
    bad = dict(archives)
    bad["pascal_2012_scribble.zip"] = b"PK\x03\x04 garbage"
    with FileServer(bad) as srv:
        with pytest.raises(ValueError, match=r"corrupt or truncated archive .*pascal_2012_scribble\.zip"):
            prep.prepare_voc(tmp_path / "b", base_url=srv.url, progress=False, checksums={})


def test_scribble_label_out_of_range_is_rejected(tmp_path):
    s = _scribble("2008_000002")
    s[0, 0] = 40
    files = _archives({"pascal_2012_scribble/2008_000002.png": _png(s)})
    with FileServer(files) as srv:
        with pytest.raises(ValueError, match=r"pascal_2012_scribble/2008_000002\.png has labels \[40\]"):
            prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False, checksums={})
    assert not (tmp_path / "voc" / "meta.json").exists()


def test_mirror_from_environment(archives, tmp_path, monkeypatch):
    with FileServer(archives) as srv:
        monkeypatch.setenv(prep.MIRROR_ENV, srv.url)
        prep.prepare_voc(tmp_path / "voc", progress=False, checksums={})
        assert {r[0] for r in srv.requests} == {"VOCtrainval_11-May-2012.tar", "benchmark.tgz",
                                                "pascal_2012_scribble.zip"}


def test_missing_file_on_server_names_the_url(tmp_path):
    with FileServer({}) as srv:
        with pytest.raises(ValueError, match=r"VOCtrainval_11-May-2012\.tar failed: HTTP 404"):
            prep.prepare_voc(tmp_path / "voc", base_url=srv.url, progress=False)


def _msra_zip(n=12, drop_mask=None):
    files = {}
    for i in range(n):
        iid = f"{i + 1}"
        rng = np.random.default_rng(i)
        img = rng.integers(0, 255, (24 + i, 32, 3), dtype=np.uint8)
        m = np.zeros((24 + i, 32), np.uint8)
        m[5:15, 6 : 10 + i] = 255
        b = io.BytesIO()
        Image.fromarray(img).save(b, format="JPEG")
        files[f"MSRA10K_Imgs_GT/Imgs/{iid}.jpg"] = b.getvalue()
        if iid != drop_mask:
            files[f"MSRA10K_Imgs_GT/Imgs/{iid}.png"] = _png(m)
    return zip_bytes(files)


def test_prepare_msra10k(tmp_path):
    z = _msra_zip()
    with FileServer({"MSRA10K_Imgs_GT.zip": z}) as srv:
        assert cli(["prepare", "msra10k", "--root", str(tmp_path / "m"), "--base-url", srv.url,
                    "--no-progress"]) == 0
        root2 = prep.prepare_msra10k(tmp_path / "m2", base_url=srv.url, progress=False)
    root = tmp_path / "m"
    tr = (root / "ImageSets" / "train.txt").read_text().split()
    va = (root / "ImageSets" / "val.txt").read_text().split()
    assert len(va) == 1 and len(tr) == 11 and not set(tr) & set(va)
    assert va == (root2 / "ImageSets" / "val.txt").read_text().split()  # deterministic split
    m = read_label(root / "Imgs" / "3.png")
    assert m.shape == (26, 32) and set(np.unique(m).tolist()) == {0, 255}
    ds = MaskFolderDataset(root, "train")
    assert len(ds) == 11 and ds.layout == "msra"
    assert ds[0]["mask"].max() == 1


def test_msra_image_without_mask_is_named(tmp_path):
    with FileServer({"MSRA10K_Imgs_GT.zip": _msra_zip(drop_mask="7")}) as srv:
        with pytest.raises(ValueError, match=r"image without mask in .*MSRA10K_Imgs_GT\.zip: .*Imgs/7\.jpg"):
            prep.prepare_msra10k(tmp_path / "m", base_url=srv.url, progress=False)
    assert not (tmp_path / "m" / "meta.json").exists()


def test_download_verifies_an_existing_file(tmp_path):
    data = b"x" * 3000
    with FileServer({"f.bin": data}) as srv:
        p = download(f"{srv.url}/f.bin", tmp_path / "f.bin", checksum=("sha256", hashlib.sha256(data).hexdigest()),
                     progress=False)
        assert p.read_bytes() == data
        (tmp_path / "f.bin").write_bytes(b"y" * 3000)
        with pytest.raises(ValueError, match=r"checksum mismatch for .*f\.bin"):
            download(f"{srv.url}/f.bin", tmp_path / "f.bin", checksum=("sha256", hashlib.sha256(data).hexdigest()))
