"""The CUDA lattice kernel: the same lattice and the same results as the CPU kernel.

Three layers, so that something runs on every machine:

* host emulation (always): ``lattice_cuda.cu`` compiled as C++ with ``NCLIB_CUDA_EMULATE`` runs the very kernel
  code, one host thread per launch (in reverse index order), on CPU tensors; it must rebuild the CPU kernel's
  lattice (same vertices, ids, neighbours; weights to float rounding) and filter like it;
* compile check (where nvcc exists): ``scripts/cuda_check.py`` compiles the CUDA sources without a GPU;
* GPU tests (a CUDA device and a CUDA build of torch; ``make gpu-check``): GPU against CPU on real photos, exact
  adjoint, autograd, losses and dense CRF.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import nclib.lattice as lattice_mod
from nclib.photos import BUNDLED as PHOTOS, photo_tensor
from nclib import Permutohedral, gaussian_filter, rgbxy_features, xy_features
from nclib import _ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "nclib" / "csrc"
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of torch (make gpu-check)")

STATE = ("_vtx", "_bary", "_nbr", "_csr_ptr", "_csr_idx", "vertices_per_image")
# Barycentric weights are compared to float rounding: compilers that fuse multiply-adds of the embedding
# differently (GCC -march=native without -ffp-contract=off; nvcc without -fmad=false) round them differently.
BARY_ATOL = 1e-6


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


def assert_same_lattice(a: Permutohedral, b: Permutohedral, bary_atol: float = 0.0) -> None:
    """Identical lattice state (vertex ids, neighbours, CSR; weights within ``bary_atol``), wherever each was built.

    The CPU build may return an empty CSR (it splats by scattering); then each non-empty CSR is checked against
    the one the contract defines from the vertex ids.
    """
    for name in STATE:
        ta, tb = getattr(a, name).cpu(), getattr(b, name).cpu()
        if name.startswith("_csr") and min(ta.numel(), tb.numel()) == 0:
            continue
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, (name, ta.shape, tb.shape)
        if name == "_bary" and bary_atol > 0:
            torch.testing.assert_close(ta, tb, rtol=0, atol=bary_atol)
            continue
        assert torch.equal(ta, tb), f"{name} differs in {int((ta != tb).sum())} of {ta.numel()} entries"
    for lat in (a, b):
        if lat._csr_ptr.numel() > 0:
            ptr, idx = reference_csr(lat._vtx.cpu())
            assert torch.equal(lat._csr_ptr.cpu(), ptr) and torch.equal(lat._csr_idx.cpu(), idx)


# --------------------------------------------------------------------------------------------- host emulation


def _cpu_kernel_flags() -> list[str]:
    """The flags nclib._ext gives the CPU kernel, so that the emulation rounds like it wherever possible."""
    if hasattr(_ext, "cxx_flags"):
        return list(_ext.cxx_flags("cpu"))
    flags = ["-O3", "-std=c++17", "-fno-math-errno"]
    if os.environ.get("NCLIB_NATIVE", "1") == "1":
        flags.append("-march=native")
    return flags


def _emulated_kernel():
    """Build (once, cached like the real kernels) the CUDA sources compiled for the host in emulation mode."""
    from torch.utils.cpp_extension import load

    _ext._check_toolchain(False)
    files = [CSRC / "lattice_cuda.cu", CSRC / "lattice_cuda.cpp", *sorted(CSRC.glob("*.h"))]
    flags = _cpu_kernel_flags()
    digest = f"{_ext._sources_digest(files)[:8]}_{zlib.crc32(' '.join(flags).encode()):08x}"
    name = f"nclib_lattice_cuda_emulated_{digest}"
    build_dir = _ext.build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _ext._BuildLock(_ext.build_root() / f"{name}.flock"):
        if (build_dir / "lock").exists():  # left over by a killed build: we hold the only real lock
            (build_dir / "lock").unlink()
        src = build_dir / "emulated.cpp"
        text = '#define NCLIB_CUDA_EMULATE 1\n#include "lattice_cuda.cu"\n#include "lattice_cuda.cpp"\n'
        if not src.exists() or src.read_text() != text:
            src.write_text(text)
        return load(
            name=name,
            sources=[str(src)],
            extra_cflags=_cpu_kernel_flags(),
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
        )


@pytest.fixture(scope="module")
def emulated():
    try:
        return _emulated_kernel()
    except _ext.ExtensionUnavailable as e:
        pytest.skip(f"no C++ toolchain: {e}")


def build_with(kernel, features, roi=None) -> Permutohedral:
    """A Permutohedral whose build and filter run on ``kernel`` (a loaded extension module)."""
    orig = lattice_mod._ext.load
    lattice_mod._ext.load = lambda kind="cpu": kernel
    try:
        return Permutohedral(features, roi=roi)
    finally:
        lattice_mod._ext.load = orig


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
    assert_same_lattice(cpu, emu, bary_atol=BARY_ATOL)
    if kind == "repeated":
        v0 = int(emu.vertices_per_image[0])
        assert int(emu.vertices_per_image[1]) == v0
        first = emu._vtx[:1600]
        assert torch.equal(emu._vtx[1600:3200], torch.where(first >= 0, first + v0, first))


def test_emulated_kernel_empty_roi(emulated):
    img = photo_batch(24, ("coffee", "rocket"))
    f = rgbxy_features(img, 15.0, 10.0)
    v = torch.rand(2, 4, 24, 24)
    roi = torch.ones(2, 24, 24, dtype=torch.bool)
    roi[0] = False  # one image entirely padding
    emu, cpu = build_with(emulated, f, roi=roi), Permutohedral(f, roi=roi)
    assert_same_lattice(cpu, emu, bary_atol=BARY_ATOL)
    assert int(emu.vertices_per_image[0]) == 0 and int(emu.vertices_per_image[1]) > 0
    torch.testing.assert_close(emu.filter(v), cpu.filter(v), rtol=1e-5, atol=0)
    assert torch.equal(emu.filter(v)[0], torch.zeros(4, 24, 24))
    none = build_with(emulated, f, roi=torch.zeros(2, 24, 24, dtype=torch.bool))  # no vertex at all
    assert none.num_vertices == 0 and none._csr_ptr.tolist() == [0] and none._csr_idx.numel() == 0
    assert torch.equal(none.filter(v), torch.zeros_like(v))


def test_emulated_filter_equals_cpu_filter(emulated):
    img = photo_batch(40)
    f = rgbxy_features(img, 13.0, 30.0)
    r = padded_roi(img.shape[0], 40)
    cpu, emu = Permutohedral(f, roi=r), build_with(emulated, f, roi=r)
    v = torch.rand(img.shape[0], 21, 40, 40)
    # Same terms; the splat adds them in 32 strided partial sums (one per warp lane) instead of one running sum,
    # and compilers may fuse multiply-adds differently: float32 rounding, well below the 1e-4 the GPU must meet.
    for transpose in (False, True):
        torch.testing.assert_close(emu.filter(v, transpose=transpose), cpu.filter(v, transpose=transpose),
                                   rtol=1e-5, atol=0)
    torch.testing.assert_close(emu.filter(v, normalize=True), cpu.filter(v, normalize=True), rtol=1e-5, atol=0)
    # and the transpose really is a different operator here, so the comparison above can tell the blur order
    assert not torch.allclose(cpu.filter(v), cpu.filter(v, transpose=True), rtol=1e-6, atol=0)


def test_emulated_splat_of_long_rows_equals_cpu(emulated):
    """Vertices with thousands of entries: their CSR rows are cut into splat segments summed in a second pass."""
    img = photo_batch(64, ("astronaut", "coffee"))
    f = rgbxy_features(img, 60.0, 40.0)  # wide kernels: few vertices, long rows
    cpu, emu = Permutohedral(f), build_with(emulated, f)
    rows = emu._csr_ptr[1:] - emu._csr_ptr[:-1]
    assert int(rows.max()) > 2 * 512 and int((rows > 512).sum()) >= 2  # several rows of several segments
    v = torch.rand(2, 21, 64, 64)
    for transpose in (False, True):
        out = emu.filter(v, transpose=transpose)
        torch.testing.assert_close(out, cpu.filter(v, transpose=transpose), rtol=1e-5, atol=0)
        assert torch.equal(out, emu.filter(v, transpose=transpose))


def test_emulated_kernel_rejects_bad_state(emulated):
    lat = build_with(emulated, rgbxy_features(photo_tensor("coffee", crop=16), 15.0, 10.0))
    with pytest.raises(RuntimeError, match="values have 100 pixels, the lattice 256"):
        emulated.filter(torch.zeros(100, 3), lat._vtx, lat._bary, lat._nbr, lat._csr_ptr, lat._csr_idx, False, 1)
    with pytest.raises(RuntimeError, match="nbr must be Int"):
        emulated.filter(torch.zeros(256, 3), lat._vtx, lat._bary, lat._nbr.long(), lat._csr_ptr, lat._csr_idx, False, 1)
    with pytest.raises(RuntimeError, match="multiple of the batch size"):
        emulated.build(torch.zeros(10, 5), torch.empty(0, dtype=torch.bool), 3)


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
    # Same vertices, ids, neighbours and CSR; weights to float rounding (see BARY_ATOL).
    f = rgbxy_features(photos256, 15.0, 100.0)
    r = padded_roi(f.shape[0], 256)
    assert_same_lattice(Permutohedral(f, roi=r), Permutohedral(f.cuda(), roi=r.cuda()), bary_atol=BARY_ATOL)
    f = xy_features(photos256, 3.0)
    assert_same_lattice(Permutohedral(f), Permutohedral(f.cuda()), bary_atol=BARY_ATOL)


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
