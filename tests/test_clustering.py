"""K-means, kernel k-means for NC (Dhillon et al. 2004) and seeded NC on real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nclib.clustering import kernel_kmeans_nc, kmeans, seeded_normalized_cut
from nclib.energies import nc_energy, normalized_cut
from nclib.lattice import exact_gaussian_filter, rgbxy_features
from nclib.photos import BUNDLED as PHOTOS
from nclib.photos import photo


def resized_photo(name: str, size: int) -> torch.Tensor:
    img = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float()
    return F.interpolate(img, size=(size, size), mode="area").clamp(0, 255)


def exact_crisp_nc(labels: torch.Tensor, img: torch.Tensor, k: int, sigma_rgb: float, sigma_xy: float) -> float:
    f = rgbxy_features(img.double(), sigma_rgb, sigma_xy)
    s = F.one_hot(labels, k).permute(0, 3, 1, 2).double()
    d = exact_gaussian_filter(torch.ones_like(s[:, :1]), f)
    return float(normalized_cut(s, lambda v: exact_gaussian_filter(v, f), d).sum())


def test_kmeans_energy_and_lloyd_fixed_point():
    img = torch.cat([resized_photo("coffee", 48), resized_photo("chelsea", 48)])
    res = kmeans(img, 3, iters=50, seed=0)
    for b in range(2):
        x = img[b].reshape(3, -1).T.double().numpy()
        lab = res.labels[b].reshape(-1).numpy()
        mu = np.stack([x[lab == c].mean(0) for c in range(3)])
        sse = ((x - mu[lab]) ** 2).sum(1).mean()
        assert float(res.energies[-1][b]) == pytest.approx(sse, rel=1e-3)
        nearest = ((x[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
        assert (nearest == lab).mean() > 0.99  # converged Lloyd iterations: every pixel at its nearest centre
    again = kmeans(img, 3, iters=50, seed=0)
    assert torch.equal(again.labels, res.labels)


@pytest.mark.parametrize("name", PHOTOS)
def test_kernel_kmeans_never_raises_nc(name):
    img = resized_photo(name, 96)
    res = kernel_kmeans_nc(img, 2, sigma_rgb=15.0, sigma_xy=40.0, iters=30)
    e = torch.stack(res.energies)[:, 0]
    assert len(e) >= 3
    assert bool((e[1:] <= e[:-1] + 1e-6).all()), e
    assert float(e[-1]) < float(e[0])
    assert not bool(res.rejected.any())  # monotone by the algorithm, not by the safeguard
    assert float(nc_energy(res.labels, img, 15.0, 40.0)[0]) == pytest.approx(float(e[-1]), rel=1e-5)


def test_kernel_kmeans_lowers_exact_nc():
    """The lattice iterations also lower the NC measured with the exact dense Gaussian."""
    for name in ("astronaut", "coffee"):
        img = resized_photo(name, 40)
        init = kmeans(img, 3, seed=1).labels
        res = kernel_kmeans_nc(img, 3, 15.0, 20.0, iters=20, init=init)
        assert exact_crisp_nc(res.labels, img, 3, 15.0, 20.0) < exact_crisp_nc(init, img, 3, 15.0, 20.0)


def test_seeded_nc_agrees_with_scribbles():
    img = torch.cat([resized_photo("astronaut", 64), resized_photo("coffee", 64), resized_photo("rocket", 64)])
    scr = torch.full((3, 64, 64), 255, dtype=torch.long)
    scr[0, 5:7, 5:50] = 0
    scr[0, 30:33, 20:40] = 7
    scr[0, 50, 10:60] = 3
    scr[1, 10, 10:50] = 0
    scr[1, 40:42, 25:35] = 2
    # image 2 has no scribble
    res = seeded_normalized_cut(img, scr, num_classes=21)
    seeds = scr != 255
    assert torch.equal(res.labels[seeds], scr[seeds])
    assert set(res.labels[0].unique().tolist()) <= {0, 3, 7}
    assert set(res.labels[1].unique().tolist()) <= {0, 2}
    assert bool((res.labels[2] == 255).all())
    e = torch.stack(res.energies)
    assert bool((e[1:] <= e[:-1] + 1e-6).all())


def test_bad_inputs():
    img = resized_photo("coffee", 16)
    with pytest.raises(ValueError, match="k must"):
        kmeans(img, 0)
    with pytest.raises(ValueError, match="sigma_xy"):
        kernel_kmeans_nc(img, 2, sigma_xy=0.0)
    with pytest.raises(ValueError, match="init"):
        kernel_kmeans_nc(img, 2, init=torch.full((1, 16, 16), 5))
    with pytest.raises(ValueError, match="images"):
        kmeans(img - 300, 2)
    with pytest.raises(ValueError, match="scribbles"):
        seeded_normalized_cut(img, torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        seeded_normalized_cut(img, torch.full((1, 16, 16), 4), num_classes=3)
