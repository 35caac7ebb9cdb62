"""Train, then score: :func:`train_and_evaluate` (one folder), and :func:`run`, the results cache over it.

``results/<name>-<hash of config>/`` holds ``metrics.json`` (config, final scores, a thinned training history; a
few kB, meant to be committed; notebooks render from it) and ``model.pt`` (the checkpoint; git-ignored).

``metrics.json`` keys: ``name``, ``hash``, ``config`` (:meth:`Config.to_dict`), ``checkpoint``, ``train_seconds``,
``history`` ({"train": [...], "val": [...]}), ``val`` (single scale, no flip: the scores the notebooks tabulate)
and, when the config asks for other ``eval_scales`` or ``eval_flip``, ``val_msc`` (multi-scale / flip testing).
Provenance, so that a table can say where its numbers come from: ``commit`` (short hash of the source checkout,
``-dirty`` with uncommitted changes, ``unknown`` outside git), ``nclib``, ``torch``, ``python``, ``device``,
``finished`` (UTC) and ``eval_seconds``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .checkpoint import load_model
from .config import Config, config_hash
from .loop import dist_env, resolve_device, train
from .stream import build_datasets

__all__ = ["results_root", "run_dir", "run", "train_and_evaluate", "score", "ensure_init_checkpoint"]


def results_root() -> Path:
    """``$NCLIB_RESULTS``, else ``<repo>/results`` in a source checkout, else ``./results``."""
    env = os.environ.get("NCLIB_RESULTS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo / "results" if (repo / "pyproject.toml").is_file() else Path.cwd() / "results"


def run_dir(cfg: Config) -> Path:
    """``results_root() / "<name>-<config_hash>"``: where :func:`run` keeps ``cfg``'s result."""
    return results_root() / f"{cfg.name}-{config_hash(cfg)}"


def score(cfg: Config, checkpoint: Union[str, Path]) -> Dict[str, Any]:
    """The final scores of a checkpoint under ``cfg``'s evaluation settings, on ``cfg``'s val split.

    ``val``: single scale, no flip (with ``eval_crf`` / ``eval_nc`` / ``eval_kmeans`` as asked); ``val_msc``: with
    ``eval_scales`` / ``eval_flip`` when they differ from single-scale testing.
    """
    from ..evaluate import evaluate

    model, _ = load_model(checkpoint, device=resolve_device(cfg, 0))
    _, val_set, num_classes = build_datasets(cfg)
    device = next(model.parameters()).device
    out = {"val": evaluate(model, val_set, num_classes, device=device, scales=(1.0,), flip=False, crf=cfg.eval_crf,
                           crf_kwargs=cfg.crf_args, nc_energy=cfg.eval_nc, sigma_rgb=cfg.sigma_rgb,
                           sigma_xy=cfg.sigma_xy, kmeans_energy=cfg.eval_kmeans)}
    if tuple(cfg.eval_scales) != (1.0,) or cfg.eval_flip:
        out["val_msc"] = evaluate(model, val_set, num_classes, device=device, scales=cfg.eval_scales,
                                  flip=cfg.eval_flip, crf=cfg.eval_crf, crf_kwargs=cfg.crf_args)
    return out


def train_and_evaluate(cfg: Config, out_dir: Union[str, Path], resume: bool = True,
                       progress: bool = True) -> Dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming a checkpoint there when ``resume``), score it, write
    ``out_dir/metrics.json`` atomically and return its content (see the module docstring for the keys).

    ``checkpoint`` in the result is relative to :func:`results_root` when ``out_dir`` is a folder of it (so it can
    serve as a stage-2 ``init_checkpoint`` on any machine), else the path as given. Under ``torchrun`` only rank 0
    scores and writes; the other ranks return ``{}``.
    """
    out_dir = Path(out_dir)
    ensure_init_checkpoint(cfg, progress=progress)
    with _run_lock(out_dir):  # run() holds it already (re-entrant); `train --out` takes it here
        if dist_env()[0] == 0:  # the old scores no longer describe the folder's model.pt once training starts
            (out_dir / "metrics.json").unlink(missing_ok=True)
        tr = train(cfg, out_dir, resume=resume, progress=progress)
        if dist_env()[0] != 0:
            return {}
        return _score_and_store(cfg, out_dir, tr)


def _score_and_store(cfg: Config, out_dir: Path, tr: Dict[str, Any]) -> Dict[str, Any]:
    ckpt = out_dir / "model.pt"
    in_cache = out_dir.resolve().parent == results_root().resolve()
    res: Dict[str, Any] = {"name": cfg.name, "hash": config_hash(cfg), "config": cfg.to_dict(),
                           "checkpoint": f"{out_dir.name}/model.pt" if in_cache else str(ckpt),
                           "train_seconds": tr["seconds"], "history": _thin(tr["history"])}
    t0 = time.perf_counter()
    res.update(score(cfg, ckpt))
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    res.update(provenance_fields(resolve_device(cfg, 0)))
    metrics_path = out_dir / "metrics.json"
    tmp = metrics_path.with_name(f".metrics.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
        os.replace(tmp, metrics_path)
    finally:
        tmp.unlink(missing_ok=True)
    return res


def provenance_fields(device: torch.device) -> Dict[str, str]:
    """Where and with what a result was computed (see the module docstring)."""
    from .. import __version__

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {"commit": _source_commit(), "nclib": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": dev,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _source_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "nclib"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def ensure_init_checkpoint(cfg: Config, progress: bool = True) -> None:
    """On a clean clone the stage-1 weights named by ``cfg.init_checkpoint`` are missing (``model.pt`` is
    git-ignored) while their ``metrics.json`` is committed: retrain that stage-1 run from its stored config into
    its folder (its metrics.json is kept). Without a stored config: a ValueError saying what to run."""
    if not cfg.init_checkpoint:
        return
    path = Path(cfg.init_checkpoint)
    if path.exists() or path.is_absolute() or (results_root() / path).exists():
        return
    folder = (results_root() / path).parent
    metrics = folder / "metrics.json"
    if path.name != "model.pt" or not metrics.is_file():
        raise ValueError(f"init_checkpoint {cfg.init_checkpoint} not found (also not under {results_root()}): train "
                         f"the stage-1 config first, e.g. `python -m nclib train --config configs/<stage1>.yaml`, "
                         f"and pass its result's 'checkpoint'")
    stage1 = Config.from_dict(_read_metrics(metrics)["config"])
    if f"{stage1.name}-{config_hash(stage1)}" != folder.name:
        raise ValueError(f"init_checkpoint {cfg.init_checkpoint} not found, and {metrics} holds a config of another "
                         f"hash than its folder: retrain stage 1 with `python -m nclib train --config <its yaml>`")
    print(f"nclib: init_checkpoint {cfg.init_checkpoint} is missing (weights are not committed): retraining stage 1 "
          f"({stage1.name}) into {folder}", file=sys.stderr)
    ensure_init_checkpoint(stage1, progress=progress)
    with _run_lock(folder):
        if not (folder / "model.pt").is_file() or _unfinished(folder / "model.pt", stage1):
            train(stage1, folder, resume=True, progress=progress)


def _unfinished(path: Path, cfg: Config) -> bool:
    from .checkpoint import load_checkpoint

    return int(load_checkpoint(path)["iteration"]) < cfg.iterations


def run(cfg: Union[Config, Dict[str, Any]], force: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Train and evaluate ``cfg`` once; later calls return the stored ``metrics.json`` (unless ``force``).

    Stored under :func:`run_dir` by :func:`train_and_evaluate`. An interrupted run resumes from its checkpoint.
    """
    cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
    out = run_dir(cfg)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not force:  # cached: read without taking the lock
        return _read_metrics(metrics_path)
    with _run_lock(out):
        if metrics_path.is_file() and not force:  # another process finished it while we waited
            return _read_metrics(metrics_path)
        if force:  # invalidate first: a run killed from here on must not leave the old scores beside new weights
            metrics_path.unlink(missing_ok=True)
            (out / "model.pt").unlink(missing_ok=True)
        return train_and_evaluate(cfg, out, resume=True, progress=progress)


def _read_metrics(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it, or pass force=True to run again") from None


_HELD: Dict[str, list] = {}  # folder -> [thread lock, depth]: flock is not re-entrant within one process
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def _run_lock(out: Path):
    """One process at a time per results folder (a second one waits, then finds the stored result).

    An OS lock (released when the holder dies), re-entrant within a process (run() holds it around
    :func:`train_and_evaluate`, which takes it for ``train --out``); skipped under torchrun, where every rank runs
    the same config.
    """
    if dist_env()[1] > 1:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    with _HELD_GUARD:
        entry = _HELD.setdefault(key, [threading.RLock(), 0])
    with entry[0]:
        entry[1] += 1
        try:
            if entry[1] > 1:
                yield
                return
            with open(out / ".lock", "w") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            entry[1] -= 1


def _thin(history: Dict[str, list], keep: int = 40) -> Dict[str, list]:
    """At most ``keep`` training-loss points (evenly spaced, last kept) so metrics.json stays small."""
    tr = history["train"]
    if len(tr) > keep:
        step = math.ceil(len(tr) / keep)
        tr = tr[::step] + ([tr[-1]] if (len(tr) - 1) % step else [])
    return {"train": tr, "val": history["val"]}
