"""Permutohedral-lattice Gaussian filtering (Adams, Baek & Davis 2010), the engine behind every dense kernel here.

The dense Gaussian affinity over features f (B, D, H, W) is ``W_ij = exp(-|f_i - f_j|^2 / 2)``, self weight
included. Filtering ``W v`` costs O(N^2) exactly; the lattice does it in O(N D^2 + V C D) by splatting each pixel
onto the D+1 vertices of its enclosing simplex, blurring along the D+1 lattice axes and slicing back.

* :func:`rgbxy_features`, :func:`xy_features` scale images/coordinates into such features.
* :class:`Permutohedral` builds the lattice once per batch; ``.filter`` applies it to any number of channels.
* :func:`gaussian_filter` is the one-call, autograd-aware form; :func:`exact_gaussian_filter` the O(N^2) reference.
* :class:`LatticeState` names the tensors a build returns (``Permutohedral.state``); the kernels and their build
  kinds live in ``nclib._ext``, whose docstring states what is bitwise equal between the CPU and CUDA builds (the
  lattice, blur and slice) and what only to float rounding (the splat's sums, hence filter outputs).

Scale: the unnormalized lattice output is not calibrated to the exact Gaussian sum (about 0.55 of it on RGBXY
images, varying about 10% across pixels, as in every permutohedral implementation). Ratios such as
``normalize=True`` and the normalized cut cancel that scale.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._checks import check_finite, check_positive, check_rank, check_same_device, check_same_spatial, checks_enabled

__all__ = [
    "rgbxy_features",
    "xy_features",
    "feature_dtype",
    "Permutohedral",
    "gaussian_filter",
    "exact_gaussian_filter",
    "relative_rms_error",
    "to_pixel_major",
    "from_pixel_major",
    "MAX_FEATURES",
    "LatticeState",
]

LatticeState = _ext.LatticeState

#: Largest feature dimension the compiled kernels accept.
MAX_FEATURES = 16
#: Largest |feature| (in sigmas): the int32 lattice keys reach about 40 |f| at D = 16.
MAX_FEATURE_VALUE = 1e6


def feature_dtype(images: torch.Tensor) -> torch.dtype:
    """float64 for float64 images (exact references), float32 for every other dtype (the kernels' precision).

    Never the image's own low precision: in bf16 / fp16 pixel coordinates past 256 / 2048 px round by whole pixels.
    """
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def _coords(batch: int, height: int, width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(B, 2, H, W) pixel coordinates (x, y), float32 or float64: exact integers at any image size."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).unsqueeze(0).expand(batch, 2, height, width)


def xy_features(images: torch.Tensor, sigma_xy: float) -> torch.Tensor:
    """Spatial features ``(x / sigma_xy, y / sigma_xy)``, (B, 2, H, W), for any (B, C, H, W) ``images``.

    Pixel coordinates are in pixels; only the size, device, batch and dtype of ``images`` are used. The features
    are float32 whatever the image dtype (float64 for float64 images): see :func:`feature_dtype`.
    """
    check_rank("images", images, 4, "(B, C, H, W)")
    check_positive("sigma_xy", sigma_xy)
    b, _, h, w = images.shape
    return _coords(b, h, w, images.device, feature_dtype(images)) / sigma_xy


def rgbxy_features(images: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """Bilateral features ``(x/sxy, y/sxy, r/srgb, g/srgb, b/srgb)``, (B, 5, H, W) in channels_last memory.

    Args:
        images: (B, 3, H, W), RGB in 0..255, any real dtype: features are computed and returned in float32 (float64
            for float64 images, for exact references), never in bf16 / fp16 (see :func:`feature_dtype`).
        sigma_rgb: colour bandwidth in 0..255 units.
        sigma_xy: spatial bandwidth in pixels.
    """
    check_rank("images", images, 4, "(B, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(images.shape)}")
    check_positive("sigma_rgb", sigma_rgb)
    check_positive("sigma_xy", sigma_xy)
    check_finite("images", images)
    dtype = feature_dtype(images)
    if images.requires_grad and torch.is_grad_enabled():  # keep the graph (out= writes do not)
        return torch.cat([xy_features(images, sigma_xy), images.to(dtype) / sigma_rgb], dim=1)
    b, _, h, w = images.shape
    # Written straight into pixel-major memory (channels_last): the kernels' layout, so the lattice build needs
    # no transpose copy (to_pixel_major is then free).
    out = torch.empty(b, h, w, 5, dtype=dtype, device=images.device)
    out[..., 0] = torch.arange(w, device=images.device, dtype=dtype) / sigma_xy
    out[..., 1] = (torch.arange(h, device=images.device, dtype=dtype) / sigma_xy)[:, None]
    torch.div(images.permute(0, 2, 3, 1).to(dtype), sigma_rgb, out=out[..., 2:])
    return out.permute(0, 3, 1, 2)


def _cpu_transpose(src: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = src.transpose(1, 2)`` for contiguous float32 CPU (B, R, S) -> (B, S, R) by the CPU build's blocked
    kernel (3-4x torch's copy at 21 channels); False where it does not apply (then the caller copies): another
    device or dtype, a graph to keep, or no CPU build."""
    if src.device.type != "cpu" or src.dtype != torch.float32 or (src.requires_grad and torch.is_grad_enabled()) \
            or not _ext.available("cpu"):  # the build registers torch.ops.nclib_layout
        return False
    torch.ops.nclib_layout.transpose(src, out)
    return True


def to_pixel_major(t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, H, W) -> contiguous float32 (B*H*W, C), the kernels' native layout (free for channels_last float32).

    A contiguous (NCHW) input is transposed image by image: by the CPU build's blocked kernel, elsewhere by torch's
    2-D transpose copy (several times faster than the generic strided copy of a 4-D permute with a small C).
    ``out``: a contiguous float32 (B*H*W, C) tensor to write into (then always a copy, never a view of ``t``).
    """
    b, c, h, w = t.shape
    if out is not None and (out.shape != (b * h * w, c) or out.dtype != torch.float32 or not out.is_contiguous()
                            or out.device != t.device):
        raise ValueError(f"out must be a contiguous float32 ({b * h * w}, {c}) tensor on {t.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if c > 1 and t.is_contiguous():
        dst = (torch.empty(b * h * w, c, dtype=torch.float32, device=t.device) if out is None else out).view(b, h * w, c)
        src = t.view(b, c, h * w)
        if not _cpu_transpose(src, dst):
            for i in range(b):
                dst[i].copy_(src[i].t())
        return dst.view(b * h * w, c) if out is None else out
    pm = t.permute(0, 2, 3, 1).reshape(b * h * w, c)
    return pm.to(torch.float32).contiguous() if out is None else out.copy_(pm)


def from_pixel_major(values: torch.Tensor, shape) -> torch.Tensor:
    """Pixel-major (B*H*W, C) (or (B, H*W, C)) values -> contiguous (B, C, H, W) of ``shape``, image by image
    (the inverse of :func:`to_pixel_major`, with the same transposes)."""
    b, c, h, w = shape
    src = values.reshape(b, h * w, c)
    out = torch.empty(b, c, h * w, dtype=values.dtype, device=values.device)
    if not (src.is_contiguous() and _cpu_transpose(src, out)):
        for i in range(b):
            out[i].copy_(src[i].t())
    return out.view(b, c, h, w)


class _LatticeFilter(torch.autograd.Function):
    """``out = L v`` with the lattice operator L; the backward applies L^T (blur axes in reverse order)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, lattice: "Permutohedral", transpose: bool,
                channel_major: bool) -> torch.Tensor:
        ctx.lattice, ctx.transpose, ctx.channel_major = lattice, transpose, channel_major
        return lattice._apply(values, transpose, channel_major)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = _LatticeFilter.apply(grad_out.contiguous(), ctx.lattice, not ctx.transpose, ctx.channel_major)
        return grad, None, None, None


class Permutohedral:
    """A permutohedral lattice built once for a batch of feature images, applied many times.

    Args:
        features: (B, D, H, W) real tensor, 1 <= D <= :data:`MAX_FEATURES`, already divided by the bandwidths
            (see :func:`rgbxy_features`). Features get no gradient.
        roi: optional (B, H, W) bool; pixels where it is False (crop padding) are left out of the operator:
            they neither contribute to nor receive any filtered value (their output is 0). None: every pixel.
        kind: the ``nclib._ext`` build kind to run; default ``"cuda"`` for CUDA features, ``"cpu"`` otherwise.
            ``"cuda-emulation"`` runs the CUDA kernel code on the host, on CPU features (tests, GPU rehearsals).

    The lattice lives on the device of ``features``; :attr:`state` holds its tensors (:class:`LatticeState`).
    """

    def __init__(self, features: torch.Tensor, roi: Optional[torch.Tensor] = None, *, kind: Optional[str] = None):
        check_rank("features", features, 4, "(B, D, H, W)")
        b, d, h, w = features.shape
        if not 1 <= d <= MAX_FEATURES:
            raise ValueError(f"features must have 1..{MAX_FEATURES} channels (D), got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be a floating tensor, got dtype {features.dtype}")
        fmax = check_finite("features", features)
        if fmax > MAX_FEATURE_VALUE:
            raise ValueError(
                f"features reach |f| = {fmax:.3g} > {MAX_FEATURE_VALUE:.0e} (coordinates / sigma): the lattice "
                "keys would overflow int32; use larger sigmas or smaller images"
            )
        roi_flat = None
        if roi is not None:
            check_rank("roi", roi, 3, "(B, H, W)")
            if tuple(roi.shape) != (b, h, w):
                raise ValueError(f"roi must have shape (B, H, W) = {(b, h, w)}, got {tuple(roi.shape)}")
            check_same_device("roi", roi, "features", features)
            roi_flat = roi.reshape(-1).to(torch.bool).contiguous()
        default = _ext.kind_for(features.device)
        kind = default if kind is None else kind
        if kind not in _ext.BUILD_KINDS or (kind == "cuda") != features.is_cuda:
            raise ValueError(
                f"kind must be one of {_ext.BUILD_KINDS} and run on the features' device ({features.device}: "
                f"{default!r}{' or cuda-emulation' if default == 'cpu' else ''}), got {kind!r}"
            )
        self.shape = (b, d, h, w)
        self.device = features.device
        self.roi = roi_flat
        self.kind = kind
        self.state: LatticeState = _ext.build_lattice(kind, to_pixel_major(features.detach()), roi_flat, b)
        self._norm: Optional[torch.Tensor] = None

    @property
    def num_vertices(self) -> int:
        """Occupied lattice vertices over the whole batch."""
        return self.state.num_vertices

    @property
    def vertices_per_image(self) -> torch.Tensor:
        """(B,) int64 occupied vertices of each image."""
        return self.state.vertices_per_image

    def _pixel_major_values(self, values: torch.Tensor) -> torch.Tensor:
        """Contiguous ``values`` after the shape / dtype check of the pixel-major entry points."""
        pixels = self.state.vertex_ids.shape[0]
        if values.dim() != 2 or values.shape[0] != pixels or values.dtype != torch.float32:
            raise ValueError(
                f"values must be float32 (B*H*W, C) = ({pixels}, C), got {values.dtype} {tuple(values.shape)}"
            )
        return values.contiguous()

    def apply_pixel_major(self, values: torch.Tensor, transpose: bool = False,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw operator on pixel-major values (B*H*W, C) float32 -> (B*H*W, C): no autograd, shape check only.

        For inner loops (mean-field iterations) that keep their state in the kernels' layout; see
        :func:`to_pixel_major`. ``out`` (``"cpu"`` build): a buffer like ``values`` that receives the result.
        """
        values = self._pixel_major_values(values)
        if out is None or self.kind != "cpu":
            return self._apply(values, transpose)
        if out.shape != values.shape or out.dtype != torch.float32 or not out.is_contiguous() \
                or out.device != values.device or out.data_ptr() == values.data_ptr():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(values.shape)} on "
                             f"{values.device}, other than values; got {out.dtype} {tuple(out.shape)}")
        return self._apply(values, transpose, out=out)

    def apply_symmetric(self, values: torch.Tensor) -> torch.Tensor:
        """``(L + L') v``, twice the symmetric part of the operator, on (B, C, H, W) float32 values -> (B, C, H, W)
        float32, no autograd, shape check only. On the ``"cpu"`` build: one splat, two blurs (one per axis order)
        and one slice, straight from and into NCHW memory (and :meth:`norm` with the same splat if not cached);
        elsewhere two filter calls."""
        b, _, h, w = self.shape
        if values.dim() != 4 or values.shape[0] != b or tuple(values.shape[-2:]) != (h, w) \
                or values.dtype != torch.float32:
            raise ValueError(f"values must be float32 (B, C, H, W) with B, H, W = {(b, h, w)}, got {values.dtype} "
                             f"{tuple(values.shape)}")
        c = values.shape[1]
        if self.kind == "cpu":
            _ext.load("cpu")  # registers torch.ops.nclib_both
            st = self.state
            out, norm = torch.ops.nclib_both.filter_sym(values.contiguous().view(b, c, h * w), st.vertex_ids,
                                                        st.barycentric, st.neighbors, b, self._norm is None, True)
            if self._norm is None:  # the degree came with the same splat: cache it for norm()
                self._norm = norm.reshape(b, h, w, 1).permute(0, 3, 1, 2)
            return out.view(b, c, h, w)
        pm = to_pixel_major(values)
        return from_pixel_major(self._apply(pm, False).add_(self._apply(pm, True)), (b, c, h, w))

    def _apply(self, values: torch.Tensor, transpose: bool, channel_major: bool = False,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ext.apply_lattice(self.kind, self.state, values, transpose, channel_major, out)

    def _check_values(self, values: torch.Tensor) -> None:
        check_rank("values", values, 4, "(B, C, H, W)")
        b, _, h, w = self.shape
        if values.shape[0] != b or tuple(values.shape[-2:]) != (h, w):
            raise ValueError(
                f"values must have shape (B, C, H, W) with B, H, W = {(b, h, w)} like the features, "
                f"got {tuple(values.shape)}"
            )
        check_same_device("values", values, "features", torch.empty(0, device=self.device))
        if not values.is_floating_point():
            raise ValueError(f"values must be a floating tensor, got dtype {values.dtype}")
        if checks_enabled():
            check_finite("values", values)

    def norm(self) -> torch.Tensor:
        """``W 1`` as (B, 1, H, W) float32, computed once and cached (0 outside the roi)."""
        if self._norm is None:
            b, _, h, w = self.shape
            ones = torch.ones(b * h * w, 1, device=self.device)
            self._norm = self._apply(ones, False).reshape(b, h, w, 1).permute(0, 3, 1, 2)
        return self._norm

    def filter(self, values: torch.Tensor, normalize: bool = False, transpose: bool = False) -> torch.Tensor:
        """Apply the lattice Gaussian to ``values`` (B, C, H, W), all C channels in one pass.

        Returns ``W v`` (or ``W v / W 1`` with ``normalize=True``; 0 where ``W 1`` is 0, i.e. outside the roi) in
        the dtype of ``values``; float32 inside. ``transpose=True`` applies the exact transpose of the operator.
        Differentiable with respect to ``values`` (the backward applies the exact transpose). float16 values whose
        unnormalized sums leave float16's range (65504: W sums over many pixels) raise instead of turning into inf.
        """
        self._check_values(values)
        b, c, h, w = values.shape
        # pixels outside the roi have no vertices: they neither splat nor slice (their output is 0)
        if self.kind == "cpu":  # the CPU kernel reads and writes NCHW itself: no transposes
            cm = values.to(torch.float32).contiguous().view(b, c, h * w)
            out = _LatticeFilter.apply(cm, self, transpose, True).reshape(b, c, h, w)
        else:
            pm = to_pixel_major(values)
            out = _LatticeFilter.apply(pm, self, transpose, False).reshape(b, h, w, c).permute(0, 3, 1, 2)
        if normalize:
            n = self.norm()
            out = torch.where(n > 0, out / n.clamp_min(1e-30), torch.zeros_like(out))
        if values.dtype == torch.float16:
            peak = float(out.detach().abs().max())
            if peak > torch.finfo(torch.float16).max:
                raise ValueError(f"the filter output exceeds float16's range (max |W v| = {peak:.4g} > 65504): pass "
                                 "float32 values, or normalize=True")
        return out.to(values.dtype)


def gaussian_filter(
    values: torch.Tensor, features: torch.Tensor, normalize: bool = False, roi: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """One-call lattice Gaussian filter: ``W v`` (or ``W v / W 1``), (B, C, H, W) -> (B, C, H, W).

    ``W_ij = exp(-|f_i - f_j|^2 / 2)`` over ``features`` (B, D, H, W), self weight included, approximated by the
    permutohedral lattice. Differentiable in ``values`` (the backward is the exact transpose of the forward);
    ``features`` get no gradient. Build a :class:`Permutohedral` yourself to reuse one lattice for many filters.
    """
    check_rank("values", values, 4, "(B, C, H, W)")
    check_rank("features", features, 4, "(B, D, H, W)")
    check_same_device("values", values, "features", features)
    check_same_spatial("values", values, "features", features)
    return Permutohedral(features, roi=roi).filter(values, normalize=normalize)


def relative_rms_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Filter accuracy: RMS of ``approx - exact`` over the RMS deviation of ``exact`` from its per-channel mean.

    Both (B, C, H, W). Dividing by the signal's variation (not its level) keeps a constant offset from hiding errors.
    """
    dev = exact - exact.mean(dim=(2, 3), keepdim=True)
    return float((approx - exact).pow(2).mean().sqrt() / dev.pow(2).mean().sqrt())


def exact_gaussian_filter(
    values: torch.Tensor,
    features: torch.Tensor,
    normalize: bool = False,
    roi: Optional[torch.Tensor] = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Exact O(N^2) dense Gaussian filter in plain torch: the reference for tests and small images.

    Same contract as :func:`gaussian_filter`; computes in the dtype of ``values`` (use float64 for finite
    differences) and is differentiable in ``values``. Memory is ``chunk * H * W`` per image.
    """
    check_rank("values", values, 4, "(B, C, H, W)")
    check_rank("features", features, 4, "(B, D, H, W)")
    check_same_device("values", values, "features", features)
    check_same_spatial("values", values, "features", features)
    check_finite("values", values)
    check_finite("features", features)
    b, c, h, w = values.shape
    dtype = values.dtype if values.is_floating_point() and values.dtype != torch.float16 else torch.float32
    f = features.detach().to(dtype).flatten(2).transpose(1, 2)  # (B, N, D)
    v = values.to(dtype).flatten(2).transpose(1, 2)  # (B, N, C)
    if roi is not None:
        keep = roi.reshape(b, h * w, 1).to(dtype)
        v = v * keep
    outs = []
    for i in range(b):
        rows = []
        for s in range(0, h * w, chunk):
            k = torch.exp(-0.5 * torch.cdist(f[i, s : s + chunk], f[i]).square())
            rows.append(k @ v[i])
        outs.append(torch.cat(rows))
    out = torch.stack(outs)  # (B, N, C)
    if roi is not None:
        out = out * keep
    if normalize:
        ones = torch.ones(b, h * w, 1, dtype=dtype, device=values.device)
        n = exact_gaussian_filter(
            ones.transpose(1, 2).reshape(b, 1, h, w), features, roi=roi, chunk=chunk
        ).flatten(2).transpose(1, 2)
        out = torch.where(n > 0, out / n.clamp_min(1e-30), torch.zeros_like(out))
    return out.transpose(1, 2).reshape(b, c, h, w).to(values.dtype)
