"""The paper's ladder (Sec 5.2, Table 3) over seeds, from one set of configs ``<prefix>_{full,pce,pce_more,nc}``.

Stage 1 (pCE) and full masks per seed; stage 2 from each seed's stage 1: the pCE (more) control, pCE + NC (the
paper's form), pCE + NC over the scribbled labels + NEL (beyond the paper), and the DenseCRF loss (the authors'
follow-up) with its weight chosen on the first seed, as the paper chose lambda. Every run goes through the
results cache (:func:`~nclib.train.results.run`), so a notebook renders from committed ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from .config import Config
from .results import run

__all__ = ["LADDER", "run_ladder", "ladder_miou"]

#: (row name as in figures/claim_*.csv, key in :func:`run_ladder`'s ``runs[seed]``), in table order.
LADDER: Tuple[Tuple[str, str], ...] = (
    ("pCE", "pce"), ("pCE (more)", "pce_more"), ("pCE + NC", "nc"),
    ("pCE + NC (scribbled labels) + NEL", "present_nel"), ("pCE + DenseCRF loss", "crf"), ("full masks", "full"))


def run_ladder(configs: Union[str, Path], prefix: str, seeds: Sequence[int],
               model_args: Optional[Dict[str, Any]] = None, nel_weight: float = 1.0,
               crf_loss_weights: Sequence[float] = (0.005, 0.02, 0.08), force: bool = False,
               progress: bool = False, runner: Callable[..., Dict[str, Any]] = run) -> Dict[str, Any]:
    """Train (or read from the cache) the ladder; returns ``{"runs": {seed: {key: result}}, "crf_try": {weight:
    result on seeds[0]}, "crf_weight": chosen weight}`` (keys as in :data:`LADDER`).

    ``model_args`` (e.g. ``{"output_stride": 4, "backbone": <pre-training checkpoint>}``) goes to the stage-1 and
    full-mask runs; stage 2 starts from stage 1's weights. Run names are ``<prefix>-...`` with ``_`` -> ``-``.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if not crf_loss_weights:
        raise ValueError("crf_loss_weights must hold at least one weight")
    tag = prefix.replace("_", "-")

    def cfg(kind: str, **kw) -> Config:
        return Config.from_yaml(Path(configs) / f"{prefix}_{kind}.yaml").replace(**kw)

    def go(c: Config) -> Dict[str, Any]:
        return runner(c, force=force, progress=progress)

    stage1 = {} if model_args is None else {"model_args": dict(model_args)}
    runs: Dict[int, Dict[str, Any]] = {}
    for s in seeds:  # stage 1 and full masks first: the regime is fixed before any NC number
        runs[s] = {"full": go(cfg("full", seed=s, **stage1)), "pce": go(cfg("pce", seed=s, **stage1))}
    for s in seeds:
        init = runs[s]["pce"]["checkpoint"]
        runs[s]["pce_more"] = go(cfg("pce_more", seed=s, init_checkpoint=init))
        runs[s]["nc"] = go(cfg("nc", seed=s, init_checkpoint=init))
        runs[s]["present_nel"] = go(cfg("nc", name=f"{tag}-nc-present-nel", seed=s, init_checkpoint=init,
                                        nc_present_only=True, nel_weight=nel_weight))
    s0 = seeds[0]
    crf_try = {w: go(cfg("pce_more", name=f"{tag}-densecrf-w{w:g}", seed=s0,
                         init_checkpoint=runs[s0]["pce"]["checkpoint"], densecrf_weight=w)) for w in crf_loss_weights}
    crf_w = max(crf_loss_weights, key=lambda w: crf_try[w]["val"]["miou"])
    runs[s0]["crf"] = crf_try[crf_w]
    for s in seeds[1:]:
        runs[s]["crf"] = go(cfg("pce_more", name=f"{tag}-densecrf-w{crf_w:g}", seed=s,
                                init_checkpoint=runs[s]["pce"]["checkpoint"], densecrf_weight=crf_w))
    return {"runs": runs, "crf_try": crf_try, "crf_weight": crf_w}


def ladder_miou(runs: Dict[int, Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, list]:
    """``{row name: [val mIoU in % per seed]}`` in :data:`LADDER` order (single scale, no CRF)."""
    return {name: [100 * runs[s][key]["val"]["miou"] for s in seeds] for name, key in LADDER}
