"""Dense CRF mean field against pydensecrf (when installed) and against an exact-kernel mean field."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nclib.crf import dense_crf
from nclib.lattice import exact_gaussian_filter, rgbxy_features, xy_features
from nclib.photos import BUNDLED as PHOTOS
from nclib.photos import photo


def resized_photo(name: str, size: int) -> torch.Tensor:
    img = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float()
    return F.interpolate(img, size=(size, size), mode="area").round().clamp(0, 255)


def network_like_probs(img: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Coarse, noisy class scores upsampled 8x like a DeepLab output: colour clusters plus smooth noise."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = img.shape
    flat = img.flatten(2)
    idx = flat.sum(1).argsort(1)[:, ((torch.arange(k) + 0.5) / k * h * w).long()]
    centres = torch.gather(flat, 2, idx[:, None, :].expand(b, 3, k))
    d2 = (flat[:, :, None, :] - centres[..., None]).square().sum(1).reshape(b, k, h, w)
    logits = -d2 / 2000 + 7.5 * F.avg_pool2d(torch.randn(b, k, h, w, generator=g), 5, 1, 2)
    return F.interpolate(F.avg_pool2d(logits, 8), size=(h, w), mode="bilinear", align_corners=False).softmax(1)


def pydensecrf_labels(p: torch.Tensor, img: torch.Tensor, normalization, iterations: int = 10) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = p.shape[1:]
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p[0].numpy())))
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).numpy().astype(np.uint8))
    d.addPairwiseGaussian(sxy=3, compat=3, normalization=normalization)
    d.addPairwiseBilateral(sxy=121, srgb=5, rgbim=rgb, compat=4, normalization=normalization)
    return np.array(d.inference(iterations)).reshape(k, h, w).argmax(0)


@pytest.mark.parametrize("name", PHOTOS)
def test_matches_pydensecrf_labels(name):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    img = resized_photo(name, 160)
    p = network_like_probs(img, 6)
    for ours_mode, theirs in (("symmetric", dcrf.NORMALIZE_SYMMETRIC), ("none", dcrf.NO_NORMALIZATION)):
        ref = pydensecrf_labels(p, img, theirs)
        ours = dense_crf(p, img, normalization=ours_mode)[0].argmax(0).numpy()
        assert (p[0].argmax(0).numpy() != ref).mean() > 0.1  # the CRF really changes the labelling
        assert (ours == ref).mean() >= 0.95


def test_matches_pydensecrf_21_labels_321():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as dcrf

    img = resized_photo("astronaut", 321)
    p = network_like_probs(img, 21, seed=1)
    ref = pydensecrf_labels(p, img, dcrf.NORMALIZE_SYMMETRIC)
    assert (dense_crf(p, img)[0].argmax(0).numpy() == ref).mean() >= 0.95


def exact_mean_field(p, img, iterations, bi_w, bi_xy, bi_rgb, pos_w, pos_xy):
    """Textbook mean field with exact Gaussian kernels, per-pixel normalized (DeepLab's densecrf 1.x)."""
    u = torch.log(p.double().clamp_min(1e-5))
    fa = rgbxy_features(img.double(), bi_rgb, bi_xy)
    fs = xy_features(img.double(), pos_xy)
    q = u.softmax(1)
    for _ in range(iterations):
        m = u + bi_w * exact_gaussian_filter(q, fa, normalize=True)
        m = m + pos_w * exact_gaussian_filter(q, fs, normalize=True)
        q = m.softmax(1)
    return q


def test_matches_exact_kernel_mean_field():
    img = resized_photo("chelsea", 48)
    p = network_like_probs(img, 4, seed=3)
    params = dict(bi_w=4.0, bi_xy=20.0, bi_rgb=10.0, pos_w=3.0, pos_xy=3.0)
    ref = exact_mean_field(p, img, 5, **params)[0].argmax(0)
    ours = dense_crf(
        p, img, 5, bi_w=4.0, bi_xy_std=20.0, bi_rgb_std=10.0, pos_w=3.0, pos_xy_std=3.0, normalization="after"
    )[0].argmax(0)
    assert float((p[0].argmax(0) != ref).float().mean()) > 0.05
    assert float((ours == ref).float().mean()) >= 0.95


def test_batched_any_k_and_zero_iterations():
    img = torch.cat([resized_photo("coffee", 40), resized_photo("rocket", 40)])
    for k in (1, 2, 25):
        p = network_like_probs(img, k)
        q = dense_crf(p, img, iterations=3)
        assert q.shape == p.shape and torch.isfinite(q).all()
        assert torch.allclose(q.sum(1), torch.ones(2, 40, 40), atol=1e-5)
        for i in range(2):
            qi = dense_crf(p[i : i + 1], img[i : i + 1], iterations=3)
            assert torch.allclose(q[i : i + 1], qi, atol=1e-5)
    p = network_like_probs(img, 3)
    q0 = dense_crf(p, img, iterations=0)
    assert torch.allclose(q0, p.clamp_min(1e-5) / p.clamp_min(1e-5).sum(1, keepdim=True), atol=1e-6)


def test_repeated_calls_share_no_state():
    """A later call (same shape, another shape, then the first again) neither changes an earlier result nor is
    changed by the calls before it; the caller's probabilities are never written, also when they are
    channels_last (already pixel-major: the unary is computed in place in a copy)."""
    img = torch.cat([resized_photo("coffee", 40), resized_photo("rocket", 40)])
    p = network_like_probs(img, 5)
    p_keep = p.clone()
    first = dense_crf(p, img, iterations=3)
    kept = first.clone()
    other = dense_crf(p.flip(-1), img.flip(-1), iterations=3)
    dense_crf(p[:1, :, :24], img[:1, :, :24], iterations=3)  # another shape in between
    again = dense_crf(p, img, iterations=3)
    assert torch.equal(first, kept) and torch.equal(again, first) and not torch.equal(other, first)
    cl = p.contiguous(memory_format=torch.channels_last)
    assert torch.equal(dense_crf(cl, img, iterations=3), first)
    assert torch.equal(p, p_keep) and torch.equal(cl, p_keep)


def test_roi_pixels_do_not_influence_inside():
    img = resized_photo("astronaut", 40)
    p = network_like_probs(img, 3)
    pad_img = F.pad(img, (0, 6, 0, 6), value=255.0)
    pad_p = F.pad(p, (0, 6, 0, 6), value=1.0 / 3)
    roi = torch.zeros(1, 46, 46, dtype=torch.bool)
    roi[:, :40, :40] = True
    a = dense_crf(p, img, 5)
    b = dense_crf(pad_p, pad_img, 5, roi=roi)[..., :40, :40]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(iterations=-1), "iterations"),
        (dict(bi_xy_std=0.0), "bi_xy_std"),
        (dict(bi_rgb_std=-2.0), "bi_rgb_std"),
        (dict(pos_xy_std=0.0), "pos_xy_std"),
        (dict(bi_w=-1.0), "bi_w"),
        (dict(normalization="l2"), "normalization"),
    ],
)
def test_bad_arguments(kwargs, name):
    img = resized_photo("coffee", 16)
    p = network_like_probs(img, 3)
    with pytest.raises(ValueError, match=name):
        dense_crf(p, img, **kwargs)


def test_bad_tensors():
    img = resized_photo("coffee", 16)
    p = network_like_probs(img, 3)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(p * 3, img)
    with pytest.raises(ValueError, match="images"):
        dense_crf(p, img[..., :8])
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(p, img * float("nan"))


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_cpu_update_matches_softmax_formula(threads):
    """The CPU build's one-pass mean-field update (vectorised exp, blocked rows) against the formula in float64:
    ``out_i = pre_i * softmax(unary + sum_j post_j * filtered_j)``, including rows far below exp's range, rows
    that overflow without the max subtraction, K not a multiple of the vector width, and a partial last block."""
    from nclib import _ext

    _ext.load("cpu")
    g = torch.Generator().manual_seed(0)
    p, k = 1000 + 37, 21
    unary = torch.log(torch.rand(p, k, generator=g).clamp_min(1e-5))
    unary[:5] -= 300.0  # exp(-300) underflows float32: the max subtraction must keep the row
    filtered = [torch.rand(p, k, generator=g) * 40, torch.rand(p, k, generator=g)]
    post = [torch.rand(p, 1, generator=g) * 5, torch.rand(p, 1, generator=g)]  # messages up to ~200: exp overflows
    pre = [torch.rand(p, 1, generator=g), torch.ones(p, 1)]
    out = [torch.empty(p, k), torch.empty(p, k)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.ops.nclib_meanfield.update(unary, filtered, post, pre, out)
    finally:
        torch.set_num_threads(old)
    m = unary.clone()  # the message in float32 as the kernel sums it; its rounding (~1e-5 at 200) is not the
    for po, f in zip(post, filtered):  # update's error, so the softmax of it is taken in float64
        m = m + po * f
    q = m.double().softmax(1)
    for pr, o in zip(pre, out):
        ref = pr.double() * q
        assert torch.isfinite(o).all()
        assert float((o.double() - ref).abs().max()) <= 5e-7 * float(ref.abs().max())


def dense_box_gaussian(values: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Reference in float64: the dense (HW, HW) matrix exp(-|x_i - x_j|^2 / (2 sigma^2)) on |dx|, |dy| <= radius."""
    b, c, h, w = values.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = (ys.reshape(-1, 1) - ys.reshape(1, -1)).double()
    dx = (xs.reshape(-1, 1) - xs.reshape(1, -1)).double()
    k = torch.exp(-(dx.square() + dy.square()) / (2 * sigma**2)) * ((dx.abs() <= radius) & (dy.abs() <= radius))
    return torch.einsum("ij,bcj->bci", k, values.double().reshape(b, c, h * w)).reshape(b, c, h, w)


@pytest.mark.parametrize("shape, sigma", [((2, 21, 37, 29), 3.0), ((1, 5, 9, 50), 1.5), ((1, 1, 7, 6), 2.0),
                                          ((1, 17, 40, 3), 0.7)])
def test_spatial_gaussian_filter_matches_dense_reference(shape, sigma):
    """The separable grid Gaussian (blur_xy) against the dense float64 sum, borders included (images smaller than
    the window, K not a multiple of the vector width); and against the untruncated exact filter within the
    weight of the dropped tail (the 2-D mass outside the window times the largest value)."""
    from nclib.crf import SPATIAL_TRUNCATE, spatial_gaussian_filter

    g = torch.Generator().manual_seed(0)
    v = torch.rand(*shape, generator=g, dtype=torch.float64)
    radius = math.ceil(SPATIAL_TRUNCATE * sigma)
    out = spatial_gaussian_filter(v, sigma)
    assert out.dtype == torch.float32 and out.shape == v.shape
    ref = dense_box_gaussian(v, sigma, radius)
    assert float((out.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    t = torch.arange(1, 10 * radius + 1, dtype=torch.float64)
    g1 = torch.exp(-t.square() / (2 * sigma**2))
    dropped = float((1 + 2 * g1.sum()) ** 2 - (1 + 2 * g1[:radius].sum()) ** 2)  # 2-D mass outside the window
    exact = exact_gaussian_filter(v, xy_features(v, sigma))
    bound = dropped * float(v.max())
    assert float((out.double() - exact).abs().max()) <= bound + 1e-6 * float(exact.abs().max())
    if min(shape[2:]) > radius:  # the window cuts something off: the bound is not vacuous
        assert float((ref - exact).abs().max()) > 0.01 * bound


def test_spatial_gaussian_filter_bad_input():
    from nclib.crf import spatial_gaussian_filter

    with pytest.raises(ValueError, match="sigma_xy"):
        spatial_gaussian_filter(torch.rand(1, 2, 8, 8), 0.0)
    with pytest.raises(ValueError, match="values"):
        spatial_gaussian_filter(torch.rand(2, 8, 8), 1.0)
    with pytest.raises(ValueError, match="values"):
        spatial_gaussian_filter(torch.ones(1, 2, 8, 8, dtype=torch.int64), 1.0)


def test_fused_blur_update_equals_blur_then_update_any_threads():
    """blur_update (the blurred rows fed straight into the update) equals blur_xy followed by update bitwise, and
    neither depends on the thread count (bands of rows run in parallel: 67 rows, radius 4, give several)."""
    from nclib import _ext
    from nclib.crf import SPATIAL_TRUNCATE

    _ext.load("cpu")
    g = torch.Generator().manual_seed(1)
    b, h, w, k = 2, 67, 23, 21
    n = b * h * w
    sigma = 1.0
    r = math.ceil(SPATIAL_TRUNCATE * sigma)
    taps = torch.exp(-0.5 * (torch.arange(r + 1, dtype=torch.float64) / sigma) ** 2).float()
    values, fa = torch.rand(n, k, generator=g), torch.rand(n, k, generator=g)
    unary = torch.log(torch.rand(n, k, generator=g).clamp_min(1e-5))
    post_a, post_s = torch.rand(n, 1, generator=g) * 4, torch.rand(n, 1, generator=g) * 3
    pre = [torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            blurred = torch.empty(n, k)
            torch.ops.nclib_gauss.blur_xy(values, b, h, w, taps, blurred)
            two = [torch.empty(n, k), torch.empty(n, k)]
            torch.ops.nclib_meanfield.update(unary, [fa, blurred], [post_a, post_s], pre, two)
            fused = [torch.empty(n, k), torch.empty(n, k)]
            torch.ops.nclib_gauss.blur_update(values, b, h, w, taps, post_s, unary, [fa], [post_a], pre, fused)
            results.append((blurred, two, fused))
    finally:
        torch.set_num_threads(old)
    for (blurred, two, fused), (blurred2, two2, fused2) in [(results[0], results[1])]:
        assert torch.equal(blurred, blurred2)
        for x, y, z, zz in zip(two, fused, two2, fused2):
            assert torch.equal(x, y) and torch.equal(x, z) and torch.equal(y, zz)
    ref = dense_box_gaussian(values.reshape(b, h, w, k).permute(0, 3, 1, 2), sigma, r).permute(0, 2, 3, 1)
    assert float((results[0][0].double() - ref.reshape(n, k)).abs().max()) <= 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("normalization", ["symmetric", "after", "none"])
def test_roi_pixels_do_not_influence_inside_every_normalization(normalization):
    """Both kernels (lattice and grid Gaussian) leave the padding out in every mode. Padded right and below only:
    the appearance lattice is not shift-invariant, so the inside keeps its coordinates."""
    img = resized_photo("coffee", 40)
    p = network_like_probs(img, 3, seed=2)
    roi = torch.zeros(1, 45, 49, dtype=torch.bool)
    roi[:, :40, :40] = True
    pad_img = F.pad(img, (0, 9, 0, 5), value=0.0)
    # not uniform: a uniform Q outside would add the same to every label's message, which the softmax ignores
    pad_p = torch.where(roi, F.pad(p, (0, 9, 0, 5)), torch.tensor([0.8, 0.15, 0.05])[:, None, None])
    a = dense_crf(p, img, 5, normalization=normalization)
    b = dense_crf(pad_p, pad_img, 5, roi=roi, normalization=normalization)[..., :40, :40]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_fused_cpu_mean_field_matches_torch_ops(normalization, monkeypatch):
    """The CPU build's fused steps (lattice splat + blur, then grid blur + slice + update row by row, one (P, K)
    state) against the torch-ops mean field of the same kernels, any thread count, labels 1..40 (every padded
    vertex-row width), with a roi. Both round differently, so they agree to float rounding, not bitwise."""
    from nclib import crf

    imgs = torch.cat([resized_photo("coffee", 37), resized_photo("chelsea", 37)])
    roi = torch.ones(2, 37, 37, dtype=torch.bool)
    roi[1, 30:] = False
    old = torch.get_num_threads()
    try:
        for k, threads in ((1, 1), (5, 2), (21, 1), (21, 3), (40, 2)):
            torch.set_num_threads(threads)
            p = network_like_probs(imgs, k, seed=k) if k > 1 else torch.ones(2, 1, 37, 37)
            fused = dense_crf(p, imgs, 5, normalization=normalization, roi=roi)
            with monkeypatch.context() as m:
                m.setattr(crf, "_mean_field_cpu", crf._mean_field)
                reference = dense_crf(p, imgs, 5, normalization=normalization, roi=roi)
            assert float((fused - reference).abs().max()) <= 2e-6, (k, threads)
            if k > 1:
                assert not torch.equal(fused, p)  # the CRF did something
    finally:
        torch.set_num_threads(old)
