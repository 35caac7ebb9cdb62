"""Config: every field checked for type and range at load (errors name the key), scientific notation, legacy key
names, and the hashes that name the committed results folders (a changed hash would retrain the notebooks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nclib.train import Config, config_hash
from nclib.train.config import _BOOKKEEPING

REPO = Path(__file__).resolve().parents[1]

# config_hash of each configs/*.yaml as computed by the engine before the package split and the nc_scale rename
# (commit 4f15348). Folders results/<name>-<hash>/ are found by these; a change retrains the notebooks.
YAML_HASHES = {
    "default_full": "31010345", "default_nc": "52cdb9cf", "default_pce": "a4ee3beb", "default_pce_more": "b7cee481",
    "default_salient_kmeans": "40b4e69b", "default_salient_nc": "c03ff7cc", "default_salient_saliency": "39dae697",
    "voc_msc_largefov_full": "5e0ac49f", "voc_msc_largefov_nc": "4c70d379", "voc_msc_largefov_pce": "3595b100",
    "voc_msc_largefov_pce_more": "e9913802", "voc_resnet101_nc": "69200342", "voc_resnet101_pce": "f8cc4856",
    # added with the complete Table 3 / Sec 5.1 sets (2026-11-30)
    "voc_resnet101_full": "83da8ef6", "voc_resnet101_pce_more": "23c01e18", "voc_vgg16_full": "7ff2862c",
    "voc_vgg16_nc": "2480500b", "voc_vgg16_pce": "fbcc6b1c", "voc_vgg16_pce_more": "aa333733",
    "msra10k_kmeans": "8cfd5dbb", "msra10k_nc": "a60a2e33", "msra10k_saliency": "b6c9f41e",
    # Table 2: networks trained on proposal masks; the regime and the horses: re-set (regime v2, 2026-11-30: a larger
    # pre-training set with AdamW, fine-tuning at base rate 0.001)
    "default_proposal_grabcut": "56deafd0", "default_proposal_grabcut_ignore": "739c739d",
    "default_proposal_nc": "30b2b345", "default_proposal_nc_ignore": "b7a7593a",
    "default_proposal_kernelcut": "3ac579e3", "default_proposal_kernelcut_ignore": "4817b1e3",
    "regime_full": "24079b96", "regime_nc": "9e6c6ced", "regime_pce": "ef5bab6e", "regime_pce_more": "08f2d35f",
    "regime_pretrain": "8ee18c9b",
    # the Weizmann horses (notebook 04)
    "horses_full": "aa093875", "horses_pce": "bda57754", "horses_pce_more": "b659d89f", "horses_nc": "9fdfeb45",
}


# ---- hashes of existing runs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (REPO / "results").glob("*/metrics.json")))
def test_committed_results_keep_their_hash(folder):
    stored = json.loads((REPO / "results" / folder / "metrics.json").read_text())
    cfg = Config.from_dict(stored["config"])  # written before the rename: holds loss_scale
    assert folder == f"{stored['name']}-{config_hash(cfg)}" and stored["hash"] == config_hash(cfg)


def test_yaml_configs_keep_their_hash():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert names == sorted(YAML_HASHES)
    for name in names:
        cfg = Config.from_yaml(REPO / "configs" / f"{name}.yaml")
        assert config_hash(cfg) == YAML_HASHES[name], name
        folder = REPO / "results" / f"{cfg.name}-{YAML_HASHES[name]}"
        if folder.is_dir():  # the stored run is this very config
            stored = Config.from_dict(json.loads((folder / "metrics.json").read_text())["config"])
            # bookkeeping (threads, checkpoint interval, ...) may differ: it cannot change the numbers
            drop = lambda d: {k: v for k, v in d.items() if k not in _BOOKKEEPING}  # noqa: E731
            assert drop(stored.to_dict()) == drop(cfg.to_dict()), name


def test_legacy_key_is_an_alias_with_the_same_hash():
    old, new = Config.from_dict({"loss_scale": 0.5}), Config.from_dict({"nc_scale": 0.5})
    assert old == new and old.nc_scale == 0.5 and "loss_scale" not in new.to_dict()
    assert config_hash(old) == config_hash(new) != config_hash(Config())
    assert Config().replace(loss_scale=0.5) == new  # old notebooks' .replace(loss_scale=...) keeps working
    with pytest.raises(ValueError, match="'loss_scale' is the old name of 'nc_scale'"):
        Config.from_dict({"loss_scale": 0.5, "nc_scale": 0.5})


# ---- scientific notation ------------------------------------------------------------------------------------------
def test_scientific_notation_is_a_float(tmp_path):
    assert yaml.safe_load("5e-4") == "5e-4"  # the premise: YAML 1.1 needs a dot, PyYAML returns a string
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-2\nweight_decay: 5e-4\nsigma_xy: 3E+1\nscale_range: [5e-1, 2]\n")
    cfg = Config.from_yaml(y)
    assert (cfg.lr, cfg.weight_decay, cfg.sigma_xy, cfg.scale_range) == (0.01, 0.0005, 30.0, (0.5, 2.0))
    assert config_hash(cfg) == config_hash(Config.from_dict({"lr": 0.01, "sigma_xy": 30.0, "scale_range": [0.5, 2]}))
    # what `--set lr=1e-2` hands over
    assert Config.from_dict({"lr": yaml.safe_load("1e-2")}).lr == 0.01
    with pytest.raises(ValueError, match="lr must be a finite number"):
        Config.from_dict({"lr": "1e-2x"})
    with pytest.raises(ValueError, match="lr must be a finite number"):
        Config.from_dict({"lr": "nan"})


def test_cli_set_accepts_scientific_notation(tmp_path, capsys):
    from nclib.__main__ import main

    # lr=1e-2 must pass, so the first bad key reported is momentum (before: "lr must be a finite number ... '1e-2'")
    assert main(["train", "--set", "lr=1e-2", "--set", "momentum=5"]) == 2
    err = capsys.readouterr().err
    assert "momentum" in err and "lr" not in err


# ---- one error per bad field, naming it -------------------------------------------------------------------------
BAD = [
    ({"log_every": 0}, "log_every"), ({"momentum": 5}, "momentum"), ({"momentum": 1}, "momentum"),
    ({"poly_power": -1}, "poly_power"), ({"lr_classifier_mult": -10}, "lr_classifier_mult"),
    ({"lr_classifier_mult": 0}, "lr_classifier_mult"), ({"ckpt_every": -1}, "ckpt_every"),
    ({"iterations": True}, "iterations"), ({"batch_size": 2.0}, "batch_size"), ({"crop": "96"}, "crop"),
    ({"lr": True}, "lr"), ({"nc_weight": False}, "nc_weight"), ({"flip": 1}, "flip"), ({"amp": "yes"}, "amp"),
    ({"eval_crf": 0}, "eval_crf"), ({"nc_present_only": 1}, "nc_present_only"), ({"cache_data": None}, "cache_data"),
    ({"scale_range": [1]}, "scale_range"), ({"scale_range": [2, 1]}, "scale_range"),
    ({"scale_range": [0, 1]}, "scale_range"), ({"scale_range": 1.0}, "scale_range"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "0"}, "seed"), ({"seed": 2**40}, "seed"),
    ({"eval_scales": []}, "eval_scales"), ({"eval_scales": [1, -0.5]}, "eval_scales"),
    ({"crf_args": {"foo": 1}}, r"crf_args has unknown keys \['foo'\]"), ({"crf_args": [1]}, "crf_args"),
    ({"crf_args": {"bi_w": "4"}}, r"crf_args\['bi_w'\]"), ({"crf_args": {"normalization": 1}}, "normalization"),
    ({"name": "../escape"}, "name"), ({"name": "a/b"}, "name"), ({"name": ""}, "name"), ({"name": ".."}, "name"),
    ({"name": 3}, "name"), ({"device": "gpu"}, "device"), ({"device": 0}, "device"),
    ({"num_workers": -1}, "num_workers"), ({"threads": -2}, "threads"), ({"val_every": -1}, "val_every"),
    ({"val_max_images": -1}, "val_max_images"), ({"model_args": [1]}, "model_args"), ({"pretrained": 1}, "pretrained"),
    ({"root": 5}, "root"), ({"init_checkpoint": ""}, "init_checkpoint"), ({"train_split": None}, "train_split"),
    ({"nc_scale": 0}, "nc_scale"), ({"nc_scale": 1.5}, "nc_scale"), ({"sigma_rgb": float("inf")}, "sigma_rgb"),
    ({"weight_decay": -1e-4}, "weight_decay"), ({"dataset": "coco"}, "dataset"),
]


@pytest.mark.parametrize("kw, msg", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}" for k, _ in BAD])
def test_bad_field_is_named_at_load(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Config.from_dict(kw)
    with pytest.raises(ValueError, match=msg):  # replace() validates too
        Config().replace(**kw)


def test_good_values_at_the_edges_pass():
    cfg = Config.from_dict({"momentum": 0, "poly_power": 0, "seed": 2**32 - 1, "name": "default-nc-lam0.4",
                            "device": "cuda:1", "pretrained": "imagenet", "eval_scales": [0.5, 0.75, 1],
                            "crf_args": {"bi_w": 4.0, "iterations": 5, "normalization": "symmetric"}, "scale_range": [1, 1], "nc_scale": 1})
    assert cfg.eval_scales == (0.5, 0.75, 1.0) and cfg.nc_scale == 1.0
    assert Config.from_dict({"root": Path("/data/voc")}).root == "/data/voc"
    Config(scale_range=[0.5, 1.5], eval_scales=[1.0]).validate()  # built directly, lists are fine too


def test_yaml_with_a_bad_field_names_it(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("iterations: true\n")
    with pytest.raises(ValueError, match="iterations must be an int"):
        Config.from_yaml(y)


def test_results_root_is_the_repository_folder(monkeypatch):
    from nclib.train import results_root

    monkeypatch.delenv("NCLIB_RESULTS", raising=False)
    assert results_root() == REPO / "results"  # where the committed runs are; elsewhere the notebooks retrain


def test_parse_errors_name_the_file(tmp_path, monkeypatch):
    from nclib.train import run, run_dir

    y = tmp_path / "bad.yaml"
    y.write_text("lr: [0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        Config.from_yaml(y)
    monkeypatch.setenv("NCLIB_RESULTS", str(tmp_path / "results"))
    cfg = Config(name="corrupt")
    run_dir(cfg).mkdir(parents=True)
    (run_dir(cfg) / "metrics.json").write_text('{"val": ')
    with pytest.raises(ValueError, match=r"corrupt-[0-9a-f]{8}/metrics\.json is not valid JSON"):
        run(cfg)
