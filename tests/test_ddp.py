"""DistributedDataParallel: 2 CPU processes (gloo, started by torchrun) match 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import make_tiny_voc

from nclib.models import build_model
from nclib.train import Config, train


def test_torchrun_two_processes_match_one(tmp_path):
    root = make_tiny_voc(tmp_path / "voc")
    # dropout off: the two processes draw other dropout masks than the single one (everything else is shared)
    cfg = Config.from_dict(dict(name="ddp", model="small", model_args={"width": 8, "dropout": 0.0}, root=str(root),
                                crop=32, scale_range=[0.8, 1.2], batch_size=4, iterations=3, lr=0.01, nc_weight=0.5,
                                sigma_xy=10.0, threads=1, log_every=1, device="cpu", seed=11))
    single = train(cfg, tmp_path / "one", progress=False)

    yaml_path = tmp_path / "ddp.yaml"
    yaml_path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nclib", "train", "--config", str(yaml_path), "--out", str(tmp_path / "two"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "errno" in proc.stderr.lower() and "address" in proc.stderr.lower():
        pytest.skip(f"torchrun could not open a local port: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert b["iteration"] == 3 and len(b["rng"]) == 2  # one RNG state per rank
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    # the weights moved far more than the tolerance: the comparison is not between two untouched initialisations
    torch.manual_seed(cfg.seed)
    init = build_model("small", 2, width=8, dropout=0.0).state_dict()
    moved = max(float((a["model"][k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3
    # rank 0 logs the loss of its half-batch; the per-image mean makes the mean of both halves the global loss
    assert len(b["history"]["train"]) == len(single["history"]["train"])
    # train --out scores once (rank 0) and stores the same record as the results cache
    stored = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert stored["config"] == cfg.to_dict() and 0 <= stored["val"]["miou"] <= 1
    assert json.loads(proc.stdout) == {k: v for k, v in stored.items() if k != "history"}  # printed once
