"""The permutohedral filter against the exact O(N^2) Gaussian, its adjoint, and its input checks."""
from __future__ import annotations

import pytest
import torch

from nclib.photos import BUNDLED as PHOTOS, photo_tensor
from nclib import Permutohedral, exact_gaussian_filter, gaussian_filter, rgbxy_features, xy_features
from nclib.lattice import relative_rms_error


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


@pytest.fixture(scope="module")
def astro():
    return photo_tensor("astronaut", crop=64)


def test_constant_input_gives_constant_normalized_output(astro):
    f = rgbxy_features(astro, 15.0, 10.0)
    out = gaussian_filter(torch.full((1, 2, 64, 64), 3.5), f, normalize=True)
    torch.testing.assert_close(out, torch.full_like(out, 3.5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("sigma_xy", [10.0, 30.0])
def test_normalized_photo_rgb_close_to_exact(name, sigma_xy):
    img = photo_tensor(name, crop=64)
    f = rgbxy_features(img, 15.0, sigma_xy)
    approx = gaussian_filter(img, f, normalize=True)
    exact = exact_gaussian_filter(img.double(), f.double(), normalize=True).float()
    assert relative_rms_error(approx, exact) < 0.04


def test_backward_is_exact_adjoint(astro):
    lat = Permutohedral(rgbxy_features(astro, 15.0, 10.0))
    x = torch.rand(1, 3, 64, 64)
    y = torch.rand(1, 3, 64, 64)
    lhs = dot64(lat.filter(x), y)
    rhs = dot64(x, lat.filter(y, transpose=True))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    # autograd runs the same transpose
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(lat.filter(xg), xg, y)
    torch.testing.assert_close(g, lat.filter(y, transpose=True), rtol=0, atol=0)
    # ...and the forward is not its own transpose, so the check above can tell a reverse-order blur apart
    assert abs(lhs - dot64(x, lat.filter(y))) > 10 * 1e-5 * abs(lhs)


@pytest.mark.parametrize("sigma_xy", [10.0, 30.0])
def test_forward_nearly_symmetric(astro, sigma_xy):
    lat = Permutohedral(rgbxy_features(astro, 15.0, sigma_xy))
    x, y = torch.rand(1, 4, 64, 64), torch.rand(1, 4, 64, 64)
    a, b = dot64(lat.filter(x), y), dot64(x, lat.filter(y))
    assert abs(a - b) <= 1e-3 * abs(a)


def test_gradcheck_linear_operator():
    img = photo_tensor("coffee", crop=8)
    f = rgbxy_features(img, 15.0, 3.0)
    v = torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    # The operator is linear, so a unit step gives the exact Jacobian up to float32 rounding inside the kernel.
    for normalize in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: gaussian_filter(t, f, normalize=normalize), (v,), eps=1.0, atol=1e-5, rtol=1e-4
        )


def test_end_to_end_against_finite_differences(astro):
    f = rgbxy_features(astro[..., :24, :24], 15.0, 5.0)
    lat = Permutohedral(f)
    w = torch.rand(1, 3, 24, 24, dtype=torch.float64)

    def h(x):
        s = torch.softmax(x, dim=1)
        return (w * lat.filter(s, normalize=True).double().square()).sum() + (s * lat.filter(s)).sum()

    x = torch.randn(1, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(h(x), x)
    for seed in range(3):
        d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        eps = 1e-2
        with torch.no_grad():
            fd = (h(x + eps * d) - h(x - eps * d)) / (2 * eps)
        ad = float((g * d).sum())
        assert abs(fd - ad) <= 2e-3 * abs(ad)


def test_batch_equals_single_calls():
    imgs = torch.cat([photo_tensor(n, crop=48) for n in PHOTOS])
    f = rgbxy_features(imgs, 15.0, 20.0)
    v = torch.rand(len(PHOTOS), 5, 48, 48)
    batched = gaussian_filter(v, f)
    singles = torch.cat([gaussian_filter(v[i : i + 1], f[i : i + 1]) for i in range(len(PHOTOS))])
    torch.testing.assert_close(batched, singles, rtol=0, atol=0)


@pytest.mark.parametrize("channels", [1, 3, 21, 64])
def test_any_channel_count(astro, channels):
    f = rgbxy_features(astro[..., :32, :32], 15.0, 10.0)
    lat = Permutohedral(f)
    # smooth values: blurred copies of the photo's channels
    v = astro[..., :32, :32].repeat(1, (channels + 2) // 3, 1, 1)[:, :channels]
    v = v * torch.linspace(0.5, 1.5, channels).view(1, -1, 1, 1)
    out = lat.filter(v, normalize=True)
    per_channel = torch.cat([lat.filter(v[:, c : c + 1], normalize=True) for c in range(channels)], dim=1)
    torch.testing.assert_close(out, per_channel, rtol=1e-6, atol=1e-4)
    exact = exact_gaussian_filter(v.double(), f.double(), normalize=True).float()
    assert relative_rms_error(out, exact) < 0.04


def test_large_coordinates_small_sigma():
    # a 4 x 4000 strip: x reaches 4000 px with sigma_xy = 2 px, so features reach 2000 sigmas
    torch.manual_seed(1)
    x = torch.linspace(0, 6.28 * 20, 4000)
    row = torch.stack([128 + 100 * torch.sin(x), 128 + 100 * torch.cos(x / 3), torch.full_like(x, 90.0)])
    img = row[:, None, :].repeat(1, 4, 1)[None]
    f = rgbxy_features(img, 10.0, 2.0)
    assert f[:, 0].max() > 1999
    approx = gaussian_filter(img, f, normalize=True)
    exact = exact_gaussian_filter(img.double(), f.double(), normalize=True).float()
    assert relative_rms_error(approx, exact) < 0.04


def test_noncontiguous_and_channels_last(astro):
    f = rgbxy_features(astro, 15.0, 10.0)
    v = torch.rand(1, 6, 64, 64)
    ref = gaussian_filter(v, f)
    torch.testing.assert_close(gaussian_filter(v.contiguous(memory_format=torch.channels_last), f), ref)
    torch.testing.assert_close(
        gaussian_filter(v, f.contiguous(memory_format=torch.channels_last)), ref, rtol=0, atol=0
    )
    wide = torch.rand(1, 6, 64, 128)[..., ::2]  # strided view
    assert not wide.is_contiguous()
    torch.testing.assert_close(gaussian_filter(wide, f), gaussian_filter(wide.contiguous(), f), rtol=0, atol=0)


def test_roi_excludes_pixels(astro):
    f = rgbxy_features(astro[..., :32, :32], 15.0, 10.0)
    roi = torch.ones(1, 32, 32, dtype=torch.bool)
    roi[:, :, 20:] = False
    v = astro[..., :32, :32].clone()  # a smooth signal (white noise is 15-30% off on any lattice)
    lat = Permutohedral(f, roi=roi)
    out = lat.filter(v, normalize=True)
    assert bool((out[..., 20:] == 0).all())
    v2 = v.clone()
    v2[..., 20:] = 1e3  # values outside the roi must not leak in
    torch.testing.assert_close(lat.filter(v2, normalize=True), out, rtol=0, atol=0)
    exact = exact_gaussian_filter(v.double(), f.double(), normalize=True, roi=roi).float()
    assert relative_rms_error(out[..., :20], exact[..., :20]) < 0.04


def test_dtypes_round_trip(astro):
    f = rgbxy_features(astro, 15.0, 10.0)
    v = torch.rand(1, 3, 64, 64)
    ref = gaussian_filter(v, f)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        out = gaussian_filter(v.to(dt), f.to(dt))
        assert out.dtype == dt
        tol = 1e-6 if dt == torch.float64 else 2e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_deterministic_across_threads(astro):
    f = rgbxy_features(astro, 15.0, 30.0)
    v = torch.rand(1, 21, 64, 64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gaussian_filter(v, f)
        torch.set_num_threads(2)
        two = gaussian_filter(v, f)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_features_get_no_gradient(astro):
    f = rgbxy_features(astro, 15.0, 10.0).requires_grad_()
    v = torch.rand(1, 2, 64, 64, requires_grad=True)
    gaussian_filter(v, f, normalize=True).sum().backward()
    assert f.grad is None and v.grad is not None


def test_xy_features_and_occupancy(astro):
    f = xy_features(astro, 4.0)
    assert f.shape == (1, 2, 64, 64)
    torch.testing.assert_close(f[0, 0, 3, 5], torch.tensor(5 / 4.0))
    torch.testing.assert_close(f[0, 1, 3, 5], torch.tensor(3 / 4.0))
    lat = Permutohedral(rgbxy_features(astro, 15.0, 100.0))
    assert 0 < lat.num_vertices < 64 * 64
    assert int(lat.vertices_per_image.sum()) == lat.num_vertices


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, v: gaussian_filter(v[0], f), "values must have shape"),
        (lambda f, v: gaussian_filter(v[..., :10], f), "share batch and spatial size"),
        (lambda f, v: gaussian_filter(v, f[..., :10]), "share batch and spatial size"),
        (lambda f, v: gaussian_filter(v.masked_fill(v > 0.5, float("nan")), f), "values contains NaN"),
        (lambda f, v: gaussian_filter(v, f.masked_fill(f == f.max(), float("inf"))), "features contains inf"),
        (lambda f, v: gaussian_filter(v[..., :0], f[..., :0]), "empty"),
        (lambda f, v: gaussian_filter(v, f.repeat(1, 4, 1, 1)), "1..16 channels"),
        (lambda f, v: gaussian_filter((v * 10).long(), f), "floating"),
        (lambda f, v: gaussian_filter(v, f * 1e6), "overflow int32"),
        (lambda f, v: Permutohedral(f).filter(v[:, :, :8]), "like the features"),
        (lambda f, v: Permutohedral(f, roi=torch.ones(1, 8, 8, dtype=torch.bool)), "roi must have shape"),
        (lambda f, v: rgbxy_features(v[:, :2] * 255, 15.0, 10.0), "3 \\(RGB\\) channels"),
        (lambda f, v: rgbxy_features(v * 255, 0.0, 10.0), "sigma_rgb must be"),
        (lambda f, v: rgbxy_features(v * 255, 15.0, -1.0), "sigma_xy must be"),
    ],
)
def test_bad_input_is_a_clear_value_error(astro, call, match):
    f = rgbxy_features(astro[..., :16, :16], 15.0, 10.0)
    v = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=match):
        call(f, v)
