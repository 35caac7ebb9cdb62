"""Losses against independent references: exact O(N^2) Gaussian, Eq. 8, float64 finite differences, closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nclib.energies import normalized_cut
from nclib.lattice import Permutohedral, exact_gaussian_filter, rgbxy_features
from nclib.losses import (
    DenseCRFLoss,
    KMeansLoss,
    NELLoss,
    NormalizedCutLoss,
    PartialCrossEntropy,
    densecrf_loss,
    kmeans_loss,
    nel_loss,
    normalized_cut_loss,
    partial_cross_entropy,
)
from nclib.photos import BUNDLED as PHOTOS
from nclib.photos import photo_tensor


def colour_probs(img: torch.Tensor, k: int = 3, temperature: float = 300.0) -> torch.Tensor:
    """Soft colour clustering of a photo: softmax of -|I - c_k|^2 / T for k centres picked from the image."""
    b, _, h, w = img.shape
    flat = img.flatten(2)
    order = flat.sum(1).argsort(dim=1)  # by brightness
    idx = order[:, ((torch.arange(k) + 0.5) / k * (h * w)).long()]  # (B, K) brightness quantiles
    centres = torch.gather(flat, 2, idx[:, None, :].expand(b, 3, k))  # (B, 3, K)
    d2 = (flat[:, :, None, :] - centres[..., None]).square().sum(1)  # (B, K, N)
    return torch.softmax(-d2 / temperature, dim=1).reshape(b, k, h, w)


def exact_nc(probs: torch.Tensor, img: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    f = rgbxy_features(img.double(), sigma_rgb, sigma_xy)
    ones = torch.ones_like(probs[:, :1], dtype=torch.float64)
    return normalized_cut(probs.double(), lambda v: exact_gaussian_filter(v, f), exact_gaussian_filter(ones, f))


# ------------------------------------------------------------------------------------------ NC value
# Measured lattice error on these crops (soft colour clustering, T = 3000): <= 2% except astronaut 48 px at
# sigma_xy 40 (+3.9%); the lattice's kernel is not exactly Gaussian. Near-degenerate segmentations (NC < 0.1, the
# almost uniform coffee crops) are compared in absolute terms: there ``cut = vol - assoc`` is a small difference of
# two ~1%-accurate numbers, so its relative error is ill-conditioned.
KNOWN_LATTICE_ERROR = {("astronaut", 48, 40.0)}


@pytest.mark.parametrize("size", [48, 64])
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("sigma_xy", [40.0, 100.0])  # the paper's Sec 5.1 and Sec 5.2 settings
def test_nc_matches_exact_dense_kernel(name, size, sigma_xy, request):
    if (name, size, sigma_xy) in KNOWN_LATTICE_ERROR:
        request.applymarker(pytest.mark.xfail(strict=True, reason="lattice kernel error 3.9% > 2.5% (measured)"))
    img = photo_tensor(name, crop=size)
    p = colour_probs(img, 3, temperature=3000.0)
    ours = float(normalized_cut_loss(p, img, sigma_rgb=15.0, sigma_xy=sigma_xy))
    ref = float(exact_nc(p, img, 15.0, sigma_xy))
    assert abs(ours - ref) <= 0.025 * max(ref, 0.1), (ours, ref)


def _two_colour(h: int, w: int, dr: float):
    ca, cb = np.array([100.0, 120.0, 140.0]), np.array([100.0 + dr, 120.0, 140.0])
    img = torch.zeros(1, 3, h, w, dtype=torch.float64)
    img[0, :, :, : w // 2] = torch.from_numpy(ca)[:, None, None]
    img[0, :, :, w // 2 :] = torch.from_numpy(cb)[:, None, None]
    s = torch.zeros(1, 2, h, w, dtype=torch.float64)
    s[0, 0, :, : w // 2] = 1
    s[0, 1, :, w // 2 :] = 1
    return img, s, ca, cb


def _closed_form_nc(h: int, w: int, sxy: float, srgb: float, ca, cb) -> float:
    """Crisp halves: cut and volumes factor into products of 1-D Gaussian sums (closed form of Eq. 4)."""

    def g(a, b):  # sum over coordinate pairs of exp(-(u - v)^2 / 2 sxy^2)
        return float(np.exp(-np.subtract.outer(a, b) ** 2 / (2 * sxy**2)).sum())

    ys, left, right = np.arange(h), np.arange(w // 2), np.arange(w // 2, w)
    colour = math.exp(-np.sum((ca - cb) ** 2) / (2 * srgb**2))
    cut = g(ys, ys) * g(left, right) * colour
    within = g(ys, ys) * g(left, left)  # the same for both halves by symmetry
    return 2 * cut / (cut + within)


@pytest.mark.parametrize("h,w,sxy,dr", [(12, 16, 6.0, 18.0), (32, 48, 20.0, 10.0), (24, 40, 100.0, 30.0)])
def test_nc_formula_closed_form_two_colour_image(h, w, sxy, dr):
    img, s, ca, cb = _two_colour(h, w, dr)
    f = rgbxy_features(img, 15.0, sxy)
    ones = torch.ones(1, 1, h, w, dtype=torch.float64)
    exact = float(normalized_cut(s, lambda v: exact_gaussian_filter(v, f), exact_gaussian_filter(ones, f)))
    assert exact == pytest.approx(_closed_form_nc(h, w, sxy, 15.0, ca, cb), rel=1e-10)


@pytest.mark.parametrize("sxy", [20.0, 100.0])
@pytest.mark.parametrize("dr", [0.0, 10.0, 18.0])
def test_nc_lattice_closed_form_two_colour_image(sxy, dr):
    """The lattice on a crisp piecewise-constant 64x64 image. Measured error up to 7.4% on this grid (and
    16-50% once the colours are 2 sigma_rgb apart or sigma_xy is 6 px and the cut is small): crisp edges in a
    two-point feature cloud are the lattice's worst case, far from the ~1% it reaches on photos with soft outputs."""
    img, s, ca, cb = _two_colour(64, 64, dr)
    ref = _closed_form_nc(64, 64, sxy, 15.0, ca, cb)
    ours = float(normalized_cut_loss(s.float(), img.float(), sigma_rgb=15.0, sigma_xy=sxy))
    assert abs(ours - ref) / ref <= 0.10, (ours, ref)


# ------------------------------------------------------------------------------------------ gradients
def test_autograd_gradient_equals_eq8_same_lattice():
    img = torch.cat([photo_tensor("astronaut", crop=40), photo_tensor("coffee", crop=40)])
    s = colour_probs(img).requires_grad_(True)
    normalized_cut_loss(s, img, sigma_xy=20.0).backward()
    lat = Permutohedral(rgbxy_features(img, 15.0, 20.0))
    with torch.no_grad():
        sd = s.detach()
        ls, lts, d = lat.filter(sd), lat.filter(sd, transpose=True), lat.norm()
        vol = (sd * d).sum((2, 3), keepdim=True)
        assoc = (sd * ls).sum((2, 3), keepdim=True)
        b = img.shape[0]
        # Eq. 8 with W = (L + L') / 2: the quadratic forms S'WS and S'LS are equal, so this W *is* the operator
        # the loss uses. (L itself is not symmetric: |LS - L'S| / |LS| is a few percent on photos.)
        ws = 0.5 * (ls + lts)
        eq8 = (assoc * d / vol**2 - 2 * ws / vol) / b
    assert float((s.grad - eq8).norm() / eq8.norm()) <= 1e-3
    assert float((s.grad - eq8).abs().max() / eq8.abs().max()) <= 1e-3


def test_gradient_matches_float64_finite_differences_exact_filter():
    img = photo_tensor("chelsea", crop=9).double()
    f = rgbxy_features(img, 15.0, 5.0)
    n = 81
    w = exact_gaussian_filter(torch.eye(n, dtype=torch.float64).reshape(1, n, 9, 9), f).reshape(n, n)  # dense W
    filt = lambda v: (v.flatten(2) @ w.T).reshape(v.shape)  # noqa: E731  (exact W v)
    d = filt(torch.ones(1, 1, 9, 9, dtype=torch.float64))
    s = colour_probs(img.float(), 3).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: normalized_cut(x, filt, d), (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_zero_gradient_at_scribbles(scale):
    img = photo_tensor("astronaut", crop=32)
    logits = torch.randn(1, 4, 32, 32, requires_grad=True)
    scr = torch.full((1, 32, 32), 255, dtype=torch.long)
    scr[0, 5:8, 3:25] = 1
    scr[0, 20, 4:30] = 3
    normalized_cut_loss(logits, img, scr, sigma_xy=20.0, scale=scale, from_logits=True).backward()
    g = logits.grad.abs().sum(1)[0]
    assert float(g[scr[0] != 255].max()) == 0.0
    assert float(g[scr[0] == 255].min()) > 0.0


def test_scribbles_clamped_inside_loss():
    img = photo_tensor("coffee", crop=24)
    p = colour_probs(img, 3)
    scr = torch.full((1, 24, 24), 255, dtype=torch.long)
    scr[0, 2:6, 2:20] = 2
    clamped = p.clone()
    clamped[0, :, 2:6, 2:20] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    assert float(normalized_cut_loss(p, img, scr, sigma_xy=10.0)) == pytest.approx(
        float(normalized_cut_loss(clamped, img, sigma_xy=10.0)), rel=1e-6
    )


# ------------------------------------------------------------------------------------------ scale / roi / batch
def test_roi_excludes_padding_exactly():
    img = photo_tensor("rocket", crop=32)
    p = colour_probs(img, 3)
    pad_img = F.pad(img, (0, 8, 0, 5))
    pad_p = F.pad(p, (0, 8, 0, 5), value=1.0 / 3)
    roi = torch.zeros(1, 37, 40, dtype=torch.bool)
    roi[:, :32, :32] = True
    for fn in (normalized_cut_loss, densecrf_loss):
        a = float(fn(p, img, sigma_xy=15.0))
        b = float(fn(pad_p, pad_img, sigma_xy=15.0, roi=roi))
        assert b == pytest.approx(a, rel=1e-5)
    assert float(kmeans_loss(pad_p, pad_img, roi)) == pytest.approx(float(kmeans_loss(p, img)), rel=1e-5)


def test_scale_equals_loss_on_resized_inputs():
    img = photo_tensor("chelsea", crop=40)
    p = colour_probs(img, 3)
    small_img = F.interpolate(img, size=(20, 20), mode="bilinear", align_corners=False)
    small_p = F.interpolate(p, size=(20, 20), mode="bilinear", align_corners=False)
    a = float(normalized_cut_loss(p, img, sigma_xy=30.0, scale=0.5))
    b = float(normalized_cut_loss(small_p, small_img, sigma_xy=15.0))
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 41, 37), (1, 3, 7, 9), (1, 2, 1, 6)])
def test_scale_gradient_equals_autograd_through_interpolate(shape):
    """At scale 0.5 the resize's backward is the CPU build's adjoint kernel: the gradient equals autograd through
    F.interpolate followed by the loss at the small size (odd sizes, a one-pixel axis)."""
    b, k, h, w = shape
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(b, 3, h, w, generator=gen) * 255
    p = torch.softmax(torch.randn(b, k, h, w, generator=gen), 1).requires_grad_(True)
    grad = torch.autograd.grad(normalized_cut_loss(p, img, sigma_xy=30.0, scale=0.5), p)[0]
    size = (max(1, round(h * 0.5)), max(1, round(w * 0.5)))
    small = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
    small_img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    ref = torch.autograd.grad(normalized_cut_loss(small, small_img, sigma_xy=15.0), p)[0]
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bad_probabilities_named_at_every_scale(scale):
    """Bad probabilities are named whatever the scale (the resize comes after the checks)."""
    img = torch.rand(1, 3, 21, 19) * 255
    p = torch.softmax(torch.randn(1, 3, 21, 19), 1)
    with pytest.raises(ValueError, match="must be probabilities in"):
        normalized_cut_loss(p * 3, img, scale=scale)
    with pytest.raises(ValueError, match="sum to 1"):
        normalized_cut_loss(p * 0.5, img, scale=scale)
    q = p.clone()
    q[0, 1, 20, 18] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        normalized_cut_loss(q, img, scale=scale)
    with pytest.raises(ValueError, match="contains NaN"):
        densecrf_loss(q, img, scale=scale)


def test_batch_mean_of_images():
    img = torch.cat([photo_tensor("astronaut", crop=32), photo_tensor("coffee", crop=32), photo_tensor("rocket", crop=32)])
    p = colour_probs(img, 3)
    batch = float(normalized_cut_loss(p, img, sigma_xy=20.0))
    singles = [float(normalized_cut_loss(p[i : i + 1], img[i : i + 1], sigma_xy=20.0)) for i in range(3)]
    assert batch == pytest.approx(sum(singles) / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------ edge cases
def test_edge_cases_finite_and_correct():
    img = photo_tensor("astronaut", crop=24)
    k = 4
    # absent class: exact zeros in one channel -> empty segment contributes 0 (crisp convention)
    p = colour_probs(img, 3)
    p4 = torch.cat([p, torch.zeros(1, 1, 24, 24)], 1).requires_grad_(True)
    v = normalized_cut_loss(p4, img, sigma_xy=10.0)
    v.backward()
    assert torch.isfinite(p4.grad).all()
    assert float(v.detach()) == pytest.approx(float(normalized_cut_loss(p, img, sigma_xy=10.0)), rel=1e-6)
    # one-class image: NC 0, dense-CRF 0, K-means = total colour variance per pixel
    one = torch.zeros(1, k, 24, 24)
    one[:, 1] = 1
    assert float(normalized_cut_loss(one, img)) == pytest.approx(0.0, abs=1e-6)
    assert float(densecrf_loss(one, img)) == pytest.approx(0.0, abs=1e-3)
    var = float(img[0].flatten(1).var(1, unbiased=False).sum())
    assert float(kmeans_loss(one, img)) == pytest.approx(var, rel=1e-5)
    # constant image: only the spatial kernel remains; compare with the exact kernel
    const = torch.full((1, 3, 24, 24), 77.0)
    pc = colour_probs(img, 3)
    ours = float(normalized_cut_loss(pc, const, sigma_xy=8.0))
    ref = float(exact_nc(pc, const, 15.0, 8.0))
    assert abs(ours - ref) / ref <= 0.025
    assert float(kmeans_loss(pc, const)) == pytest.approx(0.0, abs=1e-3)
    # all-ignore scribbles
    ign = torch.full((1, 24, 24), 255, dtype=torch.long)
    logits = torch.randn(1, k, 24, 24, requires_grad=True)
    loss = partial_cross_entropy(logits, ign)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().max()) == 0.0
    assert float(nel_loss(logits.detach().softmax(1), ign)) == 0.0
    assert torch.isfinite(normalized_cut_loss(logits, img, ign, from_logits=True))


def test_partial_cross_entropy_matches_manual():
    logits = torch.randn(2, 5, 6, 7)
    scr = torch.full((2, 6, 7), 255, dtype=torch.long)
    scr[0, 1, 2:5] = torch.tensor([0, 4, 2])
    scr[1, 3, 3] = 1
    logp = logits.log_softmax(1)
    manual = -(logp[0, 0, 1, 2] + logp[0, 4, 1, 3] + logp[0, 2, 1, 4] + logp[1, 1, 3, 3]) / 4
    assert float(partial_cross_entropy(logits, scr)) == pytest.approx(float(manual), rel=1e-6)
    assert float(PartialCrossEntropy()(logits, scr)) == pytest.approx(float(manual), rel=1e-6)


def test_nel_loss():
    p = torch.softmax(torch.randn(2, 4, 5, 5), 1)
    scr = torch.full((2, 5, 5), 255, dtype=torch.long)
    scr[0, 0, :4] = torch.tensor([0, 1, 2, 3])
    assert float(nel_loss(p[:1], scr[:1])) == 0.0  # every label present
    scr[1, 2, 2] = 2
    scr[1, 3, 3] = 0
    manual = (p[1, 1].mean() + p[1, 3].mean()) / 2  # image 0: nothing absent; image 1: labels 1, 3 absent
    assert float(NELLoss()(p, scr)) == pytest.approx(float(manual), rel=1e-6)


def test_kmeans_loss_matches_numpy():
    img = torch.cat([photo_tensor("coffee", crop=20), photo_tensor("rocket", crop=20)])
    p = colour_probs(img, 3, temperature=2000.0)
    ours = float(KMeansLoss()(p, img))
    vals = []
    for b in range(2):
        x = img[b].reshape(3, -1).T.double().numpy()
        s = p[b].reshape(3, -1).T.double().numpy()
        mu = (s.T @ x) / s.sum(0)[:, None]
        vals.append(sum((s[:, k] * ((x - mu[k]) ** 2).sum(1)).sum() for k in range(3)) / x.shape[0])
    assert ours == pytest.approx(float(np.mean(vals)), rel=1e-5)


def test_densecrf_loss_scale_and_rloss_gradient():
    """Value ~0.55x the exact-kernel one (the lattice's uncalibrated scale); logits gradient equal to rloss's
    ``-sum_k S_k' W S_k / N`` (same lattice), since the two differ by the constant ``sum(d) / N``."""
    img = photo_tensor("chelsea", crop=40)
    logits = (colour_probs(img, 3) * 4).requires_grad_(True)
    f = rgbxy_features(img.double(), 15.0, 20.0)
    p64 = logits.detach().softmax(1).double()
    wp = exact_gaussian_filter(p64, f)
    exact = float((p64 * (exact_gaussian_filter(torch.ones_like(wp[:, :1]), f) - wp)).sum() / 1600)
    ours = DenseCRFLoss(sigma_xy=20.0)(logits.softmax(1), img)
    assert 0.45 < float(ours.detach()) / exact < 0.65
    ours.backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    lat = Permutohedral(rgbxy_features(img, 15.0, 20.0))
    p = logits.softmax(1)
    (-(p * lat.filter(p)).sum() / 1600).backward()
    assert torch.allclose(g_ours, logits.grad, rtol=1e-4, atol=1e-7 * float(g_ours.abs().max()))


# ------------------------------------------------------------------------------------------ precision / input
def test_half_inputs_under_autocast_are_float32():
    img = photo_tensor("astronaut", crop=32)
    p = colour_probs(img, 3)
    ref = float(normalized_cut_loss(p, img, sigma_xy=20.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalized_cut_loss(p.bfloat16(), img.bfloat16(), sigma_xy=20.0)
        logits = torch.randn(1, 3, 32, 32).bfloat16()
        pce = partial_cross_entropy(logits, torch.zeros(1, 32, 32, dtype=torch.long))
    assert out.dtype == torch.float32 and pce.dtype == torch.float32
    assert float(out) == pytest.approx(ref, rel=2e-2)
    out16 = NormalizedCutLoss(sigma_xy=20.0)(p.half(), img.half())
    assert out16.dtype == torch.float32 and float(out16) == pytest.approx(ref, rel=2e-2)


def _bad_calls():
    img = photo_tensor("coffee", crop=16)
    p = colour_probs(img, 3)
    scr = torch.full((1, 16, 16), 255, dtype=torch.long)
    nan_p = p.clone()
    nan_p[0, 0, 0, 0] = float("nan")
    bad_scr = scr.clone()
    bad_scr[0, 0, 0] = 3
    yield "probs", lambda: normalized_cut_loss(p[:, :, :8], img)
    yield "probs", lambda: normalized_cut_loss(p * 2, img)
    yield "from_logits", lambda: normalized_cut_loss(p * 0.5, img)
    yield "NaN", lambda: normalized_cut_loss(nan_p, img)
    yield "images", lambda: normalized_cut_loss(p, img[:, :2])
    yield "images", lambda: normalized_cut_loss(p, img - 128)
    yield "images", lambda: kmeans_loss(p, torch.cat([img, img]))
    yield "scribbles", lambda: normalized_cut_loss(p, img, bad_scr)
    yield "scribbles", lambda: partial_cross_entropy(p, bad_scr)
    yield "scribbles", lambda: nel_loss(p, scr.float())
    yield "scribbles", lambda: nel_loss(p, scr[:, :8])
    yield "sigma_rgb", lambda: normalized_cut_loss(p, img, sigma_rgb=0)
    yield "sigma_xy", lambda: densecrf_loss(p, img, sigma_xy=-1.0)
    yield "scale", lambda: normalized_cut_loss(p, img, scale=2.0)
    yield "roi", lambda: normalized_cut_loss(p, img, roi=torch.ones(1, 8, 8, dtype=torch.bool))
    yield "inf", lambda: partial_cross_entropy(torch.full((1, 3, 16, 16), float("inf")), scr)


@pytest.mark.parametrize("case", range(16))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = list(_bad_calls())[case]
    with pytest.raises(ValueError, match=name):
        call()


# ------------------------------------------------------------------------ labels="present" and reduction
def present_scribbles(size: int) -> torch.Tensor:
    """Image 0: labels 1 and 3; image 1: labels 0, 2 and 4; image 2: label 2 only (NC over one label is 0)."""
    scr = torch.full((3, size, size), 255, dtype=torch.long)
    scr[0, 2, :6], scr[0, size - 3, :6] = 1, 3
    scr[1, 1, :5], scr[1, size // 2, 2:8], scr[1, size - 2, -5:] = 0, 2, 4
    scr[2, 3, :6] = 2
    return scr


def test_nc_present_equals_a_per_image_reference():
    size = 20
    img = torch.cat([photo_tensor(n, crop=size) for n in ("astronaut", "coffee", "chelsea")])
    logits = torch.randn(3, 5, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scr = present_scribbles(size)
    roi = torch.ones(3, size, size, dtype=torch.bool)
    roi[1, :, -4:] = False
    kw = dict(sigma_xy=10.0, roi=roi)
    got = normalized_cut_loss(logits, img, scr, from_logits=True, labels="present", reduction="none", **kw)
    # reference: per image, the paper's NC of the softmax over its present labels, scribbles relabelled 0..P-1
    want = []
    for i in range(3):
        present = sorted(set(scr[i][scr[i] != 255].tolist()))
        if len(present) < 2:
            want.append(torch.zeros(()))
            continue
        sub = torch.full_like(scr[i], 255)
        for j, c in enumerate(present):
            sub[scr[i] == c] = j
        p = torch.softmax(logits[i : i + 1, present], dim=1)
        want.append(normalized_cut_loss(p, img[i : i + 1], sub[None], sigma_xy=10.0, roi=roi[i : i + 1]))
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got[2].detach()) == 0.0 and bool((got[:2] > 0).all())
    # with probabilities: the renormalisation p_P / sum p_P, the same values
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(normalized_cut_loss(probs, img, scr, labels="present", reduction="none", **kw), got,
                               rtol=1e-5, atol=1e-6)
    # absent labels and the single-label image get no gradient; present labels do
    got.sum().backward()
    g = logits.grad.abs().sum(dim=(2, 3))
    assert bool((g[0, [0, 2, 4]] == 0).all()) and bool((g[0, [1, 3]] > 0).all())
    assert bool((g[1, [1, 3]] == 0).all()) and bool((g[2] == 0).all())


def test_nc_present_equals_all_when_every_label_is_present():
    size = 16
    img = torch.cat([photo_tensor(n, crop=size) for n in ("astronaut", "rocket")])
    p = colour_probs(img, 3)
    scr = torch.full((2, size, size), 255, dtype=torch.long)
    for c in range(3):
        scr[:, 2 + 5 * c, 3:9] = c
    for reduction in ("mean", "none"):
        a = normalized_cut_loss(p, img, scr, sigma_xy=10.0, reduction=reduction)
        b = normalized_cut_loss(p, img, scr, sigma_xy=10.0, labels="present", reduction=reduction)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reductions_agree():
    img = torch.cat([photo_tensor(n, crop=16) for n in ("astronaut", "coffee", "rocket")])
    p = colour_probs(img, 3)
    per = normalized_cut_loss(p, img, sigma_xy=10.0, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(normalized_cut_loss(p, img, sigma_xy=10.0, reduction="sum"), per.sum())
    torch.testing.assert_close(normalized_cut_loss(p, img, sigma_xy=10.0), per.mean())
    singles = torch.stack([normalized_cut_loss(p[i : i + 1], img[i : i + 1], sigma_xy=10.0) for i in range(3)])
    torch.testing.assert_close(per, singles, rtol=1e-5, atol=1e-6)
    module = NormalizedCutLoss(sigma_xy=10.0, reduction="none")
    torch.testing.assert_close(module(p, img), per)


def test_bad_labels_and_reduction_are_named():
    img = photo_tensor("coffee", crop=16)
    p = colour_probs(img, 3)
    scr = torch.full((1, 16, 16), 255, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be one of.*'some'"):
        normalized_cut_loss(p, img, scr, labels="some")
    with pytest.raises(ValueError, match="reduction must be one of.*'avg'"):
        normalized_cut_loss(p, img, reduction="avg")
    with pytest.raises(ValueError, match="labels='present' needs scribbles"):
        normalized_cut_loss(p, img, labels="present")
    with pytest.raises(ValueError, match="reduction"):
        NormalizedCutLoss(reduction="batch")
    with pytest.raises(TypeError):
        normalized_cut_loss(p, img, None, 15.0)  # options are keyword-only
