"""nclib: normalized cut loss for weakly-supervised CNN segmentation (Tang et al., CVPR 2018).

Modules, one idea each: ``lattice`` (permutohedral Gaussian filter), ``energies`` (the objectives as pure
functions of S and an affinity operator, with exact references), ``losses`` (the validated training losses: pCE, NC,
NEL, K-means, DenseCRF), ``crf`` (dense CRF inference), ``clustering`` and ``proposals`` (shallow algorithms),
``models`` (DeepLab), ``data`` (datasets, scribbles, preparation), ``train`` / ``evaluate`` / ``metrics``
(the engine), ``photos`` (bundled sample photos). Input value checks can be switched off for hot loops with
``set_checks(False)`` / ``with checks(False):`` / ``NCLIB_CHECKS=0`` (shape and type checks stay on).
Importing nclib keeps freed CPU tensor memory in the process for reuse (glibc only; see :mod:`nclib.cpu_memory`,
``NCLIB_KEEP_CPU_MEMORY=0`` to opt out).
"""
from . import cpu_memory  # noqa: F401  (first: its malloc settings apply to everything allocated after)
from ._checks import checks, checks_enabled, set_checks
from .energies import nc_energy
from .lattice import (
    Permutohedral,
    exact_gaussian_filter,
    gaussian_filter,
    rgbxy_features,
    xy_features,
)
from .losses import (
    densecrf_loss,
    kmeans_loss,
    nel_loss,
    normalized_cut_loss,
    partial_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "Permutohedral",
    "gaussian_filter",
    "exact_gaussian_filter",
    "rgbxy_features",
    "xy_features",
    "partial_cross_entropy",
    "normalized_cut_loss",
    "nel_loss",
    "kmeans_loss",
    "densecrf_loss",
    "nc_energy",
    "set_checks",
    "checks",
    "checks_enabled",
]
