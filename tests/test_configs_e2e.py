"""The paper path end to end on CPU: every ``configs/*.yaml`` trains 2 iterations and is scored as it asks.

Each config runs through :func:`nclib.train.run` (the notebooks' path) on a tiny fixture in the layout its
``dataset`` reads (VOC + ScribbleSup, or MSRA10K), with the model it names and, where it asks for ImageNet weights,
a synthetic torchvision-format state dict (right keys and shapes, He-scaled random values; nothing is downloaded).
Only what a tiny CPU run needs is overridden: data root, 2 iterations, a 41 px crop, batch 2, CPU, one thread, and
for a stage-2 config the ``init_checkpoint`` of the stage-1 config it names (trained first, in the same results
root); a config trained on proposals gets its mask folder made by ``python -m nclib.data proposals``. A new config
file is a new test case.
"""
from __future__ import annotations

import json
import math
import shutil
from glob import glob
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from nclib.evaluate import evaluate
from nclib.models import DeepLabLargeFOV, DeepLabMSc, DeepLabResNet101, DeepLabVGG16ASPP, SmallDeepLab
from nclib.train import Config, build_datasets, load_checkpoint, load_model, run, run_dir

from _torchvision import he_synthetic, torchvision_spec

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob(str(REPO / "configs" / "*.yaml")))
CROP, BATCH, ITERS = 41, 2, 2
H, W = 48, 64
TRAIN_IDS = [f"img{i}" for i in range(4)]
VAL_IDS = [f"img{i}" for i in range(4, 6)]

#: model name -> (class, class of the network inside) as the config names it
MODEL_CLASS = {"small": (SmallDeepLab, SmallDeepLab), "largefov": (DeepLabLargeFOV, DeepLabLargeFOV),
               "msc_largefov": (DeepLabMSc, DeepLabLargeFOV), "vgg16_aspp": (DeepLabVGG16ASPP, DeepLabVGG16ASPP),
               "resnet101_aspp": (DeepLabResNet101, DeepLabResNet101)}
#: the first convolution in torchvision's key names, and in the model's
FIRST_CONV = {"vgg16": "features.0.weight", "resnet101": "conv1.weight"}


def test_config_sets_are_complete():
    """The notebooks take a config prefix and read a whole set (03: Tables 1-3; 02: Sec 5.1)."""
    names = {Path(p).stem for p in CONFIGS}
    for prefix in ("default", "voc_msc_largefov", "voc_resnet101", "voc_vgg16", "horses"):
        assert {f"{prefix}_{s}" for s in ("full", "pce", "pce_more", "nc")} <= names, prefix
    for prefix in ("default_salient", "msra10k"):
        assert {f"{prefix}_{s}" for s in ("saliency", "kmeans", "nc")} <= names, prefix
    # Table 2: a network trained on each kind of proposal, with and without the unsure region ignored
    assert {f"default_proposal_{m}{v}" for m in ("grabcut", "nc", "kernelcut") for v in ("", "_ignore")} <= names


# ------------------------------------------------------------------------------------------------ fixture data
def _scene(rng: np.random.Generator, label: int):
    """(H, W, 3) uint8 photo-like image (smooth background + two coloured blobs), its mask with void borders."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([60 + 80 * xx / W, 90 + 60 * yy / H, np.full((H, W), 120.0)], -1)
    mask = np.zeros((H, W), np.uint8)
    for k, (cy, cx, ry, rx) in enumerate(((16, 18, 10, 12), (32, 46, 11, 13))):
        cy, cx = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ring = (((yy - cy) / (ry + 1.5)) ** 2 + ((xx - cx) / (rx + 1.5)) ** 2 <= 1) & ~inside
        img[inside] = rng.integers(20, 236, 3)
        mask[ring & (mask == 0)] = 255  # VOC's void band around objects
        mask[inside] = label if k == 0 else 1 + (label + 6) % 20
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _scribbles(mask: np.ndarray) -> np.ndarray:
    """3 px strokes through each object's middle row and along the top rows (background); 255 elsewhere."""
    s = np.full(mask.shape, 255, np.uint8)
    s[1:4, 4:W - 4] = 0
    for c in np.unique(mask[(mask != 0) & (mask != 255)]):
        yc = int(np.median(np.nonzero(mask == c)[0]))
        row = (mask[yc - 1:yc + 2] == c)
        s[yc - 1:yc + 2][row] = c
    return s


def _write_voc(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for k, iid in enumerate(TRAIN_IDS + VAL_IDS):
        img, mask = _scene(rng, label=1 + (5 * k) % 20)
        Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=95)
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{iid}.png")
        Image.fromarray(_scribbles(mask)).save(root / "pascal_2012_scribble" / f"{iid}.png")
    seg = root / "ImageSets" / "Segmentation"
    for split, ids in (("train", TRAIN_IDS), ("train_aug", TRAIN_IDS), ("val", VAL_IDS)):
        (seg / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _write_msra(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "Imgs").mkdir(parents=True)
    (root / "ImageSets").mkdir()
    for iid in TRAIN_IDS + VAL_IDS:
        img, mask = _scene(rng, label=1)
        Image.fromarray(img).save(root / "Imgs" / f"{iid}.jpg", quality=95)
        Image.fromarray(np.where(mask == 0, 0, 255).astype(np.uint8)).save(root / "Imgs" / f"{iid}.png")
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        (root / "ImageSets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------- fixtures
class _World:
    """Fixture data, weights and a results root shared by the cases (stage-1 runs are trained once)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.roots = {"scribble": _write_voc(base / "voc"), "folder": _write_msra(base / "msra10k")}
        self.results = base / "results"
        self._weights: Dict[str, Path] = {}

    def weights(self, backbone: str) -> Path:
        if backbone not in self._weights:
            path = self.base / f"{backbone}_torchvision_like.pth"
            torch.save(he_synthetic(torchvision_spec(backbone)), path)
            self._weights[backbone] = path
        return self._weights[backbone]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("configs_e2e")
    yield _World(base)
    shutil.rmtree(base, ignore_errors=True)  # checkpoints and weights: ~2 GB


@pytest.fixture
def results_env(world, monkeypatch):
    monkeypatch.setenv("NCLIB_RESULTS", str(world.results))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set 1 thread globally


def _backbone(model: str) -> str:
    return MODEL_CLASS[model][1].imagenet_backbone


def _config_named(name: str) -> Config:
    for path in CONFIGS:
        cfg = Config.from_yaml(path)
        if cfg.name == name:
            return cfg
    raise AssertionError(f"no configs/*.yaml is named {name!r}")


def _stage1_name(cfg: Config) -> Optional[str]:
    """The config name of the run whose checkpoint ``init_checkpoint`` points at (``runs/<name>/model.pt``)."""
    return Path(cfg.init_checkpoint).parent.name if cfg.init_checkpoint else None


def tiny(cfg: Config, world: _World) -> Config:
    """``cfg`` with what a tiny CPU run must change; stage 1 (if any) trained first, its checkpoint used."""
    kw = dict(root=str(world.roots[cfg.dataset]), iterations=ITERS, crop=CROP, batch_size=BATCH, device="cpu",
              amp=False, threads=1, num_workers=0)
    if cfg.pretrained:
        kw["pretrained"] = str(world.weights(_backbone(cfg.model)))
    if cfg.supervision == "proposal":
        _make_proposals(world.roots["scribble"], cfg.proposal_dir)
    if cfg.init_checkpoint:
        stage1 = run(tiny(_config_named(_stage1_name(cfg)), world), progress=False)
        kw["init_checkpoint"] = stage1["checkpoint"]  # relative to the results root, as the notebooks pass it
    return cfg.replace(**kw)


def _make_proposals(root: Path, folder: str) -> None:
    """``root/folder`` (``Proposals_<method>[_ignore]``) made by the command, as a user would (once per folder)."""
    from nclib.data.__main__ import main as data_main

    if not (root / folder).is_dir():
        method = folder.split("_")[1]
        extra = ["--unsure-ignore"] if folder.endswith("_ignore") else []
        assert data_main(["proposals", "--method", method, "--root", str(root), "--out", str(root / folder),
                          "--no-progress"] + extra) == 0
    assert len(list((root / folder).glob("*.png"))) == len(TRAIN_IDS)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm())


# ------------------------------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("path", CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_config_trains_and_scores_end_to_end(path, world, results_env):
    orig = Config.from_yaml(path)
    cfg = tiny(orig, world)
    res = run(cfg, progress=False)
    out = run_dir(cfg)

    # metrics.json: written, the returned content, with the scores the config asks for
    assert json.loads((out / "metrics.json").read_text()) == res
    assert res["config"] == cfg.to_dict() and res["checkpoint"] == f"{out.name}/model.pt"
    num_classes = 21 if cfg.dataset == "scribble" else 2
    want_msc = tuple(cfg.eval_scales) != (1.0,) or cfg.eval_flip
    assert ("val_msc" in res) == want_msc
    for key in ("val", "val_msc") if want_msc else ("val",):
        v = res[key]
        assert v["images"] == len(VAL_IDS) and len(v["iou"]) == num_classes
        assert 0 <= v["miou"] <= 1 and 0 <= v["pixel_acc"] <= 1
        assert ("miou_crf" in v) == cfg.eval_crf
        if cfg.eval_crf:
            assert 0 <= v["miou_crf"] <= 1 and 0 <= v["pixel_acc_crf"] <= 1
    v = res["val"]
    assert ("nc_energy" in v) == cfg.eval_nc and ("kmeans_energy" in v) == cfg.eval_kmeans
    if cfg.eval_nc:  # relaxed NC of K soft segments lies in [0, K]
        assert 0 <= v["nc_energy"] <= num_classes and 0 <= v["nc_energy_gt"] <= num_classes
    if cfg.eval_kmeans:
        assert _finite(v["kmeans_energy"]) and v["kmeans_energy"] >= 0

    # history: the loss terms the config enables, finite, summing to the total; periodic validation if asked
    terms = {k for k, w in (("ce", cfg.ce_weight), ("nc", cfg.nc_weight), ("nel", cfg.nel_weight),
                            ("kmeans", cfg.kmeans_weight)) if w > 0}
    train_hist = res["history"]["train"]
    assert train_hist and train_hist[-1]["iteration"] == ITERS
    for e in train_hist:
        assert set(e) == terms | {"total", "iteration"}, e
        assert all(_finite(e[k]) for k in terms | {"total"})
        assert e["total"] == pytest.approx(sum(e[k] for k in terms), rel=1e-6, abs=3e-5)
    if cfg.val_every:
        last = res["history"]["val"][-1]
        assert last["iteration"] == ITERS and 0 <= last["miou"] <= 1 and ("nc" in last) == cfg.val_nc
    else:
        assert res["history"]["val"] == []

    # the checkpoint loads back into the named architecture and gives the scores in metrics.json
    model, cfg_back = load_model(out / "model.pt")
    assert cfg_back == cfg
    cls, inner = MODEL_CLASS[cfg.model]
    assert type(model) is cls and type(model.base if cls is DeepLabMSc else model) is inner
    ck = load_checkpoint(out / "model.pt")
    assert ck["iteration"] == ITERS and ck["num_classes"] == num_classes
    sd = model.state_dict()
    assert sd.keys() == ck["model"].keys() and all(torch.equal(sd[k], ck["model"][k]) for k in sd)
    _, val_set, _ = build_datasets(cfg)
    again = evaluate(model, val_set, num_classes)
    assert again["miou"] == v["miou"] and again["pixel_acc"] == v["pixel_acc"]
    assert model(torch.rand(1, 3, 33, 45) * 255).shape == (1, num_classes, 33, 45)

    # where the weights came from: the synthetic ImageNet file, or the stage-1 run. 2 SGD steps at these rates move
    # the first convolution by < 1e-4 of its norm; another init (or none) would be ~1.4 away.
    prefix = "base." if cls is DeepLabMSc else ""
    if orig.pretrained:
        key = FIRST_CONV[_backbone(cfg.model)]
        start = torch.load(cfg.pretrained, map_location="cpu", weights_only=True, mmap=True)
        assert _rel_change(sd[prefix + key], start[key]) < 1e-3
        if cfg.model == "resnet101_aspp":  # frozen BN keeps ImageNet's affine and statistics exactly
            for k in ("layer4.2.bn3.weight", "layer4.2.bn3.running_var", "bn1.running_mean"):
                assert torch.equal(sd[k], start[k]), k
    if orig.init_checkpoint:
        stage1 = load_checkpoint(world.results / cfg.init_checkpoint)
        assert stage1["config"]["name"] == _stage1_name(orig)
        first = next(k for k, t in sd.items() if t.dim() == 4)
        assert _rel_change(sd[first], stage1["model"][first]) < 1e-3
