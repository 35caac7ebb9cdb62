"""Training engine: config checking, determinism, exact resume, NaN guard, checkpoint checks, results cache, CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nclib.photos import photo
from nclib.train import Config, NonFiniteLossError, config_hash, run, train
from nclib.train import results as R
from nclib.train.loop import nc_term
from nclib.train.stream import StreamSampler


def make_tiny_voc(root, n_train=6, n_val=3, size=40):
    """A VOC + ScribbleSup layout folder with real photo crops: class 1 = bright pixels, scribbles on both."""
    for d in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("background\nbright\n")
    img_all = photo("astronaut")
    ids = {"train": [], "val": []}
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            y, x = 30 + 37 * k, 50 + 23 * k
            img = img_all[y:y + size, x:x + size]
            mask = (img.mean(-1) > img.mean()).astype(np.uint8)
            scrib = np.full(mask.shape, 255, np.uint8)
            scrib[::7, ::5] = mask[::7, ::5]
            iid = f"{split}_{i}"
            Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=95)
            Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{iid}.png")
            Image.fromarray(scrib).save(root / "pascal_2012_scribble" / f"{iid}.png")
            ids[split].append(iid)
            k += 1
    for split, lst in ids.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(lst) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_voc(tmp_path_factory.mktemp("tiny_voc"))


def tiny_cfg(root, **kw):
    d = dict(name="tiny", model="small", model_args={"width": 8}, root=str(root), crop=32, scale_range=[0.8, 1.2],
             batch_size=2, iterations=6, lr=0.01, nc_weight=0.5, sigma_xy=10.0, threads=1, log_every=1,
             device="cpu", seed=3)
    d.update(kw)
    return Config.from_dict(d)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- config -----------------------------------------------------------------------------------------------------
def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config keys \['lamda'\]"):
        Config.from_dict({"lamda": 1.6})
    y = tmp_path / "c.yaml"
    y.write_text("model: small\nnc_weight: 1.6\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="batchsize"):
        Config.from_yaml(y)
    y.write_text("model: small\nnc_weight: 1.6\nsigma_xy: 30\n")
    cfg = Config.from_yaml(y)
    assert cfg.nc_weight == 1.6 and cfg.sigma_xy == 30


@pytest.mark.parametrize("kw, msg", [({"model": "unet"}, "model"), ({"sigma_xy": 0}, "sigma_xy"),
                                     ({"iterations": 0}, "iterations"), ({"nc_weight": -1}, "nc_weight"),
                                     ({"nc_scale": 2.0}, "nc_scale"), ({"supervision": "boxes"}, "supervision"),
                                     ({"optimizer": "rmsprop"}, "optimizer")])
def test_bad_config_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Config.from_dict(kw)


def test_hash_ignores_bookkeeping_but_not_settings():
    a = Config()
    assert config_hash(a) == config_hash(a.replace(name="other", device="cpu", num_workers=4))
    assert config_hash(a) != config_hash(a.replace(nc_weight=1.6))
    assert config_hash(Config.from_dict({"sigma_xy": 30})) == config_hash(Config.from_dict({"sigma_xy": 30.0}))
    # final-evaluation settings change the result's hash, not the checkpoint's (it may be re-scored)
    b = a.replace(eval_crf=True, crf_args={"bi_xy_std": 40.0})
    assert config_hash(a) != config_hash(b) and config_hash(a, True) == config_hash(b, True)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        train(tiny_cfg(tmp_path / "nowhere"), tmp_path / "out")


# ---- data stream -----------------------------------------------------------------------------------------------
def test_ranks_split_the_single_process_batches():
    one = list(StreamSampler(10, 4, seed=5, start=0, stop=7))
    r0 = list(StreamSampler(10, 4, seed=5, start=0, stop=7, rank=0, world=2))
    r1 = list(StreamSampler(10, 4, seed=5, start=0, stop=7, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    # every epoch is a permutation of the data
    idx = [i for batch in one for i, _ in batch]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    # resuming at iteration 3 continues the same stream
    assert list(StreamSampler(10, 4, seed=5, start=3, stop=7)) == one[3:]


# ---- determinism and resume ------------------------------------------------------------------------------------
def test_same_seed_same_numbers_and_exact_resume(tiny_root, tmp_path):
    cfg = tiny_cfg(tiny_root, ckpt_every=2)
    full = train(cfg, tmp_path / "a", progress=False)
    again = train(cfg, tmp_path / "b", progress=False)
    assert_same_weights(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt"))
    assert full["history"]["train"] == again["history"]["train"]

    class Killed(Exception):
        pass

    def kill_at_5(it, terms):
        if it == 5:  # after the checkpoint of iteration 4; iteration 5's work is lost like in a crash
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "c", progress=False, callback=kill_at_5)
    assert torch.load(tmp_path / "c" / "model.pt", weights_only=True)["iteration"] == 4
    resumed = train(cfg, tmp_path / "c", progress=False)
    assert_same_weights(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "c" / "model.pt"))
    assert resumed["history"]["train"] == full["history"]["train"]
    # another seed gives other numbers (the test can fail)
    other = train(cfg.replace(seed=4), tmp_path / "d", progress=False)
    assert other["history"]["train"] != full["history"]["train"]


def test_adam_resumes_exactly_and_keeps_the_lr_groups(tiny_root, tmp_path):
    from nclib.train.loop import make_optimizer

    cfg = tiny_cfg(tiny_root, ckpt_every=2, optimizer="adam", lr=1e-3)
    model = torch.nn.Conv2d(3, 2, 1)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and sorted(g["lr_mult"] for g in opt.param_groups) == [1.0, 2.0]
    full = train(cfg, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_3(it, terms):
        if it == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "b", progress=False, callback=kill_at_3)
    resumed = train(cfg, tmp_path / "b", progress=False)  # the Adam moments come back from the checkpoint
    assert_same_weights(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt"))
    assert resumed["history"]["train"] == full["history"]["train"]
    sgd = train(cfg.replace(optimizer="sgd"), tmp_path / "c", progress=False)
    assert sgd["history"]["train"][-1] != full["history"]["train"][-1]


def test_nan_loss_stops_with_iteration_and_terms(tiny_root, tmp_path, monkeypatch):
    import nclib.losses as L

    real = L.normalized_cut_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        v = real(*a, **k)
        return v * float("nan") if calls["n"] == 3 else v

    monkeypatch.setattr(L, "normalized_cut_loss", flaky)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2.*'nc': nan"):
        train(tiny_cfg(tiny_root), tmp_path / "nan", progress=False)


def test_checkpoint_of_another_model_or_class_count(tiny_root, tmp_path):
    train(tiny_cfg(tiny_root, iterations=1), tmp_path / "s1", progress=False)
    ck = tmp_path / "s1" / "model.pt"
    with pytest.raises(ValueError, match="holds model 'small' with 2 classes.*'largefov'"):
        train(tiny_cfg(tiny_root, model="largefov", model_args={}, init_checkpoint=str(ck)), tmp_path / "x",
              progress=False)
    fake = torch.load(ck, weights_only=True)
    fake["num_classes"] = 21
    torch.save(fake, tmp_path / "fake.pt")
    with pytest.raises(ValueError, match="21 classes"):
        train(tiny_cfg(tiny_root, init_checkpoint=str(tmp_path / "fake.pt")), tmp_path / "y", progress=False)
    # resuming a folder written by another config is refused too
    with pytest.raises(ValueError, match="another config"):
        train(tiny_cfg(tiny_root, iterations=1, lr=0.5), tmp_path / "s1", progress=False)


def test_two_stage_starts_from_stage_one(tiny_root, tmp_path):
    s1 = tiny_cfg(tiny_root, nc_weight=0.0, iterations=2)
    train(s1, tmp_path / "s1", progress=False)
    seen = {}
    s2 = tiny_cfg(tiny_root, init_checkpoint=str(tmp_path / "s1" / "model.pt"), lr=1e-12, iterations=1)
    train(s2, tmp_path / "s2", progress=False, callback=lambda it, terms: seen.update(terms))
    a, b = weights(tmp_path / "s1" / "model.pt"), weights(tmp_path / "s2" / "model.pt")
    for k in a:  # a step of lr 1e-12 leaves stage 1's weights (up to rounding)
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-9)
    assert "nc" in seen and "ce" in seen


# ---- results cache and CLI ---------------------------------------------------------------------------------------
def test_run_caches_metrics(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NCLIB_RESULTS", str(tmp_path / "results"))
    cfg = tiny_cfg(tiny_root, iterations=2, val_every=1, val_nc=True)
    res = run(cfg, progress=False)
    folder = tmp_path / "results" / f"tiny-{config_hash(cfg)}"
    assert json.loads((folder / "metrics.json").read_text()) == res
    assert 0 <= res["val"]["miou"] <= 1 and res["checkpoint"] == f"{folder.name}/model.pt"
    assert [v["iteration"] for v in res["history"]["val"]] == [1, 2] and "nc" in res["history"]["val"][0]
    assert (folder / "metrics.json").stat().st_size < 20_000
    # provenance: this checkout's commit, the versions, the device and when
    import nclib

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(nclib.__file__).parents[1],
                          capture_output=True, text=True).stdout.strip()
    assert res["commit"].split("-")[0] == (head or "unknown")
    assert res["nclib"] == nclib.__version__ and res["torch"] == torch.__version__
    assert res["device"].startswith("cpu") and res["finished"].endswith("UTC") and res["eval_seconds"] >= 0

    def boom(*a, **k):
        raise AssertionError("must not retrain")

    monkeypatch.setattr(R, "train", boom)
    assert run(cfg, progress=False) == res
    with pytest.raises(AssertionError, match="retrain"):
        run(cfg, force=True, progress=False)


def test_cli_train_and_evaluate(tiny_root, tmp_path, capsys):
    from nclib.__main__ import main

    y = tmp_path / "c.yaml"
    y.write_text(json.dumps(tiny_cfg(tiny_root, iterations=2).to_dict()))  # JSON is YAML
    assert main(["train", "--config", str(y), "--out", str(tmp_path / "o"), "--quiet", "--set", "seed=7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["val"]["miou"] <= 1
    assert main(["evaluate", "--checkpoint", str(tmp_path / "o" / "model.pt"), "--flip", "--scales", "0.75", "1"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["images"] == 3
    assert main(["train", "--config", str(y), "--set", "lamda=2"]) == 2
    assert "lamda" in capsys.readouterr().err


def test_cli_out_and_run_store_the_same_scores(tiny_root, tmp_path, monkeypatch, capsys):
    """One train-then-score path: `train --out` and run() give the same metrics.json (val: single scale)."""
    from nclib.__main__ import main

    monkeypatch.setenv("NCLIB_RESULTS", str(tmp_path / "results"))
    cfg = tiny_cfg(tiny_root, iterations=2, eval_scales=[0.75, 1.0], eval_flip=True, eval_kmeans=True)
    cached = run(cfg, progress=False)
    y = tmp_path / "c.yaml"
    y.write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(y), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert printed == {k: v for k, v in stored.items() if k != "history"}
    for res in (cached, stored):
        assert {"val", "val_msc", "config", "hash"} <= set(res) and "kmeans_energy" in res["val"]
    assert stored["val"] == cached["val"] and stored["val_msc"] == cached["val_msc"]
    assert stored["history"] == cached["history"] and stored["hash"] == cached["hash"]
    assert stored["checkpoint"] == str(tmp_path / "o" / "model.pt")
    assert cached["checkpoint"] == f"tiny-{config_hash(cfg)}/model.pt"
    # single scale and multi-scale + flip testing are different numbers: val is not the multi-scale result
    assert stored["val"]["iou"] != stored["val_msc"]["iou"]


def test_nc_present_only_leaves_absent_labels_alone():
    from nclib.losses import normalized_cut_loss

    torch.manual_seed(0)
    cfg = Config(nc_weight=1.0, nc_present_only=True, sigma_xy=10.0, nc_scale=1.0)
    logits = torch.randn(2, 5, 20, 20, requires_grad=True)
    img = torch.from_numpy(photo("coffee")[100:140:2, 200:240:2].copy()).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    scr = torch.full((2, 20, 20), 255)
    scr[0, 2, :6], scr[0, 15, :6] = 1, 3  # image 0: labels 1 and 3; image 1: label 2 only (trivial partition)
    scr[1, 2, :6] = 2
    roi = torch.ones(2, 20, 20, dtype=torch.bool)
    v = nc_term(logits, torch.softmax(logits, 1), img, scr, roi, cfg)
    v.backward()
    g = logits.grad.abs().sum(dim=(2, 3))
    assert (g[0, [0, 2, 4]] == 0).all() and (g[0, [1, 3]] > 0).all() and (g[1] == 0).all()
    # image 0's value is the paper's NC of the softmax over its two labels, scribbles relabelled 1 -> 0, 3 -> 1
    sub = torch.where(scr[0] == 1, 0, torch.where(scr[0] == 3, 1, 255))[None]
    ref = normalized_cut_loss(torch.softmax(logits[:1, [1, 3]], 1), img[:1], sub, sigma_xy=10.0)
    assert float(v.detach()) == pytest.approx(float(ref.detach()) / 2, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_gpu_keeps_losses_float32(tiny_root, tmp_path):
    seen = {}
    res = train(tiny_cfg(tiny_root, device="cuda", amp=True, iterations=2), tmp_path / "amp", progress=False,
                callback=lambda it, terms: seen.update(terms))
    assert set(seen) >= {"ce", "nc", "total"} and all(np.isfinite(v) for v in seen.values())
    assert res["iterations"] == 2


def test_amp_needs_cuda():
    with pytest.raises(ValueError, match="amp needs a CUDA device"):
        Config.from_dict({"amp": True, "device": "cpu"})


# ---- supervision from proposal masks (Table 2) ------------------------------------------------------------------
def _proposal_set(root, name, fill=None):
    """``root/name``: the training masks copied (fill None) or constant ``fill`` masks, as proposals."""
    (root / name).mkdir(exist_ok=True)
    for iid in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        gt = np.asarray(Image.open(root / "SegmentationClassAug" / f"{iid}.png"))
        Image.fromarray(gt if fill is None else np.full_like(gt, fill)).save(root / name / f"{iid}.png")
    return name


def _val_fraction_of_class_1(model, root):
    fr = []
    for iid in (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        img = np.asarray(Image.open(root / "JPEGImages" / f"{iid}.jpg").convert("RGB"))
        with torch.no_grad():
            pred = model(torch.from_numpy(img.transpose(2, 0, 1).copy()).float()[None]).argmax(1)
        fr.append(float((pred == 1).float().mean()))
    return float(np.mean(fr))


def test_proposal_supervision_trains_on_the_proposal_masks(tiny_root, tmp_path):
    from nclib.train import load_model

    base = dict(nc_weight=0.0, iterations=2, lr=0.05)
    full = train(tiny_cfg(tiny_root, supervision="full", **base), tmp_path / "full", progress=False)
    # a proposal equal to the ground truth: exactly the fully supervised run
    same = tiny_cfg(tiny_root, supervision="proposal", proposal_dir=_proposal_set(tiny_root, "Proposals_gt"), **base)
    assert config_hash(same) != config_hash(same.replace(proposal_dir="Proposals_other"))
    train(same, tmp_path / "same", progress=False)
    assert_same_weights(weights(tmp_path / "full" / "model.pt"), weights(tmp_path / "same" / "model.pt"))
    # a proposal of class 1 everywhere (the ground truth is ~half background): the prediction goes to class 1
    ones = tiny_cfg(tiny_root, supervision="proposal", proposal_dir=_proposal_set(tiny_root, "Proposals_ones", 1), **base)
    res = train(ones, tmp_path / "ones", progress=False)
    assert res["history"]["train"] != full["history"]["train"]
    frac_ones = _val_fraction_of_class_1(load_model(tmp_path / "ones" / "model.pt")[0], tiny_root)
    frac_full = _val_fraction_of_class_1(load_model(tmp_path / "full" / "model.pt")[0], tiny_root)
    assert frac_ones == 1.0 and frac_full < 0.9


def test_proposal_config_and_missing_folder_are_named(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="supervision 'proposal' and proposal_dir go together"):
        Config.from_dict({"supervision": "proposal"})
    with pytest.raises(ValueError, match="supervision 'proposal' and proposal_dir go together"):
        Config.from_dict({"proposal_dir": "Proposals_nc"})
    for bad in ("../Proposals_nc", "a/b", "", 3):
        with pytest.raises(ValueError, match="proposal_dir must be a plain folder name"):
            Config.from_dict({"supervision": "proposal", "proposal_dir": bad})
    with pytest.raises(ValueError, match="supervision 'proposal' needs dataset 'scribble'"):
        Config.from_dict({"supervision": "proposal", "proposal_dir": "P", "dataset": "folder"})
    cfg = tiny_cfg(tiny_root, supervision="proposal", proposal_dir="Proposals_mine", nc_weight=0.0)
    with pytest.raises(ValueError, match=r"proposal folder not found: .*Proposals_mine\. Make it with "
                                         r"`python -m nclib.data proposals --method <grabcut\|nc\|kernelcut> --root "):
        train(cfg, tmp_path / "out", progress=False)


def test_missing_standard_proposal_folder_is_made(tiny_root, tmp_path):
    """As a missing stage 1 is retrained, a missing Proposals_<method>[_ignore] is computed from the scribbles
    (`make figures FORCE=1` on a clean clone), the same masks as the command writes."""
    from nclib.data import write_proposal_masks

    folder = tiny_root / "Proposals_nc_ignore"
    shutil.rmtree(folder, ignore_errors=True)
    cfg = tiny_cfg(tiny_root, supervision="proposal", proposal_dir="Proposals_nc_ignore", nc_weight=0.0, iterations=2)
    train(cfg, tmp_path / "out", progress=False)
    made = sorted(folder.glob("*.png"))
    assert made
    ref = write_proposal_masks(tiny_root, "nc", out=tmp_path / "ref", unsure_ignore=True, progress=False)
    for f in made:
        assert np.array_equal(np.array(Image.open(f)), np.array(Image.open(ref / f.name)))
    shutil.rmtree(folder)


def test_densecrf_weight_adds_the_densecrf_loss_term():
    from nclib import losses as L
    from nclib.train import Config
    from nclib.train.loop import loss_terms

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    images = torch.rand(2, 3, 16, 16) * 255
    scrib = torch.full((2, 16, 16), 255, dtype=torch.long)
    scrib[:, 4, 4:8] = 1
    roi = torch.ones(2, 16, 16, dtype=torch.bool)
    cfg = Config(densecrf_weight=0.25, sigma_rgb=15.0, sigma_xy=5.0, nc_scale=0.5)
    terms = loss_terms(logits, images, scrib, scrib, roi, cfg)
    want = 0.25 * L.densecrf_loss(torch.softmax(logits, 1), images, 15.0, 5.0, scale=0.5, roi=roi)
    assert torch.allclose(terms["densecrf"], want, rtol=1e-6)
    assert torch.allclose(terms["total"], terms["ce"] + terms["densecrf"])
    assert "densecrf" not in loss_terms(logits, images, scrib, scrib, roi, Config())
    with pytest.raises(ValueError, match="densecrf_weight"):
        Config(densecrf_weight=-1.0).validate()


def test_folder_dataset_trains_with_nel_and_present_only_nc(tmp_path):
    """dataset 'folder' with supervision 'scribble' synthesizes scribbles, so NEL and NC over the scribbled labels
    apply there (the Weizmann horses, notebook 04); full masks give no scribbles and are refused."""
    from nclib.data import MaskFolderDataset

    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    img_all = photo("astronaut")
    for k in range(6):
        img = img_all[40 + 30 * k:100 + 30 * k, 60:140]
        Image.fromarray(img).save(root / "images" / f"p{k}.png")
        Image.fromarray(255 * (img.mean(-1) > img.mean()).astype(np.uint8)).save(root / "masks" / f"p{k}.png")
    cfg = tiny_cfg(root, dataset="folder", supervision="scribble", nc_weight=0.5, nc_present_only=True,
                   nel_weight=1.0, iterations=2)
    ds = MaskFolderDataset(root, "train", scribbles="synthesize")
    s = np.asarray(ds[0]["scribble"])
    assert ((s == 0) | (s == 1)).any() and (s == 255).any()  # synthesized strokes: what NEL / present-only read
    seen = []
    train(cfg, tmp_path / "run", progress=False, callback=lambda it, terms: seen.append(dict(terms)))
    assert len(seen) == 2
    for terms in seen:
        assert {"ce", "nc", "nel"} <= set(terms) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    with pytest.raises(ValueError, match="nel_weight > 0 needs scribbles"):
        tiny_cfg(root, dataset="folder", supervision="full", nel_weight=1.0)
    with pytest.raises(ValueError, match="nc_present_only needs scribbles"):
        tiny_cfg(root, dataset="folder", supervision="full", nc_present_only=True)
