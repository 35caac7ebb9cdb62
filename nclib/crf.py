"""Fully connected CRF post-processing (Kraehenbuehl & Koltun, NIPS 2011): mean-field inference on our lattice.

Energy: unary ``-log P`` plus two Potts terms with Gaussian kernels, an appearance kernel over RGBXY
(``bi_w``, ``bi_xy_std``, ``bi_rgb_std``) and a smoothness kernel over XY (``pos_w``, ``pos_xy_std``). Each
mean-field iteration filters Q with both kernels: the appearance lattice is built once per call and reused, the
smoothness kernel is an exact grid Gaussian (a second lattice with ``normalization="none"``, see below). On the
CPU an iteration of the default kernels is two passes of the compiled build: splat and blur on the lattice, then
the grid blur with the lattice's slice and the update fused row by row.

Defaults are DeepLab's published post-processing parameters for DeepLab-LargeFOV (VGG-16), which the paper's
Tables 1-3 "+CRF" rows use: ``bi_w=4, bi_xy_std=121, bi_rgb_std=5, pos_w=3, pos_xy_std=3``, 10 iterations
(DeepLab v1, Chen et al. ICLR 2015, and the DeepLab release notes; DeepLab-v2 ResNet-101 uses
``bi_w=4, bi_xy_std=67, bi_rgb_std=3, pos_w=3, pos_xy_std=1``).

Kernel normalization: pydensecrf (and Kraehenbuehl's densecrf 2.x it wraps) does *not* use raw unnormalized
kernels by default: ``addPairwiseGaussian/Bilateral`` apply ``NORMALIZE_SYMMETRIC``, i.e. ``D^-1/2 K D^-1/2 Q``
with ``D = K 1`` computed by the same lattice (DeepLab's densecrf 1.x normalizes per pixel, ``D^-1 K Q``). Both
forms are invariant to the global scale of the lattice, so our lattice's uncalibrated ~0.55 scale cancels and the
published weights apply unchanged. ``normalization="none"`` uses the raw lattice output like pydensecrf's
``NO_NORMALIZATION``; no weight calibration is needed there either, because pydensecrf's lattice carries the same
uncalibrated scale as ours (measured: identical labels on 100% of pixels in all three modes on four 160x160
photos, 10 iterations, 5 labels; see tests/test_crf.py). Only a comparison with an *exact* Gaussian kernel
would need the weights divided by ~0.55.

The smoothness kernel (xy only) is an exact spatial Gaussian on the pixel grid (:func:`spatial_gaussian_filter`,
separable, truncated at ``SPATIAL_TRUNCATE`` sigmas) in the normalized modes: cheaper than a lattice and exact
(labels agree with pydensecrf's lattice version on >= 99.6% of pixels, 321x321, 21 labels). With
``normalization="none"`` it stays a 2-D lattice, whose uncalibrated scale (about 0.88 of the exact sum in 2-D)
is what pydensecrf's unnormalized weights assume.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ext
from ._checks import check_images, check_positive, check_probs, check_roi, check_tensor
from .lattice import Permutohedral, from_pixel_major, rgbxy_features, to_pixel_major, xy_features

__all__ = ["dense_crf", "spatial_gaussian_filter", "SPATIAL_TRUNCATE", "DEEPLAB_LARGEFOV", "DEEPLAB_V2_RESNET101"]

#: DeepLab-LargeFOV (VGG-16) CRF parameters, the defaults of :func:`dense_crf`.
DEEPLAB_LARGEFOV = dict(bi_w=4.0, bi_xy_std=121.0, bi_rgb_std=5.0, pos_w=3.0, pos_xy_std=3.0)
#: DeepLab-v2 ResNet-101 CRF parameters.
DEEPLAB_V2_RESNET101 = dict(bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0)

_NORMALIZATIONS = ("symmetric", "after", "none")

#: The spatial Gaussian's support, in sigmas (a square window): weights below exp(-8) = 3.4e-4 of the centre
#: are dropped (at most 1.3e-4 of the 2-D mass; 6e-5 at sigma 3 px).
SPATIAL_TRUNCATE = 4.0


def _spatial_taps(sigma: float) -> torch.Tensor:
    """(R+1,) float32 one-sided taps ``exp(-t^2 / (2 sigma^2))``, t = 0..R, R = ceil(SPATIAL_TRUNCATE * sigma)."""
    r = math.ceil(SPATIAL_TRUNCATE * sigma)
    t = torch.arange(r + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (t / sigma) ** 2).to(torch.float32)


def _blur_pixel_major(values: torch.Tensor, shape, taps: torch.Tensor, out: Optional[torch.Tensor] = None):
    """The separable truncated Gaussian on pixel-major (B*H*W, C) float32 ``values`` of images ``shape`` (B, H, W):
    the CPU build's ``blur_xy`` kernel on the CPU (into ``out`` when given), two 1-D convolutions elsewhere."""
    b, h, w = shape
    if values.device.type == "cpu":
        _ext.load("cpu")  # registers torch.ops.nclib_gauss
        out = torch.empty_like(values) if out is None else out
        torch.ops.nclib_gauss.blur_xy(values, b, h, w, taps, out)
        return out
    c, r = values.shape[1], taps.numel() - 1
    g = torch.cat([taps.flip(0), taps[1:]]).to(values.device)
    x = values.view(b, h, w, c).permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, -1), padding=(0, r))
    x = torch.nn.functional.conv2d(x, g.view(1, 1, -1, 1), padding=(r, 0))
    res = x.view(b, c, h, w).permute(0, 2, 3, 1).reshape(b * h * w, c)
    return res if out is None else out.copy_(res)


def spatial_gaussian_filter(values: torch.Tensor, sigma_xy: float) -> torch.Tensor:
    """Exact spatial Gaussian ``out_i = sum_j exp(-|x_i - x_j|^2 / (2 sigma_xy^2)) v_j`` over the pixel grid.

    Args:
        values: (B, C, H, W) real tensor; computed in float32.
        sigma_xy: bandwidth in pixels.
    Returns:
        (B, C, H, W) float32. Pixels off the image hold 0 (no padding); the window is truncated at
        ``|dx|, |dy| <= ceil(SPATIAL_TRUNCATE * sigma_xy)``. Unnormalized: divide by the filter of ones for a
        weighted mean. Not differentiable (the CRF's inference only).
    """
    check_tensor("values", values, "(B, C, H, W)")
    check_positive("sigma_xy", sigma_xy)
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating tensor, got dtype {values.dtype}")
    b, c, h, w = values.shape
    out = _blur_pixel_major(to_pixel_major(values.detach()), (b, h, w), _spatial_taps(sigma_xy))
    return from_pixel_major(out, (b, c, h, w))


def _pre_post(d: torch.Tensor, normalization: str, weight: float):
    """``pre`` (None: 1) and ``post`` (P, 1) of a kernel from its degree ``d = K 1`` (P, 1), 0 outside the roi."""
    if normalization == "symmetric":
        pre = torch.where(d > 0, d.clamp_min(1e-20).rsqrt(), torch.zeros_like(d))
        return pre, pre * weight
    if normalization == "after":
        return None, torch.where(d > 0, weight / d.clamp_min(1e-20), torch.zeros_like(d))
    return None, torch.ones_like(d) * weight


class _Kernel:
    """One Gaussian kernel ``K`` on a lattice, its weight ``w`` and normalization: ``message += w N(K) Q``.

    Works on pixel-major (B*H*W, K) tensors and calls the lattice's raw operator: the mean-field loop keeps Q in
    that layout (no permutes, no per-call validation of values we produced ourselves). ``pre`` multiplies Q
    before the filter, ``post`` (the weight folded in) the output.
    """

    def __init__(self, lattice: Permutohedral, normalization: str, weight: float):
        self.lattice = lattice
        self.cpu = lattice.kind == "cpu"
        self.pre, self.post = _pre_post(to_pixel_major(lattice.norm()), normalization, weight)

    def filter(self, q_pre: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``K (pre * Q)`` from ``pre * Q`` (P, K), into ``out`` when given (CPU build)."""
        return self.lattice.apply_pixel_major(q_pre, out=out)


class _GridKernel:
    """:class:`_Kernel`'s interface for the smoothness kernel as an exact spatial Gaussian on the pixel grid.

    Pixels outside the roi neither send nor receive: they are masked out of the degree and, in every mode, of
    ``pre`` (the lattice leaves them out of the operator the same way).
    """

    def __init__(self, shape, sigma_xy: float, roi: Optional[torch.Tensor], normalization: str, weight: float,
                 device):
        b, h, w = shape
        self.shape, self.taps, self.cpu = shape, _spatial_taps(sigma_xy), device.type == "cpu"
        mask = torch.ones(b * h * w, 1, device=device) if roi is None else roi.reshape(-1, 1).to(torch.float32)
        d = _blur_pixel_major(mask, shape, self.taps) * mask  # (P, 1), 0 outside the roi
        self.pre, self.post = _pre_post(d, normalization, weight)
        if roi is not None and self.pre is None:
            self.pre = mask

    def filter(self, q_pre: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``K (pre * Q)`` from ``pre * Q`` (P, K), into ``out`` when given."""
        return _blur_pixel_major(q_pre, self.shape, self.taps, out)


def _softmax_into(message: torch.Tensor, scratch: torch.Tensor, scales, outs) -> torch.Tensor:
    """``softmax(message, dim=1) * scale`` into each of ``outs`` for each (P, 1) ``scale`` (None: 1).

    ``exp``, a row sum and a broadcast multiply: about 3x cheaper than ``torch.softmax`` over the 21-wide
    innermost dimension. Without the usual max subtraction: rows never underflow (the unary's largest entry is
    ``log max_k p >= -log K`` and the pairwise terms are >= 0), and if a row overflows (raw unnormalized kernels
    with large weights) the update goes through ``torch.softmax``. ``scratch`` is a buffer like ``message``.
    """
    e = torch.exp(message, out=scratch)
    total = e.sum(dim=1, keepdim=True)
    if not bool(torch.isfinite(total).all()):
        e, total = torch.softmax(message, dim=1), torch.ones_like(total)
    inv = total.reciprocal_()
    for scale, out in zip(scales, outs):
        torch.mul(e, inv if scale is None else inv * scale, out=out)
    return outs[-1]


def dense_crf(
    probs: torch.Tensor,
    images: torch.Tensor,
    iterations: int = 10,
    bi_w: float = DEEPLAB_LARGEFOV["bi_w"],
    bi_xy_std: float = DEEPLAB_LARGEFOV["bi_xy_std"],
    bi_rgb_std: float = DEEPLAB_LARGEFOV["bi_rgb_std"],
    pos_w: float = DEEPLAB_LARGEFOV["pos_w"],
    pos_xy_std: float = DEEPLAB_LARGEFOV["pos_xy_std"],
    normalization: str = "symmetric",
    roi: Optional[torch.Tensor] = None,
    clip: float = 1e-5,
) -> torch.Tensor:
    """Mean-field inference of the dense CRF with Potts compatibility, batched, any number of labels.

    Args:
        probs: (B, K, H, W) class probabilities (e.g. the upsampled softmax of a network); the unary is
            ``-log(max(probs, clip))`` as in pydensecrf's ``unary_from_softmax``.
        images: (B, 3, H, W) RGB in 0..255.
        iterations: mean-field iterations (0 returns the normalized clipped ``probs``).
        bi_w, bi_xy_std, bi_rgb_std: appearance kernel weight and bandwidths (pixels, 0..255 units).
        pos_w, pos_xy_std: smoothness kernel weight and bandwidth (pixels).
        normalization: "symmetric" (pydensecrf's default), "after" (DeepLab's densecrf 1.x) or "none".
        roi: optional (B, H, W) bool; pixels outside take no part in the pairwise terms.
    Returns:
        (B, K, H, W) float32 marginals Q; ``Q.argmax(1)`` is the labelling.
    """
    check_tensor("probs", probs, "(B, K, H, W)")
    check_tensor("images", images, "(B, 3, H, W)")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    for name, value in (("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std), ("pos_xy_std", pos_xy_std)):
        check_positive(name, value)
    for name, value in (("bi_w", bi_w), ("pos_w", pos_w)):
        if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    check_positive("clip", clip)
    with torch.autocast(device_type=probs.device.type, enabled=False):
        p = check_probs(probs)
        img = check_images(images, probs)
        roi_b = check_roi(roi, probs)
        b, k, h, w = p.shape
        # (P, K) log of the clipped probabilities, in place in a fresh pixel-major copy (never a view of p)
        neg_unary = to_pixel_major(p, out=torch.empty(b * h * w, k, device=p.device)).clamp_min_(clip).log_()
        if iterations == 0:
            return from_pixel_major(torch.softmax(neg_unary, dim=1), (b, k, h, w))
        kernels = []
        if bi_w > 0:
            appearance = Permutohedral(rgbxy_features(img, bi_rgb_std, bi_xy_std), roi_b)
            kernels.append(_Kernel(appearance, normalization, bi_w))
        if pos_w > 0 and normalization == "none":  # the lattice's scale is what pydensecrf's weights assume
            kernels.append(_Kernel(Permutohedral(xy_features(img, pos_xy_std), roi_b), normalization, pos_w))
        elif pos_w > 0:
            kernels.append(_GridKernel((b, h, w), pos_xy_std, roi_b, normalization, pos_w, p.device))
        with torch.no_grad():
            if kernels and all(kn.cpu for kn in kernels):
                q = _mean_field_cpu(neg_unary, kernels, iterations)
            else:
                q = _mean_field(neg_unary, kernels, iterations)
        return from_pixel_major(q, (b, k, h, w))


def _mean_field(neg_unary: torch.Tensor, kernels, iterations: int) -> torch.Tensor:
    """Mean-field iterations in torch ops on pixel-major (P, K) tensors; returns Q (P, K)."""
    # Buffers reused by every iteration: the message, exp scratch, and pre * Q for each kernel (Q itself is only
    # needed at the end).
    message, scratch = torch.empty_like(neg_unary), torch.empty_like(neg_unary)
    inputs = [torch.empty_like(neg_unary) for _ in kernels]
    pres = [kn.pre for kn in kernels]
    _softmax_into(neg_unary, scratch, pres, inputs)
    for _ in range(iterations - 1):
        message.copy_(neg_unary)
        for kernel, q_pre in zip(kernels, inputs):  # Potts: -w * (-K Q), an agreement bonus
            message.addcmul_(kernel.filter(q_pre), kernel.post)
        _softmax_into(message, scratch, pres, inputs)
    message.copy_(neg_unary)
    for kernel, q_pre in zip(kernels, inputs):
        message.addcmul_(kernel.filter(q_pre), kernel.post)
    return _softmax_into(message, scratch, [None], [message])  # out may alias message: exp went to scratch


def _mean_field_cpu(neg_unary: torch.Tensor, kernels, iterations: int) -> torch.Tensor:
    """:func:`_mean_field` with each update (messages, softmax, next inputs) in one pass of the CPU build's
    ``nclib_meanfield.update`` kernel; with a grid smoothness kernel (last) the update is fused into its blur
    (``nclib_gauss.blur_update``: the blurred rows go straight into the update, never to memory). The default
    pair of kernels (appearance lattice + grid) goes to :func:`_mean_field_cpu_fused`."""
    _ext.load("cpu")  # registers torch.ops.nclib_meanfield and torch.ops.nclib_gauss
    update, blur_update = torch.ops.nclib_meanfield.update, torch.ops.nclib_gauss.blur_update
    if len(kernels) == 2 and isinstance(kernels[0], _Kernel) and isinstance(kernels[1], _GridKernel):
        return _mean_field_cpu_fused(neg_unary, kernels[0], kernels[1], iterations)
    ones = torch.ones_like(neg_unary[:, :1])
    pres = [kn.pre if kn.pre is not None else ones for kn in kernels]
    posts = [kn.post.contiguous() for kn in kernels]
    grid = kernels[-1] if isinstance(kernels[-1], _GridKernel) else None
    lattices = kernels[:-1] if grid is not None else kernels
    # Fresh each call: kept between calls they faulted less, but ~100 MB held made other code in the process fault
    # more (an NC step at scale 0.5 after a CRF call: 26 instead of 19 ms).
    inputs = [torch.empty_like(neg_unary) for _ in kernels]
    filtered = [torch.empty_like(neg_unary) for _ in lattices]  # reused: fresh pages every call cost as much
    # The grid's input is double-buffered: the fused update writes the next one while the blur still reads it.
    spare = torch.empty_like(neg_unary) if grid is not None else None

    def step(step_pres, outs):
        msgs = [kn.filter(x, out=f) for kn, x, f in zip(lattices, inputs, filtered)]
        if grid is None:
            update(neg_unary, msgs, posts, step_pres, outs)
        else:
            b, h, w = grid.shape
            blur_update(inputs[-1], b, h, w, grid.taps, posts[-1], neg_unary, msgs, posts[:-1], step_pres, outs)

    update(neg_unary, [], [], pres, inputs)  # Q_0 = softmax(unary), pre-multiplied
    for _ in range(iterations - 1):
        if grid is None:
            step(pres, inputs)
        else:
            step(pres, inputs[:-1] + [spare])
            inputs[-1], spare = spare, inputs[-1]
    q = torch.empty_like(neg_unary)
    step([ones], [q])
    return q


def _mean_field_cpu_fused(neg_unary: torch.Tensor, appearance: "_Kernel", grid: "_GridKernel",
                          iterations: int) -> torch.Tensor:
    """The common case (an appearance lattice and the grid smoothness kernel, both normalized) with one (P, K)
    array of state: each step splats and blurs ``pre * Q`` on the lattice (``nclib_meanfield.splat_blur``), then
    ``nclib_gauss.blur_slice_update`` blurs ``pre * Q`` on the grid and, row by row, slices the lattice and updates
    into the next Q. No (P, K) message, filtered or pre-multiplied array is written."""
    update = torch.ops.nclib_meanfield.update
    splat_blur, blur_slice_update = torch.ops.nclib_meanfield.splat_blur, torch.ops.nclib_gauss.blur_slice_update
    st = appearance.lattice.state
    ones = torch.ones_like(neg_unary[:, :1])
    pre_lat = appearance.pre if appearance.pre is not None else ones
    pre_grid = grid.pre if grid.pre is not None else ones
    post_lat, post_grid = appearance.post.contiguous(), grid.post.contiguous()
    b, h, w = grid.shape
    k = neg_unary.shape[1]
    row = k if k == 1 else (k + 7) // 8 * 8  # padded_row(k) of csrc/lattice_rows_cpu.h: the vertex row
    lat_a = torch.empty(st.neighbors.shape[0], row)
    lat_b = torch.empty_like(lat_a)
    q, nxt = torch.empty_like(neg_unary), torch.empty_like(neg_unary)
    update(neg_unary, [], [], [ones], [q])  # Q_0 = softmax(unary)
    for _ in range(iterations):
        lat = splat_blur(q, pre_lat, st.vertex_ids, st.barycentric, st.neighbors, b, lat_a, lat_b)
        blur_slice_update(q, b, h, w, grid.taps, pre_grid, post_grid, neg_unary, lat, st.vertex_ids,
                          st.barycentric, post_lat, nxt)
        q, nxt = nxt, q
    return q
