"""The CUDA lattice kernel: the same lattice and the same results as the CPU kernel.

Three layers, so that something runs on every machine:

* host emulation (always): ``lattice_cuda.cu`` compiled as C++ with ``NCLIB_CUDA_EMULATE`` runs the very kernel
  code, one host thread per launch (in reverse index order), on CPU tensors (``nclib._ext.load("cuda-emulation")``);
  it must rebuild the CPU kernel's lattice bitwise (ids, weights, neighbours), blur and slice bitwise like it, and
  filter like it to float rounding (the splat sums in another order): the equalities nclib._ext states;
* compile check (where nvcc exists): ``scripts/cuda_check.py`` compiles the CUDA sources without a GPU;
* GPU tests (a CUDA device and a CUDA build of torch; ``make gpu-check``): GPU against CPU on real photos, exact
  adjoint, autograd, losses and dense CRF.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nclib import _ext
from nclib.lattice import LatticeState, Permutohedral, gaussian_filter, rgbxy_features, xy_features
from nclib.photos import BUNDLED as PHOTOS
from nclib.photos import photo_tensor

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of torch (make gpu-check)")


def photo_batch(size: int, names=PHOTOS) -> torch.Tensor:
    """(len(names), 3, size, size) real photos, RGB 0..255."""
    return torch.cat([photo_tensor(n, crop=size) for n in names])


def padded_roi(batch: int, size: int) -> torch.Tensor:
    """(B, H, W) roi like crop padding: a different valid rectangle per image."""
    roi = torch.zeros(batch, size, size, dtype=torch.bool)
    for b in range(batch):
        roi[b, : size - 3 * b - 1, : size - 5 * b] = True
    return roi


def reference_csr(vtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Splat CSR from the vertex ids alone (the layout contract): per vertex, its flat indices in increasing order."""
    flat = vtx.reshape(-1).long()
    valid = torch.nonzero(flat >= 0).squeeze(1)
    order = torch.sort(flat[valid], stable=True).indices
    counts = torch.bincount(flat[valid], minlength=int(flat.max()) + 1 if valid.numel() else 0)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return ptr, valid[order].to(torch.int32)


def assert_same_lattice(a: Permutohedral, b: Permutohedral) -> None:
    """Bitwise identical lattice state (every LatticeState field), wherever each was built.

    The CPU build returns an empty splat CSR (it splats by scattering); then each non-empty CSR is checked against
    the one the contract defines from the vertex ids.
    """
    for name in LatticeState._fields:
        ta, tb = getattr(a.state, name).cpu(), getattr(b.state, name).cpu()
        if name.startswith("splat_") and min(ta.numel(), tb.numel()) == 0:
            continue
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, (name, ta.shape, tb.shape)
        assert torch.equal(ta, tb), f"{name} differs in {int((ta != tb).sum())} of {ta.numel()} entries"
    for lat in (a, b):
        if lat.state.splat_ptr.numel() > 0:
            ptr, idx = reference_csr(lat.state.vertex_ids.cpu())
            assert torch.equal(lat.state.splat_ptr.cpu(), ptr) and torch.equal(lat.state.splat_entries.cpu(), idx)


# --------------------------------------------------------------------------------------------- host emulation


@pytest.fixture(scope="module")
def emulated():
    """The ``cuda-emulation`` build of nclib._ext: the CUDA kernel code on the host, with the CPU kernel's flags."""
    try:
        return _ext.load("cuda-emulation")
    except _ext.ExtensionUnavailable as e:
        pytest.skip(f"no C++ toolchain: {e}")


def build_with(kernel, features, roi=None) -> Permutohedral:
    """A Permutohedral built and filtered by the ``cuda-emulation`` kernel (``kernel``: its loaded module)."""
    assert kernel is _ext.load("cuda-emulation")
    return Permutohedral(features, roi=roi, kind="cuda-emulation")


@pytest.mark.parametrize(
    "kind, roi",
    [("rgbxy", False), ("rgbxy", True), ("xy", False), ("gray", True), ("tiny_sigma", False), ("repeated", True)],
)
def test_emulated_kernel_builds_the_cpu_lattice(emulated, kind, roi):
    img = photo_batch(40)
    if kind == "repeated":  # identical keys in different images must stay different vertices
        img = torch.cat([img[:1], img[:1], img[1:2]])
    if kind in ("rgbxy", "repeated"):
        f = rgbxy_features(img, 15.0, 20.0)
    elif kind == "xy":
        f = xy_features(img, 3.0)
    elif kind == "gray":  # D = 1: a single feature channel
        f = img.mean(1, keepdim=True) / 10.0
    else:  # thousands of sigmas: large keys, almost one vertex set per pixel
        f = rgbxy_features(img, 0.5, 0.3)
    r = padded_roi(img.shape[0], 40) if roi else None
    if kind == "repeated":
        r[1] = r[0]
    cpu = Permutohedral(f, roi=r)
    emu = build_with(emulated, f, roi=r)
    assert cpu.num_vertices > 10 * img.shape[0]
    assert_same_lattice(cpu, emu)
    if kind == "repeated":
        v0 = int(emu.vertices_per_image[0])
        assert int(emu.vertices_per_image[1]) == v0
        first = emu.state.vertex_ids[:1600]
        assert torch.equal(emu.state.vertex_ids[1600:3200], torch.where(first >= 0, first + v0, first))


def test_emulated_kernel_empty_roi(emulated):
    img = photo_batch(24, ("coffee", "rocket"))
    f = rgbxy_features(img, 15.0, 10.0)
    v = torch.rand(2, 4, 24, 24)
    roi = torch.ones(2, 24, 24, dtype=torch.bool)
    roi[0] = False  # one image entirely padding
    emu, cpu = build_with(emulated, f, roi=roi), Permutohedral(f, roi=roi)
    assert_same_lattice(cpu, emu)
    assert int(emu.vertices_per_image[0]) == 0 and int(emu.vertices_per_image[1]) > 0
    torch.testing.assert_close(emu.filter(v), cpu.filter(v), rtol=1e-5, atol=0)
    assert torch.equal(emu.filter(v)[0], torch.zeros(4, 24, 24))
    none = build_with(emulated, f, roi=torch.zeros(2, 24, 24, dtype=torch.bool))  # no vertex at all
    assert none.num_vertices == 0 and none.state.splat_ptr.tolist() == [0] and none.state.splat_entries.numel() == 0
    assert torch.equal(none.filter(v), torch.zeros_like(v))


def test_emulated_filter_equals_cpu_filter(emulated):
    img = photo_batch(40)
    f = rgbxy_features(img, 13.0, 30.0)
    r = padded_roi(img.shape[0], 40)
    cpu, emu = Permutohedral(f, roi=r), build_with(emulated, f, roi=r)
    v = torch.rand(img.shape[0], 21, 40, 40)
    # Same terms; the splat adds them in 32 strided partial sums (one per warp lane) instead of one running sum:
    # float32 rounding, well below the 1e-4 the GPU must meet.
    for transpose in (False, True):
        torch.testing.assert_close(emu.filter(v, transpose=transpose), cpu.filter(v, transpose=transpose),
                                   rtol=1e-5, atol=0)
    torch.testing.assert_close(emu.filter(v, normalize=True), cpu.filter(v, normalize=True), rtol=1e-5, atol=0)
    # and the transpose really is a different operator here, so the comparison above can tell the blur order
    assert not torch.allclose(cpu.filter(v), cpu.filter(v, transpose=True), rtol=1e-6, atol=0)


def disjoint_impulses(lat: Permutohedral, channels: int, seed: int = 0) -> torch.Tensor:
    """(B, C, H, W) values nonzero only at pixels no two of which share a lattice vertex (picked greedily).

    Every vertex then receives at most one nonzero splat term: its sum is exact in any order, so the CPU and CUDA
    splats agree bitwise and the outputs compare the blur and slice arithmetic alone.
    """
    b, _, h, w = lat.shape
    vtx = lat.state.vertex_ids.tolist()
    used: set[int] = set()
    keep = torch.zeros(b * h * w, dtype=torch.bool)
    for p in torch.randperm(b * h * w, generator=torch.Generator().manual_seed(seed)).tolist():
        corners = set(vtx[p])
        if -1 not in corners and not corners & used:
            used |= corners
            keep[p] = True
    vals = torch.randn(b * h * w, channels, generator=torch.Generator().manual_seed(seed + 1)) * keep[:, None]
    return vals.reshape(b, h, w, channels).permute(0, 3, 1, 2)


def test_emulated_blur_and_slice_are_bitwise_the_cpu_ones(emulated):
    img = photo_batch(40)
    f = rgbxy_features(img, 13.0, 30.0)
    r = padded_roi(img.shape[0], 40)
    cpu, emu = Permutohedral(f, roi=r), build_with(emulated, f, roi=r)
    assert_same_lattice(cpu, emu)
    v = disjoint_impulses(cpu, 21)
    assert int((v[:, 0] != 0).sum()) >= 8 * img.shape[0]  # enough impulses to spread over most vertices
    for transpose in (False, True):
        a, b = cpu.filter(v, transpose=transpose), emu.filter(v, transpose=transpose)
        assert torch.equal(a, b), f"transpose={transpose}: {int((a != b).sum())} of {a.numel()} outputs differ"


def test_emulated_splat_of_long_rows_equals_cpu(emulated):
    """Vertices with thousands of entries: their CSR rows are cut into splat segments summed in a second pass."""
    img = photo_batch(64, ("astronaut", "coffee"))
    f = rgbxy_features(img, 60.0, 40.0)  # wide kernels: few vertices, long rows
    cpu, emu = Permutohedral(f), build_with(emulated, f)
    ptr = emu.state.splat_ptr
    rows = ptr[1:] - ptr[:-1]
    assert int(rows.max()) > 2 * 512 and int((rows > 512).sum()) >= 2  # several rows of several segments
    v = torch.rand(2, 21, 64, 64)
    for transpose in (False, True):
        out = emu.filter(v, transpose=transpose)
        torch.testing.assert_close(out, cpu.filter(v, transpose=transpose), rtol=1e-5, atol=0)
        assert torch.equal(out, emu.filter(v, transpose=transpose))


def test_emulated_kernel_rejects_bad_state(emulated):
    lat = build_with(emulated, rgbxy_features(photo_tensor("coffee", crop=16), 15.0, 10.0))
    with pytest.raises(RuntimeError, match="values have 100 pixels, the lattice 256"):
        emulated.filter(torch.zeros(100, 3), *lat.state[:5], False, 1)
    with pytest.raises(RuntimeError, match="nbr must be Int"):
        emulated.filter(torch.zeros(256, 3), *lat.state[:2], lat.state.neighbors.long(), *lat.state[3:5], False, 1)
    with pytest.raises(RuntimeError, match="multiple of the batch size"):
        _ext.build_lattice("cuda-emulation", torch.zeros(10, 5), None, 3)


# ---------------------------------------------------------------------------------------------- compile check


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: no compile check of the CUDA sources")
def test_cuda_sources_compile_with_nvcc():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_check.py")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK ") == 2, res.stdout


# ------------------------------------------------------------------------------------------------- GPU tests


@pytest.fixture(scope="module")
def photos256():
    return photo_batch(256)


@gpu
def test_gpu_builds_the_cpu_lattice(photos256):
    # Bitwise the same lattice: vertex ids, barycentric weights, neighbours, counts and CSR (see nclib._ext).
    f = rgbxy_features(photos256, 15.0, 100.0)
    r = padded_roi(f.shape[0], 256)
    assert_same_lattice(Permutohedral(f, roi=r), Permutohedral(f.cuda(), roi=r.cuda()))
    f = xy_features(photos256, 3.0)
    assert_same_lattice(Permutohedral(f), Permutohedral(f.cuda()))


@gpu
def test_gpu_blur_and_slice_are_bitwise_the_cpu_ones():
    img = photo_batch(64)
    f = rgbxy_features(img, 13.0, 30.0)
    r = padded_roi(img.shape[0], 64)
    cpu, gpu_lat = Permutohedral(f, roi=r), Permutohedral(f.cuda(), roi=r.cuda())
    v = disjoint_impulses(cpu, 21)
    for transpose in (False, True):
        a, b = cpu.filter(v, transpose=transpose), gpu_lat.filter(v.cuda(), transpose=transpose).cpu()
        assert torch.equal(a, b), f"transpose={transpose}: {int((a != b).sum())} of {a.numel()} outputs differ"


@gpu
@pytest.mark.parametrize("sigma_rgb, sigma_xy", [(15.0, 100.0), (13.0, 80.0), (15.0, 10.0)])
def test_gpu_normalized_output_equals_cpu(photos256, sigma_rgb, sigma_xy):
    f = rgbxy_features(photos256, sigma_rgb, sigma_xy)
    probs = torch.softmax(3 * torch.randn(f.shape[0], 21, 256, 256), dim=1)
    cpu = Permutohedral(f).filter(probs, normalize=True)
    lat = Permutohedral(f.cuda())
    out = lat.filter(probs.cuda(), normalize=True)
    assert out.is_cuda and out.shape == cpu.shape
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=0)
    # the photo's own colours too (unnormalized as well: same scale on both devices)
    torch.testing.assert_close(lat.filter(photos256.cuda()).cpu(), Permutohedral(f).filter(photos256),
                               rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("channels", [1, 2, 21, 64, 300])
def test_gpu_any_channel_count(channels):
    img = photo_batch(64, ("astronaut", "chelsea"))
    f = rgbxy_features(img, 15.0, 20.0)
    v = torch.rand(2, channels, 64, 64)
    torch.testing.assert_close(Permutohedral(f.cuda()).filter(v.cuda()).cpu(), Permutohedral(f).filter(v),
                               rtol=1e-4, atol=1e-6)


@gpu
def test_gpu_backward_is_exact_adjoint(photos256):
    lat = Permutohedral(rgbxy_features(photos256, 15.0, 30.0).cuda())
    x = torch.rand(4, 5, 256, 256, device="cuda")
    y = torch.rand(4, 5, 256, 256, device="cuda")
    lhs = float((lat.filter(x).double() * y.double()).sum())
    rhs = float((x.double() * lat.filter(y, transpose=True).double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    assert abs(lhs - float((x.double() * lat.filter(y).double()).sum())) > 1e-5 * abs(lhs)  # test can fail
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(lat.filter(xg), xg, y)
    assert torch.equal(g, lat.filter(y, transpose=True))


@gpu
def test_gpu_autograd_matches_cpu(photos256):
    f = rgbxy_features(photos256, 15.0, 100.0)
    x = torch.rand(4, 3, 256, 256)
    w = torch.randn(4, 3, 256, 256)
    grads = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        loss = (gaussian_filter(xd, f.to(dev), normalize=True) * w.to(dev)).sum()
        (g,) = torch.autograd.grad(loss, xd)
        grads.append(g.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@gpu
def test_gpu_bitwise_reproducible(photos256):
    f = rgbxy_features(photos256, 15.0, 100.0).cuda()
    v = torch.rand(4, 21, 256, 256, device="cuda")
    a, b = Permutohedral(f), Permutohedral(f)
    assert_same_lattice(a, b)
    assert torch.equal(a.filter(v), b.filter(v))


@gpu
def test_gpu_roi_pixels_neither_give_nor_receive(photos256):
    f = rgbxy_features(photos256, 15.0, 30.0)
    roi = padded_roi(4, 256)
    v = torch.rand(4, 7, 256, 256)
    out = Permutohedral(f.cuda(), roi=roi.cuda()).filter(v.cuda()).cpu()
    assert torch.equal(out * (~roi[:, None]), torch.zeros_like(out))
    v2 = torch.where(roi[:, None], v, torch.full_like(v, 1e3))  # changing outside pixels changes nothing
    out2 = Permutohedral(f.cuda(), roi=roi.cuda()).filter(v2.cuda()).cpu()
    assert torch.equal(out, out2)
    torch.testing.assert_close(out, Permutohedral(f, roi=roi).filter(v), rtol=1e-4, atol=1e-6)


@gpu
def test_gpu_mixed_devices_is_a_value_error(photos256):
    lat = Permutohedral(rgbxy_features(photos256, 15.0, 30.0).cuda())
    with pytest.raises(ValueError, match="device"):
        lat.filter(torch.rand(4, 3, 256, 256))
    with pytest.raises(ValueError, match="device"):
        gaussian_filter(torch.rand(4, 3, 256, 256), rgbxy_features(photos256, 15.0, 30.0).cuda())


@gpu
def test_gpu_nc_loss_equals_cpu(photos256):
    from nclib.losses import normalized_cut_loss

    logits = torch.randn(4, 21, 256, 256)
    vals, grads = [], []
    for dev in ("cpu", "cuda"):
        x = logits.to(dev).requires_grad_()
        loss = normalized_cut_loss(torch.softmax(x, 1), photos256.to(dev), sigma_rgb=15.0, sigma_xy=100.0)
        (g,) = torch.autograd.grad(loss, x)
        vals.append(float(loss))
        grads.append(g.cpu())
    assert abs(vals[1] - vals[0]) <= 1e-4 * abs(vals[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * float(grads[0].abs().max()))


@gpu
def test_gpu_dense_crf_equals_cpu(photos256):
    crf = pytest.importorskip("nclib.crf")
    probs = torch.softmax(2 * torch.randn(4, 21, 256, 256), dim=1)
    cpu = crf.dense_crf(probs, photos256)
    out = crf.dense_crf(probs.cuda(), photos256.cuda())
    assert out.is_cuda
    # 10 mean-field iterations (softmax of filtered messages) may grow float rounding a little; a wrong kernel
    # changes probabilities by O(0.1).
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-3, atol=1e-4)
