"""Reliability (issue 12): safe checkpoint loading, exact resume after Ctrl-C, an honest results cache, the divergence
guard, a data error mid-run, CLI edges. Each test fails on the engine before these fixes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import assert_same_weights, make_tiny_voc, tiny_cfg, weights

from nclib.train import (
    NonFiniteLossError,
    config_hash,
    load_checkpoint,
    load_model,
    run,
    train,
)
from nclib.train import checkpoint as C
from nclib.train import results as R

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_voc(tmp_path_factory.mktemp("rel_voc"))


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A finished 2-iteration run's checkpoint."""
    out = tmp_path_factory.mktemp("finished")
    train(tiny_cfg(tiny_root, iterations=2), out, progress=False)
    return out / "model.pt"


class Evil:
    """Unpickling this runs ``touch <flag>``."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


# ---- 1, 10: checkpoint loading -------------------------------------------------------------------------------------
def test_crafted_pickle_is_refused_and_runs_nothing(tiny_root, finished, tmp_path, capsys):
    from nclib.__main__ import main

    flag = tmp_path / "PWNED"
    ck = torch.load(finished, weights_only=True)
    ck["history"] = Evil(flag)
    evil = tmp_path / "evil.pt"
    torch.save(ck, evil)
    for load in (load_checkpoint, load_model):
        with pytest.raises(ValueError, match=f"{evil}.*refused"):
            load(evil)
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    assert "refused" in capsys.readouterr().err
    with pytest.raises(ValueError, match="refused"):  # as a stage-2 init_checkpoint
        train(tiny_cfg(tiny_root, iterations=1, init_checkpoint=str(evil)), tmp_path / "s2", progress=False)
    (tmp_path / "res").mkdir()
    torch.save(ck, tmp_path / "res" / "model.pt")  # and as the checkpoint a resume would read
    with pytest.raises(ValueError, match="refused"):
        train(tiny_cfg(tiny_root, iterations=2), tmp_path / "res", progress=False)
    assert not flag.exists()


def test_checkpoints_hold_only_tensors_and_plain_containers(finished):
    ck = torch.load(finished, weights_only=True)  # refuses any other object
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and ck["iteration"] == 2
    offenders = [str(p) for p in list((REPO / "nclib").rglob("*.py")) + list((REPO / "tests").rglob("*.py"))
                 if "weights_only=" + "False" in p.read_text()]
    assert offenders == []


def test_checkpoints_of_the_old_format_still_load(tiny_root, finished, tmp_path):
    """model.pt files written before (RNG states as numpy arrays / tuples) load and resume: only the numpy array
    reconstruction is allowed beyond tensors, nothing that could run code."""
    import numpy as np

    ck = torch.load(finished, weights_only=True)
    ck["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    (tmp_path / "old").mkdir()
    torch.save(ck, tmp_path / "old" / "model.pt")
    model, cfg = load_model(tmp_path / "old" / "model.pt")
    assert cfg.iterations == 2 and next(model.parameters()).dtype == torch.float32
    train(tiny_cfg(tiny_root, iterations=2), tmp_path / "old", progress=False)  # resumes (nothing left to do)
    assert_same_weights(ck["model"], weights(tmp_path / "old" / "model.pt"))


def test_rng_state_round_trip_is_exact():
    import numpy as np

    st = C.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("kind, msg", [
    ("empty", "empty"), ("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"),
    ("state_dict", "bare state_dict"), ("list", "holds a list"), ("keys", r"keys \['iteration'\] missing"),
])
def test_corrupt_or_foreign_checkpoints_are_named(finished, tmp_path, kind, msg):
    p = tmp_path / "bad.pt"
    ck = torch.load(finished, weights_only=True)
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        p.write_bytes(finished.read_bytes()[: finished.stat().st_size // 2])
    elif kind == "garbage":
        p.write_bytes(b"not a checkpoint at all\n" * 20)
    elif kind == "state_dict":
        torch.save(ck["model"], p)
    elif kind == "list":
        torch.save([ck["model"]], p)
    else:
        del ck["iteration"]
        torch.save(ck, p)
    for load in (load_checkpoint, load_model):
        with pytest.raises(ValueError, match=f"{p}.*{msg}"):
            load(p)


def test_init_checkpoint_of_other_model_args_is_named(tiny_root, finished, tmp_path):
    with pytest.raises(ValueError, match=r"model_args \{'width': 8\}.*model_args \{'width': 16\}"):
        train(tiny_cfg(tiny_root, model_args={"width": 16}, init_checkpoint=str(finished)), tmp_path / "x",
              progress=False)


def test_init_checkpoint_compares_architecture_not_the_backbone_file():
    """A stage 2 needs the stage-1 network, not the file its backbone first came from (the regime's stage 2)."""
    from nclib.train.checkpoint import check_compatible

    ck = {"model_name": "small", "num_classes": 7, "config": {"model_args": {"output_stride": 4, "backbone": "pre.pt"}}}
    check_compatible(ck, "small", 7, "s1.pt", {"output_stride": 4})  # the same network: accepted
    with pytest.raises(ValueError, match="output_stride"):
        check_compatible(ck, "small", 7, "s1.pt", {"output_stride": 8, "backbone": "pre.pt"})


# ---- 2: Ctrl-C at a random point resumes exactly ------------------------------------------------------------------
def interrupt_at(where: str, nth: int, monkeypatch):
    """Arrange a SIGINT at the ``nth`` call of one place of an iteration: a sample's loading, the dropout layer's
    forward (after it drew from the RNG), the CE loss, or right after the optimizer step."""
    from nclib.train import loop
    from nclib.train.stream import SeededDataset

    calls = {"n": 0}

    def fire(*a):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGINT)

    if where == "dropout":
        real_build = loop.build_model

        def build(*a, **k):
            model = real_build(*a, **k)
            model.drop.register_forward_hook(fire)
            return model

        monkeypatch.setattr(loop, "build_model", build)
    elif where == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        return register_optimizer_step_post_hook(fire)  # the caller removes it when the trial ends
    elif where == "data":
        real = SeededDataset.__getitem__
        monkeypatch.setattr(SeededDataset, "__getitem__", lambda self, i: (fire(), real(self, i))[1])
    else:
        import nclib.losses as L

        real_ce = L.partial_cross_entropy
        monkeypatch.setattr(L, "partial_cross_entropy", lambda *a, **k: (fire(), real_ce(*a, **k))[1])
    return None


def test_sigint_at_a_random_point_resumes_exactly(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_root, iterations=5, crop=24, model_args={"width": 8, "dropout": 0.5}, cache_data=False)
    ref = train(cfg, tmp_path / "ref", progress=False)
    rnd = random.Random(12)
    for trial in range(10):
        where, nth = rnd.choice(["dropout", "step", "data", "loss"]), rnd.randint(1, 4)
        out = tmp_path / f"t{trial}"
        with monkeypatch.context() as m:
            handle = interrupt_at(where, nth, m)
            try:
                with pytest.raises(KeyboardInterrupt):
                    train(cfg, out, progress=False)
            finally:
                if handle is not None:
                    handle.remove()
        saved = torch.load(out / "model.pt", weights_only=True)["iteration"]
        assert 1 <= saved < cfg.iterations, (where, nth)
        res = train(cfg, out, progress=False)
        assert_same_weights(weights(tmp_path / "ref" / "model.pt"), weights(out / "model.pt"))
        assert res["history"]["train"] == ref["history"]["train"], (where, nth)


# ---- 4: the divergence guard ---------------------------------------------------------------------------------------
def test_huge_lr_stops_naming_iteration_terms_and_fix(tiny_root, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"iteration \d+.*ce.*lower learning rate"):
        train(tiny_cfg(tiny_root, lr=1e6, iterations=4), tmp_path / "d", progress=False)


def test_garbage_weights_after_the_last_step_are_caught(tiny_root, tmp_path, monkeypatch):
    """NC alone, a step that leaves NaN weights at the last iteration: the run must not finish as if fine."""
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(NonFiniteLossError, match="iteration 0: the weights are not finite.*'nc'"):
        train(tiny_cfg(tiny_root, ce_weight=0.0, nc_weight=1.0, iterations=1), tmp_path / "g", progress=False)


def test_nc_alone_at_huge_lr_does_not_finish_on_garbage(tiny_root, tmp_path):
    """NC is scale-free in the logits: at lr 1e6 the weights blow up to ~1e15 with finite, plausible losses."""
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: the network's output \(logits\) reached .*'nc'"):
        train(tiny_cfg(tiny_root, ce_weight=0.0, nc_weight=1.0, lr=1e6, iterations=4), tmp_path / "nc",
              progress=False)


def test_cli_exits_nonzero_naming_the_iteration(tiny_root, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(json.dumps(tiny_cfg(tiny_root, iterations=3).to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NCLIB_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nclib", "train", "--config", str(y), "--set", "lr=1000000.0",
                           "--out", str(tmp_path / "o"), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "iteration" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- 21: a data error mid-run keeps the progress -------------------------------------------------------------------
def test_missing_mask_mid_run_saves_then_resumes_exactly(tmp_path):
    root = make_tiny_voc(tmp_path / "voc")
    cfg = tiny_cfg(root, iterations=5, cache_data=False)
    ref = train(cfg, tmp_path / "ref", progress=False)
    masks = sorted((root / "SegmentationClassAug").glob("train_*.png"))
    kept = {p: p.read_bytes() for p in masks}

    def remove_masks(it, terms):
        if it == 3:
            for p in masks:
                p.unlink()

    with pytest.raises(ValueError, match="label file not found") as info:
        train(cfg, tmp_path / "c", progress=False, callback=remove_masks)
    assert "3 finished iterations were saved" in " ".join(info.value.__notes__)
    assert torch.load(tmp_path / "c" / "model.pt", weights_only=True)["iteration"] == 3
    for p, b in kept.items():
        p.write_bytes(b)
    res = train(cfg, tmp_path / "c", progress=False)
    assert_same_weights(weights(tmp_path / "ref" / "model.pt"), weights(tmp_path / "c" / "model.pt"))
    assert res["history"]["train"] == ref["history"]["train"]


# ---- 3, 7, 11: the results cache -----------------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_force_invalidates_old_metrics_and_partial_init_is_refused(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NCLIB_RESULTS", str(tmp_path / "results"))
    cfg = tiny_cfg(tiny_root, iterations=4, ckpt_every=2)
    run(cfg, progress=False)
    folder = R.run_dir(cfg)
    real = R.train

    def killed_after_periodic_save(c, out, **k):
        def cb(it, terms):
            if it == 3:
                raise Killed
        return real(c, out, callback=cb, **k)

    monkeypatch.setattr(R, "train", killed_after_periodic_save)
    with pytest.raises(Killed):
        run(cfg, force=True, progress=False)
    monkeypatch.setattr(R, "train", real)
    assert not (folder / "metrics.json").exists()  # no stale scores beside a partial model.pt
    assert torch.load(folder / "model.pt", weights_only=True)["iteration"] == 2
    with pytest.raises(ValueError, match="iteration 2 of 4.*not finish"):
        train(tiny_cfg(tiny_root, init_checkpoint=f"{folder.name}/model.pt", iterations=1), tmp_path / "s2",
              progress=False)
    assert run(cfg, progress=False)["history"]["train"][-1]["iteration"] == 4  # resumed and finished


def test_train_out_takes_the_run_lock_and_unique_temp_names(tiny_root, tmp_path, monkeypatch):
    import fcntl

    real_train, real_save = R.train, torch.save
    seen, tmp_names = {}, []

    def probing_train(c, out, **k):
        with open(Path(out) / ".lock", "w") as fh:  # another process's attempt: must find the folder locked
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True
        return real_train(c, out, **k)

    def recording_save(obj, f, *a, **k):
        tmp_names.append(Path(f).name)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(R, "train", probing_train)
    monkeypatch.setattr(torch, "save", recording_save)
    R.train_and_evaluate(tiny_cfg(tiny_root, iterations=2, ckpt_every=1), tmp_path / "o", progress=False)
    assert seen["locked"]
    assert len(tmp_names) == 2 and len(set(tmp_names)) == 2 and "model.pt.tmp" not in tmp_names


def test_clean_clone_retrains_missing_stage_one(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NCLIB_RESULTS", str(tmp_path / "results"))
    s1 = tiny_cfg(tiny_root, name="s1", nc_weight=0.0, iterations=2)
    m1 = run(s1, progress=False)
    folder = R.run_dir(s1)
    original = weights(folder / "model.pt")
    stored = (folder / "metrics.json").read_text()
    (folder / "model.pt").unlink()  # a clean clone: metrics.json committed, weights git-ignored
    s2 = tiny_cfg(tiny_root, name="s2", init_checkpoint=m1["checkpoint"], iterations=1)
    res = run(s2, progress=False)
    assert res["hash"] == config_hash(s2)
    assert_same_weights(original, weights(folder / "model.pt"))
    assert (folder / "metrics.json").read_text() == stored


# ---- 12: CLI edges ------------------------------------------------------------------------------------------------
def test_cli_train_without_config_prints_help(monkeypatch, capsys):
    from nclib.__main__ import main

    def boom(*a, **k):
        raise AssertionError("must not train")

    monkeypatch.setattr(R, "train", boom)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "--config is required" in err and "usage" in err
    assert main(["train", "--set", "lr=0.01"]) == 2  # overrides alone are still the hours-long default run
    assert "--config is required" in capsys.readouterr().err


def test_cli_rejects_a_negative_max_images(finished, capsys):
    from nclib.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(finished), "--max-images", "-3"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_cli_json_in_a_missing_folder_fails_first(finished, tmp_path, capsys, monkeypatch):
    from nclib import evaluate as E
    from nclib.__main__ import main

    def boom(*a, **k):
        raise AssertionError("must not evaluate")

    monkeypatch.setattr(E, "evaluate", boom)
    assert main(["evaluate", "--checkpoint", str(finished), "--json", str(tmp_path / "nope" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_one_line(finished, capsys):
    from nclib.__main__ import main

    assert main(["evaluate", "--checkpoint", str(finished), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_cli_version(capsys):
    from nclib import __version__
    from nclib.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nclib {__version__}"
