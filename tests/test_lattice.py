"""The permutohedral filter against the exact O(N^2) Gaussian, its adjoint, its state and its input checks.

Property tests take the ``device`` fixture (tests/conftest.py): CPU, and CUDA where a GPU is present.
"""
from __future__ import annotations

import pytest
import torch

from nclib import Permutohedral, exact_gaussian_filter, gaussian_filter, rgbxy_features, xy_features
from nclib.lattice import LatticeState, from_pixel_major, relative_rms_error, to_pixel_major
from nclib.photos import BUNDLED as PHOTOS
from nclib.photos import photo_tensor


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


@pytest.fixture(scope="module")
def astro():
    return photo_tensor("astronaut", crop=64)


def test_constant_input_gives_constant_normalized_output(astro, device):
    f = rgbxy_features(astro.to(device), 15.0, 10.0)
    out = gaussian_filter(torch.full((1, 2, 64, 64), 3.5, device=device), f, normalize=True)
    torch.testing.assert_close(out, torch.full_like(out, 3.5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("sigma_xy", [10.0, 30.0])
def test_normalized_photo_rgb_close_to_exact(name, sigma_xy, device):
    img = photo_tensor(name, crop=64).to(device)
    f = rgbxy_features(img, 15.0, sigma_xy)
    approx = gaussian_filter(img, f, normalize=True)
    exact = exact_gaussian_filter(img.double(), f.double(), normalize=True).float()
    assert relative_rms_error(approx, exact) < 0.04


def test_backward_is_exact_adjoint(astro, device):
    lat = Permutohedral(rgbxy_features(astro.to(device), 15.0, 10.0))
    x = torch.rand(1, 3, 64, 64, device=device)
    y = torch.rand(1, 3, 64, 64, device=device)
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
def test_forward_nearly_symmetric(astro, sigma_xy, device):
    lat = Permutohedral(rgbxy_features(astro.to(device), 15.0, sigma_xy))
    x, y = torch.rand(1, 4, 64, 64, device=device), torch.rand(1, 4, 64, 64, device=device)
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


def test_batch_equals_single_calls(device):
    imgs = torch.cat([photo_tensor(n, crop=48) for n in PHOTOS]).to(device)
    f = rgbxy_features(imgs, 15.0, 20.0)
    v = torch.rand(len(PHOTOS), 5, 48, 48, device=device)
    batched = gaussian_filter(v, f)
    singles = torch.cat([gaussian_filter(v[i : i + 1], f[i : i + 1]) for i in range(len(PHOTOS))])
    torch.testing.assert_close(batched, singles, rtol=0, atol=0)


@pytest.mark.parametrize("channels", [1, 3, 21, 64])
def test_any_channel_count(astro, channels, device):
    img = astro[..., :32, :32].to(device)
    f = rgbxy_features(img, 15.0, 10.0)
    lat = Permutohedral(f)
    # smooth values: blurred copies of the photo's channels
    v = img.repeat(1, (channels + 2) // 3, 1, 1)[:, :channels]
    v = v * torch.linspace(0.5, 1.5, channels, device=device).view(1, -1, 1, 1)
    out = lat.filter(v, normalize=True)
    per_channel = torch.cat([lat.filter(v[:, c : c + 1], normalize=True) for c in range(channels)], dim=1)
    torch.testing.assert_close(out, per_channel, rtol=1e-6, atol=1e-4)
    exact = exact_gaussian_filter(v.double(), f.double(), normalize=True).float()
    assert relative_rms_error(out, exact) < 0.04


@pytest.mark.parametrize("threads", [1, 3])
def test_each_channel_filtered_alone_bitwise(threads):
    """The CPU kernels' vertex rows are padded to 8-float blocks and loaded whole (1..8, 9..16, 17..24, 25..32
    channels) or in masked vectors (one channel, more than 32); 3 threads on a batch of 3 splat one image per task,
    on a batch of 1 three tasks share the image's vertices. Every way gives each channel the very floats it gets
    alone. The roi leaves out the first
    rows of image 0 (its first vertex is not pixel 0's) and all of image 1 (it owns no vertex)."""
    imgs = torch.cat([photo_tensor(n, crop=40) for n in PHOTOS[:3]])
    roi = torch.ones(3, 40, 40, dtype=torch.bool)
    roi[0, :5], roi[1] = False, False
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for batch in (slice(0, 3), slice(2, 3)):
            lat = Permutohedral(rgbxy_features(imgs[batch], 15.0, 10.0), roi[batch])
            pixels = lat.state.vertex_ids.shape[0]
            for channels in (5, 8, 9, 16, 17, 21, 24, 25, 32, 33, 40):
                v = torch.rand(pixels, channels, generator=torch.Generator().manual_seed(channels))
                out = lat.apply_pixel_major(v)
                for c in range(channels):
                    assert torch.equal(out[:, c], lat.apply_pixel_major(v[:, c : c + 1].contiguous())[:, 0]), \
                        (channels, c)
    finally:
        torch.set_num_threads(old)


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


def test_noncontiguous_and_channels_last(astro, device):
    f = rgbxy_features(astro.to(device), 15.0, 10.0)
    v = torch.rand(1, 6, 64, 64, device=device)
    ref = gaussian_filter(v, f)
    torch.testing.assert_close(gaussian_filter(v.contiguous(memory_format=torch.channels_last), f), ref)
    torch.testing.assert_close(
        gaussian_filter(v, f.contiguous(memory_format=torch.channels_last)), ref, rtol=0, atol=0
    )
    wide = torch.rand(1, 6, 64, 128, device=device)[..., ::2]  # strided view
    assert not wide.is_contiguous()
    torch.testing.assert_close(gaussian_filter(wide, f), gaussian_filter(wide.contiguous(), f), rtol=0, atol=0)


def test_roi_excludes_pixels(astro, device):
    f = rgbxy_features(astro[..., :32, :32].to(device), 15.0, 10.0)
    roi = torch.ones(1, 32, 32, dtype=torch.bool, device=device)
    roi[:, :, 20:] = False
    v = astro[..., :32, :32].to(device)  # a smooth signal (white noise is 15-30% off on any lattice)
    lat = Permutohedral(f, roi=roi)
    out = lat.filter(v, normalize=True)
    assert bool((out[..., 20:] == 0).all())
    v2 = v.clone()
    v2[..., 20:] = 1e3  # values outside the roi must not leak in
    torch.testing.assert_close(lat.filter(v2, normalize=True), out, rtol=0, atol=0)
    exact = exact_gaussian_filter(v.double(), f.double(), normalize=True, roi=roi).float()
    assert relative_rms_error(out[..., :20], exact[..., :20]) < 0.04


def test_dtypes_round_trip(astro, device):
    f = rgbxy_features(astro.to(device), 15.0, 10.0)
    v = torch.rand(1, 3, 64, 64, device=device)
    ref = gaussian_filter(v, f)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        out = gaussian_filter(v.to(dt), f.to(dt))
        assert out.dtype == dt
        tol = 1e-6 if dt == torch.float64 else 2e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_float16_overflow_is_named_not_inf(astro):
    """Unnormalized sums over a wide kernel leave float16's range: a named error, never a silent inf."""
    lat = Permutohedral(rgbxy_features(astro, 1e4, 1e4))  # one kernel over the whole image: W 1 ~ #pixels
    v = torch.full((1, 2, 64, 64), 60.0, dtype=torch.float16)
    assert float(lat.filter(v.float()).max()) > 65504  # the float32 result really is out of float16's range
    with pytest.raises(ValueError, match="float16"):
        lat.filter(v)
    out = lat.filter(v, normalize=True)  # normalized: in range, returned as float16
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


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


def test_symmetric_filter_deterministic_across_threads(astro):
    """The fused (L + L') v and its degree do not depend on the thread count (1 thread: one splat task per image;
    3 threads: each image's vertices split between tasks), with a batch of two images."""
    f = rgbxy_features(torch.cat([astro, astro.flip(-1)]), 15.0, 30.0)
    v = torch.rand(f.shape[0], 21, *f.shape[2:], generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            lat = Permutohedral(f)
            runs.append((lat.apply_symmetric(v), lat.norm()))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_features_get_no_gradient(astro, device):
    f = rgbxy_features(astro.to(device), 15.0, 10.0).requires_grad_()
    v = torch.rand(1, 2, 64, 64, device=device, requires_grad=True)
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


def test_features_are_float32_whatever_the_image_dtype():
    # bf16 holds integers exactly only up to 256: at 2000 px, coordinates in the image's dtype were up to 4 px off
    img = (torch.rand(1, 3, 2, 2000) * 255).round().to(torch.bfloat16)
    x = torch.arange(2000, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8):
        im = img.to(dtype)
        want = torch.float64 if dtype == torch.float64 else torch.float32  # float64 kept for exact references
        f1 = xy_features(im, 1.0)
        assert f1.dtype == want
        assert torch.equal(f1[0, 0, 1].double(), x) and torch.equal(f1[0, 1, :, 7].double(), torch.tensor([0.0, 1.0]))
        f = rgbxy_features(im, 15.0, 80.0)
        assert f.dtype == want
        assert float((f[0, 0, 0].double() * 80 - x).abs().max()) < 2e-4  # float32 rounding of x / 80, no more
        torch.testing.assert_close(f[:, 2:].double() * 15, im.double(), rtol=1e-6, atol=0)


def test_lattice_state_fields(astro):
    imgs = torch.cat([astro[..., :24, :24], photo_tensor("coffee", crop=24)])
    roi = torch.ones(2, 24, 24, dtype=torch.bool)
    roi[1, 20:] = False
    lat = Permutohedral(rgbxy_features(imgs, 15.0, 10.0), roi=roi)
    st = lat.state
    assert isinstance(st, LatticeState) and st._fields == (
        "vertex_ids", "barycentric", "neighbors", "splat_ptr", "splat_entries", "vertices_per_image"
    )
    p, d1, v = 2 * 24 * 24, 6, lat.num_vertices
    assert st.vertex_ids.shape == (p, d1) and st.vertex_ids.dtype == torch.int32
    assert st.barycentric.shape == (p, d1) and st.barycentric.dtype == torch.float32
    assert st.neighbors.shape == (v, d1, 2) and st.neighbors.dtype == torch.int32
    assert st.vertices_per_image.tolist() == lat.vertices_per_image.tolist() and int(st.vertices_per_image.sum()) == v
    inside = roi.reshape(-1)
    # barycentric coordinates: non-negative, summing to 1 inside the roi; nothing outside
    assert bool((st.barycentric >= 0).all())
    torch.testing.assert_close(st.barycentric[inside].double().sum(1), torch.ones(int(inside.sum()), dtype=torch.float64))
    assert bool((st.vertex_ids[~inside] == -1).all()) and bool((st.barycentric[~inside] == 0).all())
    # image b owns the id range [sum of earlier counts, + its count); neighbours stay inside it
    v0 = int(st.vertices_per_image[0])
    ids = st.vertex_ids.reshape(2, 24 * 24, d1)
    assert 0 <= int(ids[0].min()) and int(ids[0].max()) == v0 - 1
    assert int(ids[1][ids[1] >= 0].min()) == v0 and int(ids[1].max()) == v - 1
    nb = st.neighbors.long()
    assert bool(((nb[:v0] < v0) & (nb[:v0] >= -1)).all()) and bool(((nb[v0:] >= v0) | (nb[v0:] == -1)).all())


def test_roi_none_is_every_pixel(astro, device):
    f = rgbxy_features(astro.to(device), 15.0, 10.0)
    every = torch.ones(1, 64, 64, dtype=torch.bool, device=device)
    a, b = Permutohedral(f, roi=None), Permutohedral(f, roi=every)
    assert a.roi is None
    for name in LatticeState._fields:
        assert torch.equal(getattr(a.state, name), getattr(b.state, name)), name
    v = torch.rand(1, 3, 64, 64, device=device)
    assert torch.equal(a.filter(v), b.filter(v))
    assert torch.equal(gaussian_filter(v, f, roi=None), a.filter(v))
    part = every.clone()
    part[..., 40:] = False  # and a real roi does change the operator (the comparison above can fail)
    assert not torch.equal(Permutohedral(f, roi=part).filter(v), a.filter(v))


def test_kind_must_match_the_features_device(astro):
    f = rgbxy_features(astro[..., :8, :8], 15.0, 10.0)
    assert Permutohedral(f).kind == "cpu"
    with pytest.raises(ValueError, match="kind must be one of"):
        Permutohedral(f, kind="gpu")
    with pytest.raises(ValueError, match="features' device"):
        Permutohedral(f, kind="cuda")


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


def test_symmetric_filter_from_one_splat_equals_two_filter_calls(astro):
    """``apply_symmetric`` (the fused CPU kernel on NCHW memory; two calls on other builds) is ``L v + L' v`` as the
    standard filter computes them (to float rounding: one slice of the summed blurs), with a roi and a batch."""
    img = torch.cat([astro, astro.flip(-1)])
    roi = torch.ones(2, *img.shape[-2:], dtype=torch.bool)
    roi[0, :, -4:] = False
    for kind in ("cpu", "cuda-emulation"):
        lat = Permutohedral(rgbxy_features(img, 15.0, 10.0), roi=roi, kind=kind)
        v = torch.rand(2, 7, *img.shape[-2:], generator=torch.Generator().manual_seed(0))
        fwd, adj = lat.filter(v), lat.filter(v, transpose=True)
        assert float((fwd - adj).abs().max()) > 1e-3 * float(fwd.abs().max())  # L is not symmetric
        fresh = Permutohedral(rgbxy_features(img, 15.0, 10.0), roi=roi, kind=kind)
        torch.testing.assert_close(fresh.apply_symmetric(v), fwd + adj, rtol=1e-6, atol=1e-6)
        degree = lat.filter(torch.ones(2, 1, *img.shape[-2:]))
        torch.testing.assert_close(fresh.norm(), degree, rtol=1e-6, atol=0.0)  # came with the fused splat
        torch.testing.assert_close(lat.apply_symmetric(v), fwd + adj, rtol=1e-6, atol=1e-6)


def test_nchw_and_pixel_major_filters_are_bitwise_equal(astro):
    """The CPU kernel reading / writing NCHW (``filter``, ``apply_symmetric``) gathers each pixel's channels
    before the splat and scatters them after the slice: the same floats in the same order as on pixel-major
    memory (``apply_pixel_major``), so the layouts agree bit for bit, with a roi, a batch and C > 16 (the
    vector width)."""
    img = torch.cat([astro, astro.flip(-1)])
    roi = torch.ones(2, *img.shape[-2:], dtype=torch.bool)
    roi[1, :5] = False
    lat = Permutohedral(rgbxy_features(img, 15.0, 10.0), roi=roi)
    v = torch.rand(2, 21, *img.shape[-2:], generator=torch.Generator().manual_seed(2))
    pm = to_pixel_major(v)
    for transpose in (False, True):
        ref = from_pixel_major(lat.apply_pixel_major(pm, transpose=transpose), v.shape)
        assert torch.equal(lat.filter(v, transpose=transpose), ref)
    assert float(lat.filter(v)[1, :, :5].abs().max()) == 0.0  # outside the roi: 0


def test_pixel_major_filter_into_a_reused_buffer(astro):
    """``apply_pixel_major(..., out=)`` (the dense CRF's loop) writes the same floats as a fresh result, also when
    the buffer held another lattice's output and the kernel's kept scratch served a larger lattice in between;
    a buffer of the wrong shape or dtype, or ``values`` itself, is refused by name."""
    small = Permutohedral(rgbxy_features(astro[..., :32, :32], 15.0, 10.0))
    big = Permutohedral(rgbxy_features(astro, 5.0, 60.0))
    v = torch.rand(64 * 64, 21, generator=torch.Generator().manual_seed(3))
    buf = torch.full_like(v, float("nan"))
    for transpose in (False, True):
        ref = big.apply_pixel_major(v, transpose=transpose)
        small.apply_pixel_major(v[: 32 * 32].contiguous())
        assert big.apply_pixel_major(v, transpose=transpose, out=buf) is buf
        assert torch.equal(buf, ref)
    for bad in (torch.empty(64 * 64, 20), torch.empty(64 * 64, 21, dtype=torch.float64), v):
        with pytest.raises(ValueError, match="out must be"):
            big.apply_pixel_major(v, out=bad)


@pytest.mark.parametrize("shape", [(2, 21, 37, 53), (1, 3, 8, 8), (3, 130, 2, 3), (1, 2, 1, 1), (2, 1, 5, 7)])
def test_pixel_major_layout_round_trip(shape):
    """``to_pixel_major`` / ``from_pixel_major`` (the CPU build's blocked transpose for float32, torch's copy
    otherwise) equal torch's permute exactly: odd sizes not a multiple of the 64-pixel block, more channels than
    pixels (the kernel's other blocking), one channel; float64 input is converted, a tensor that requires grad
    keeps its graph, and ``out=`` is written (a wrong buffer is refused by name)."""
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    b, c, h, w = shape
    ref = v.permute(0, 2, 3, 1).reshape(b * h * w, c)
    pm = to_pixel_major(v)
    assert pm.is_contiguous() and torch.equal(pm, ref)
    assert torch.equal(from_pixel_major(pm, shape), v)
    assert torch.equal(to_pixel_major(v.double()), ref)
    g = v.clone().requires_grad_(True)
    to_pixel_major(g).mul(torch.arange(c, dtype=torch.float32)).sum().backward()
    assert torch.equal(g.grad, torch.arange(c, dtype=torch.float32).view(1, c, 1, 1).expand(shape))
    buf = torch.full((b * h * w, c), float("nan"))
    assert to_pixel_major(v, out=buf) is buf and torch.equal(buf, ref)
    cl = v.contiguous(memory_format=torch.channels_last)  # pixel-major already: out= still copies
    assert torch.equal(to_pixel_major(cl, out=torch.empty(b * h * w, c)), ref)
    with pytest.raises(ValueError, match="out must be"):
        to_pixel_major(v, out=torch.empty(b * h * w, c + 1))
