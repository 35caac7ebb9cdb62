"""nclib: normalized cut loss for weakly-supervised CNN segmentation (Tang et al., CVPR 2018)."""
from .lattice import Permutohedral, exact_gaussian_filter, gaussian_filter, rgbxy_features, xy_features

__version__ = "0.1.0"

__all__ = ["Permutohedral", "gaussian_filter", "exact_gaussian_filter", "rgbxy_features", "xy_features"]
