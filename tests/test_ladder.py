"""The ladder over seeds (nclib.train.ladder) and its CSV (nclib.report.write_claim_csv), with a recording runner
instead of training: which configs run, in which order, from which stage 1, and how the DenseCRF weight is chosen."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from nclib.report import write_claim_csv
from nclib.train import Config
from nclib.train.ladder import LADDER, ladder_miou, run_ladder

REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """A stand-in for nclib.train.run: records each config, returns a result whose mIoU it is told."""

    def __init__(self, miou):
        self.calls, self.miou = [], miou

    def __call__(self, cfg: Config, force=False, progress=True):
        self.calls.append(cfg)
        return {"name": cfg.name, "checkpoint": f"{cfg.name}-s{cfg.seed}/model.pt", "val": {"miou": self.miou(cfg)}}


def test_ladder_order_stage_one_and_crf_weight():
    # the DenseCRF weight 0.02 is best on seed 0; seed 1 would prefer 0.08 but must get seed 0's choice
    score = {(0, 0.005): 0.50, (0, 0.02): 0.55, (0, 0.08): 0.52, (1, 0.08): 0.9}
    rec = Recorder(lambda c: score.get((c.seed, c.densecrf_weight), 0.4))
    args = {"output_stride": 4, "backbone": "pre/model.pt"}
    out = run_ladder(REPO / "configs", "horses", [0, 1], model_args=args, nel_weight=1.0,
                     crf_loss_weights=[0.005, 0.02, 0.08], runner=rec)
    names = [(c.name, c.seed) for c in rec.calls]
    assert names[:4] == [("horses-full", 0), ("horses-pce", 0), ("horses-full", 1), ("horses-pce", 1)]
    stage2 = rec.calls[4:]
    assert [(c.name, c.seed) for c in stage2] == [
        ("horses-pce-more", 0), ("horses-nc", 0), ("horses-nc-present-nel", 0),
        ("horses-pce-more", 1), ("horses-nc", 1), ("horses-nc-present-nel", 1),
        ("horses-densecrf-w0.005", 0), ("horses-densecrf-w0.02", 0), ("horses-densecrf-w0.08", 0),
        ("horses-densecrf-w0.02", 1)]
    for c in rec.calls[:4]:  # stage 1 and full masks: the pre-trained backbone, no init
        assert c.model_args == args and c.init_checkpoint is None
    for c in stage2:  # stage 2 starts from its own seed's stage 1
        assert c.init_checkpoint == f"horses-pce-s{c.seed}/model.pt" and c.model_args == {"output_stride": 4}
        assert c.iterations == 150 and c.lr == 0.00025
    by = {(c.name, c.seed): c for c in stage2}
    assert by[("horses-nc", 0)].nc_weight == 1.6 and not by[("horses-nc", 0)].nc_present_only
    p = by[("horses-nc-present-nel", 1)]
    assert p.nc_weight == 1.6 and p.nc_present_only and p.nel_weight == 1.0
    assert by[("horses-pce-more", 0)].nc_weight == 0 and by[("horses-pce-more", 0)].densecrf_weight == 0
    assert out["crf_weight"] == 0.02 and out["runs"][1]["crf"]["val"]["miou"] == 0.4
    per = ladder_miou(out["runs"], [0, 1])
    assert list(per) == [name for name, _ in LADDER]
    assert np.allclose(per["pCE + DenseCRF loss"], [55, 40])


def test_ladder_needs_seeds_and_weights():
    with pytest.raises(ValueError, match="seeds"):
        run_ladder(REPO / "configs", "horses", [], runner=Recorder(lambda c: 0.5))
    with pytest.raises(ValueError, match="crf_loss_weights"):
        run_ladder(REPO / "configs", "horses", [0], crf_loss_weights=[], runner=Recorder(lambda c: 0.5))


def test_claim_csv_columns_rounding_and_mean(tmp_path):
    per = {"pCE (more)": [50.781, 53.4349, 52.0551], "full masks": [61.4549, 60.7751, 61.13]}
    path = write_claim_csv(per, [0, 1, 2], tmp_path / "claim.csv")
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["method", "miou_mean", "miou_seed0", "miou_seed1", "miou_seed2"]
    assert [r["method"] for r in rows] == list(per)
    for r, vals in zip(rows, per.values()):
        assert [float(r[f"miou_seed{s}"]) for s in range(3)] == [round(v, 2) for v in vals]
        assert float(r["miou_mean"]) == round(sum(vals) / 3, 2)
    assert path.read_text().splitlines()[1] == "pCE (more),52.09,50.78,53.43,52.06"
    with pytest.raises(ValueError, match=r"per\['full masks'\] has 2 values for 3 seeds"):
        write_claim_csv({"full masks": [1.0, 2.0]}, [0, 1, 2], tmp_path / "bad.csv")
