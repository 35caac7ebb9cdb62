"""Training engine: DeepLab's SGD recipe with pCE / full CE and the paper's regularizers (NC, NEL, K-means).

One concern per module:

* :mod:`~nclib.train.config` -- :class:`Config`, every setting of a run (YAML or dict; each field checked for type
  and range at load) and :func:`config_hash`.
* :mod:`~nclib.train.stream` -- the deterministic data stream (a function of the iteration alone).
* :mod:`~nclib.train.loop` -- :func:`train`: poly learning rate, 10x classifier rate, loss terms, AMP on GPU
  (losses in float32), DistributedDataParallel under ``torchrun``, NaN guard, periodic validation.
* :mod:`~nclib.train.checkpoint` -- atomic checkpoints with exact resume, :func:`load_model`.
* :mod:`~nclib.train.results` -- :func:`train_and_evaluate` (train, then score, into one folder) and :func:`run`,
  the results cache ``results/<name>-<hash of config>/``.
* :mod:`~nclib.train.ladder` -- :func:`~nclib.train.ladder.run_ladder`: the paper's ladder (full, pCE, pCE (more),
  + NC, + NC over scribbled labels + NEL, + DenseCRF loss) over seeds through that cache (notebook 04).

Two-stage recipe of the paper (Sec 5.2): stage 1 trains with pCE only; stage 2 starts from stage 1's weights
(``init_checkpoint``) and minimizes pCE + lambda * NC (+ NEL).
"""
from .checkpoint import load_checkpoint, load_model
from .config import EVAL_ONLY, Config, config_hash
from .loop import NonFiniteLossError, loss_terms, train
from .results import results_root, run, run_dir, train_and_evaluate
from .stream import build_datasets

__all__ = ["Config", "config_hash", "EVAL_ONLY", "train", "train_and_evaluate", "run", "run_dir", "results_root",
           "load_checkpoint", "load_model", "NonFiniteLossError", "loss_terms", "build_datasets"]
