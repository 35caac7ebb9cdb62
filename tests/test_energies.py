"""The objectives of nclib.energies against their dense O(N^2) references and closed forms, in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nclib.energies import (
    dense_affinity,
    exact_affinity,
    kmeans_energy,
    kmeans_energy_dense,
    nc_energy,
    normalized_cut,
    normalized_cut_dense,
    normalized_cut_gradient,
    normalized_cut_lattice,
    potts_energy,
    potts_energy_dense,
    restrict_to_labels,
)
from nclib.lattice import Permutohedral, rgbxy_features
from nclib.losses import normalized_cut_loss
from nclib.photos import photo_tensor


def small_batch(size: int = 10, k: int = 4, seed: int = 0):
    """Two real photo crops (float64) and a random soft segmentation (B, K, H, W)."""
    img = torch.cat([photo_tensor("astronaut", crop=size), photo_tensor("chelsea", crop=size)]).double()
    g = torch.Generator().manual_seed(seed)
    s = torch.softmax(3 * torch.randn(2, k, size, size, generator=g, dtype=torch.float64), dim=1)
    return img, s


def roi_mask(size: int) -> torch.Tensor:
    roi = torch.ones(2, size, size, dtype=torch.bool)
    roi[0, :, -3:] = False  # crop padding on the right of image 0
    roi[1, -2:] = False
    return roi


@pytest.mark.parametrize("with_roi", [False, True])
def test_normalized_cut_matches_dense_reference(with_roi):
    img, s = small_batch()
    f = rgbxy_features(img, 15.0, 4.0)
    roi = roi_mask(10) if with_roi else None
    if roi is not None:
        s = s * roi[:, None]
    got = normalized_cut(s, *exact_affinity(f, roi))
    want = normalized_cut_dense(s, dense_affinity(f, roi))
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool((got > 0).all()) and bool((got < 4).all())


def test_normalized_cut_of_an_empty_segment_is_finite():
    img, s = small_batch(k=3)
    s = torch.cat([s, torch.zeros_like(s[:, :1])], dim=1)  # a 4th label nobody takes
    f = rgbxy_features(img, 15.0, 4.0)
    got = normalized_cut(s, *exact_affinity(f))
    torch.testing.assert_close(got, normalized_cut_dense(s[:, :3], dense_affinity(f)), rtol=1e-10, atol=1e-12)


def test_present_labels_form_matches_dense_reference_and_gives_zero_below_two_labels():
    img, s = small_batch(k=5)
    present = torch.tensor([[True, False, True, True, False], [False, False, True, False, False]])
    f = rgbxy_features(img, 15.0, 4.0)
    filt, d = exact_affinity(f)
    got = normalized_cut(s, filt, d, present)
    want = normalized_cut_dense(s, dense_affinity(f), present)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert float(got[1]) == 0.0 and float(got[0]) > 0
    # all labels present: the paper's form; the restriction is idempotent
    everything = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(normalized_cut(s, filt, d, everything), normalized_cut(s, filt, d))
    r = restrict_to_labels(s, present)
    torch.testing.assert_close(restrict_to_labels(r, present), r)
    torch.testing.assert_close(normalized_cut(r, filt, d, present), got)


def test_restriction_of_logits_is_the_softmax_over_present_labels():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    present = torch.tensor([[True, False, True, False], [False, True, True, True]])
    got = restrict_to_labels(logits, present, from_logits=True)
    for i in range(2):
        idx = present[i].nonzero()[:, 0]
        torch.testing.assert_close(got[i, idx], torch.softmax(logits[i, idx], dim=0))
        assert bool((got[i, ~present[i]] == 0).all())
    torch.testing.assert_close(restrict_to_labels(torch.softmax(logits, 1), present), got)


def test_potts_energy_matches_dense_reference():
    img, s = small_batch()
    f = rgbxy_features(img, 15.0, 4.0)
    torch.testing.assert_close(potts_energy(s, *exact_affinity(f)), potts_energy_dense(s, dense_affinity(f)),
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("with_roi", [False, True])
def test_kmeans_energy_matches_pairwise_form(with_roi):
    img, s = small_batch()
    roi = roi_mask(10) if with_roi else None
    torch.testing.assert_close(kmeans_energy(s, img, roi), kmeans_energy_dense(s, img, roi), rtol=1e-10, atol=1e-8)


def test_nc_energy_crisp_labels_equal_one_hot_probabilities_and_the_loss():
    img, s = small_batch(size=16, k=3)
    img = img.float()
    labels = s.argmax(1)
    onehot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    crisp = nc_energy(labels, img, 15.0, 8.0)
    assert crisp.shape == (2,)
    torch.testing.assert_close(crisp, nc_energy(onehot, img, 15.0, 8.0))
    roi = roi_mask(16)
    per_image = torch.stack([
        normalized_cut_loss(s[i : i + 1].float(), img[i : i + 1], sigma_xy=8.0, roi=roi[i : i + 1]) for i in range(2)
    ])
    torch.testing.assert_close(nc_energy(s.float(), img, 15.0, 8.0, roi), per_image, rtol=1e-5, atol=1e-6)
    # num_classes larger than the labels used: empty segments add nothing
    torch.testing.assert_close(nc_energy(labels, img, 15.0, 8.0, num_classes=5), crisp)


def test_nc_energy_lattice_close_to_exact():
    img, s = small_batch(size=16, k=3)
    f = rgbxy_features(img, 15.0, 8.0)
    exact = normalized_cut(s, *exact_affinity(f))
    got = nc_energy(s.float(), img.float(), 15.0, 8.0)
    assert float(((got.double() - exact) / exact).abs().max()) < 0.03  # the lattice's kernel error


def test_nc_energy_bad_inputs():
    img, s = small_batch(size=8, k=3)
    with pytest.raises(TypeError, match="segmentation must be a torch.Tensor"):
        nc_energy(s.numpy(), img)
    with pytest.raises(ValueError, match="segmentation"):
        nc_energy(s.argmax(1).float(), img.float())
    with pytest.raises(ValueError, match="segmentation has labels"):
        nc_energy(s.argmax(1), img.float(), num_classes=2)
    with pytest.raises(ValueError, match="present must be"):
        normalized_cut(s, *exact_affinity(rgbxy_features(img, 15.0, 4.0)), torch.ones(2, 2, dtype=torch.bool))


def test_normalized_cut_gradient_is_eq8_the_autograd_gradient():
    img, s = small_batch(size=8, k=3)
    s = torch.cat([s, torch.zeros_like(s[:, :1])], dim=1).requires_grad_(True)  # with an empty segment
    filt, d = exact_affinity(rgbxy_features(img, 15.0, 4.0))
    (g,) = torch.autograd.grad(normalized_cut(s, filt, d).sum(), s)
    got = normalized_cut_gradient(s.detach(), filt(s.detach()), d)
    torch.testing.assert_close(got[:, :3], g[:, :3], rtol=1e-9, atol=1e-12)
    assert bool((got[:, 3] == 0).all())


@pytest.mark.parametrize("with_roi", [False, True])
def test_fused_lattice_nc_equals_autograd_through_the_lattice_filter(with_roi):
    """The fused form against the generic one on the same lattice: value, and gradient = autograd through
    ``lattice.filter`` (Eq. 8 with (L + L')/2), with an empty label, a roi and present labels."""
    img = torch.cat([photo_tensor("astronaut", crop=24), photo_tensor("coffee", crop=24)])
    g = torch.Generator().manual_seed(1)
    s0 = torch.softmax(3 * torch.randn(2, 5, 24, 24, generator=g), dim=1)
    s0[:, 4] = 0  # an empty segment
    s0 = s0 / s0.sum(1, keepdim=True)
    roi = roi_mask(24) if with_roi else None
    if roi is not None:
        s0 = s0 * roi[:, None]
    lat = Permutohedral(rgbxy_features(img, 15.0, 10.0), roi=roi)
    present = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    for pres in (None, present):
        a, b = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        got = normalized_cut_lattice(a, lat, pres)
        want = normalized_cut(b, lat.filter, lat.norm(), pres)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        weights = torch.tensor([0.7, -1.3])
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()))
        assert float(b.grad.abs().max()) > 0
