"""The C++ boundary: JIT builds of the lattice kernels and the typed calls into them.

Build kinds (:data:`BUILD_KINDS`), each a separate extension module built by ``torch.utils.cpp_extension.load``:

* ``"cpu"``: ``lattice_cpu.cpp`` (with the NC loss's fused ``filter_sym``), ``meanfield_cpu.cpp``, ``gauss_xy_cpu.cpp``,
  ``layout_cpu.cpp`` and ``resize_cpu.cpp`` for CPU
  tensors (``-march=native`` unless ``NCLIB_NATIVE=0``);
* ``"cuda"``: ``lattice_cuda.cpp`` + ``lattice_cuda.cu`` through nvcc, for CUDA tensors;
* ``"cuda-emulation"``: the very CUDA kernel code compiled as host C++ (``NCLIB_CUDA_EMULATE``) with the CPU
  kernel's flags, one host thread per launch, on CPU tensors: how tests and ``scripts/gpu_check.sh`` run the GPU
  code on machines without a GPU.

Each build lives in ``$NCLIB_BUILD_DIR`` (default ``~/.cache/nclib``) under a folder named by :func:`cache_key`:
the sources, torch, the compile flags, the host CPU (``-march=native``), the GPU capabilities and CUDA / nvcc
version (``"cuda"``), the source folder and the interpreter prefix. A build is never reused where it would crash
("no kernel image", illegal instruction), and two checkouts or virtualenvs stop rebuilding each other's folder.

Builds are serialised with an OS file lock (``fcntl`` on POSIX, ``msvcrt`` on Windows) that the OS releases when a
process dies, so a killed build never blocks the next one (torch's own ``lock`` file is removed when we hold ours:
it can only be stale then). Where neither exists builds are not serialised (see :data:`LOCK_KIND`).

What is bitwise equal between the ``"cpu"`` and ``"cuda"`` builds (both compiled without multiply-add contraction:
g++ ``-ffp-contract=off`` for host code, nvcc ``-fmad=false`` for device code, no fast-math option, so no
flush of subnormals):

* the lattice, i.e. every :class:`LatticeState` field but the splat CSR: vertex numbering (image by image, in the
  order of the first (pixel, corner) entry that touches a vertex), barycentric weights, neighbours, vertex counts;
* blur and slice: the same products and sums in the same order, so equal splatted values give equal outputs.

The splat is not: the CPU adds each vertex's entries in pixel order, the GPU in 32 strided partial sums and a
fixed butterfly. Filter outputs therefore agree to float rounding (about 1e-6 relative), and each build is
bitwise reproducible run to run. tests/test_cuda.py checks all of this on the ``"cuda-emulation"`` build.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Optional

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

_CSRC = Path(__file__).resolve().parent / "csrc"
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}

#: The extension modules :func:`load` can build.
BUILD_KINDS = ("cpu", "cuda", "cuda-emulation")
#: How concurrent builds are serialised here: "fcntl", "msvcrt", or "none" (no OS lock available: two processes
#: building the same kernel at once may collide; build once before starting parallel jobs).
LOCK_KIND = "fcntl" if fcntl is not None else "msvcrt" if msvcrt is not None else "none"
LOCK_TIMEOUT_S = float(os.environ.get("NCLIB_BUILD_LOCK_TIMEOUT", 900))


class ExtensionUnavailable(RuntimeError):
    """The compiled kernel cannot be built or loaded; the message says why and how to fix it."""


class LatticeState(NamedTuple):
    """What a lattice build returns, for P = B*H*W pixels, D features and V occupied vertices (layout contract:
    ``csrc/lattice_common.h``). Every build kind returns the same tensors on the features' device."""

    #: (P, D+1) int32: global vertex id of each pixel's simplex corners; -1 for pixels outside the roi.
    vertex_ids: torch.Tensor
    #: (P, D+1) float32: barycentric weight of each corner (0 outside the roi).
    barycentric: torch.Tensor
    #: (V, D+1, 2) int32: each vertex's neighbour along lattice axis a, [.., 0] below and [.., 1] above; -1 absent.
    neighbors: torch.Tensor
    #: (V+1,) int64: splat CSR row pointers into ``splat_entries``; empty from the ``"cpu"`` build (it scatters).
    splat_ptr: torch.Tensor
    #: (nnz,) int32: flat (pixel, corner) indices p*(D+1)+r splatting onto each vertex, increasing per vertex.
    splat_entries: torch.Tensor
    #: (B,) int64: occupied vertices of each image (image b owns a contiguous id range).
    vertices_per_image: torch.Tensor

    @property
    def num_vertices(self) -> int:
        return int(self.neighbors.shape[0])


def build_root() -> Path:
    root = os.environ.get("NCLIB_BUILD_DIR") or os.path.join(Path.home(), ".cache", "nclib")
    return Path(root)


def _check_kind(kind: str) -> None:
    if kind not in BUILD_KINDS:
        raise ValueError(f"kind must be one of {BUILD_KINDS}, got {kind!r}")


def _sources(kind: str) -> list[Path]:
    """The translation units of ``kind`` (the emulation compiles one generated file that includes both CUDA ones)."""
    if kind == "cpu":  # + torch.ops.nclib_both.filter_sym (NC loss), nclib_meanfield.update, nclib_gauss.blur_xy (CRF),
        # nclib_layout.transpose (to / from pixel-major), nclib_resize.bilinear_adjoint (NC's scale < 1)
        return [_CSRC / "lattice_cpu.cpp", _CSRC / "meanfield_cpu.cpp", _CSRC / "gauss_xy_cpu.cpp",
                _CSRC / "layout_cpu.cpp", _CSRC / "resize_cpu.cpp"]
    return [_CSRC / "lattice_cuda.cpp", _CSRC / "lattice_cuda.cu"]


def cxx_flags(kind: str) -> list[str]:
    """Host-compiler flags of the ``kind`` kernel (the emulation takes the CPU kernel's, so it rounds like it).

    No multiply-add fusion: the embedding in lattice_common.h must round the same on every CPU (-march=native
    fuses by default) and on the GPU (nvcc -fmad=false), or CPU and CUDA lattices differ at ties.
    """
    _check_kind(kind)
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
    if kind != "cuda" and os.environ.get("NCLIB_NATIVE", "1") == "1":
        flags.append("-march=native")  # JIT-built on the machine that runs it; NCLIB_NATIVE=0 opts out
    return flags + openmp_flags()


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's CPU parallel backend is OpenMP: ``at::parallel_for`` is a header template whose
    ``#pragma omp parallel`` an extension compiled without it ignores, so every kernel ran on one thread. The
    extension then shares torch's OpenMP runtime (the same ``libgomp.so.1`` soname) and its thread count."""
    import torch

    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def cuda_flags() -> list[str]:
    """nvcc flags of the ``"cuda"`` kernel: no FMA contraction in device (-fmad=false) nor host code, and no
    nvcc fast-math option (it flushes subnormals to zero on the GPU only)."""
    return ["-O3", "-fmad=false", "-Xcompiler", "-ffp-contract=off"]


def _host_cpu() -> str:
    """The host CPU type, as far as ``-march=native`` can see it (model and instruction-set flags)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
        for field in ("model name", "flags", "Features", "CPU part"):
            hit = next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == field), None)
            if hit:
                parts.append(hit)
    except OSError:  # not Linux: machine and processor are what we have
        pass
    return " | ".join(p for p in parts if p)


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = str(Path(CUDA_HOME, "bin", "nvcc")) if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "none"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
    m = re.search(r"release [^\n]*", out)
    return m.group(0) if m else out.strip()[-200:]


def _gpu_capabilities() -> str:
    if not torch.cuda.is_available():
        return "none"
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ",".join(f"{a}.{b}" for a, b in caps)


def cache_key(kind: str) -> dict[str, str]:
    """Everything the ``kind`` build depends on, by name; :func:`extension_name` hashes it.

    Sources (every .cpp/.cu/.h by content), torch, the compile flags, the C++ compiler, the host CPU type
    (``-march=native``), for ``"cuda"`` the GPU capabilities, ``TORCH_CUDA_ARCH_LIST`` and the CUDA / nvcc
    versions, and the source folder and interpreter prefix (one build folder per checkout and virtualenv).
    """
    _check_kind(kind)
    h = hashlib.sha1()
    for f in sorted(_sources(kind) + sorted(_CSRC.glob("*.h"))):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    key = {
        "kind": kind,
        "sources": h.hexdigest(),
        "torch": torch.__version__,
        "cxx": os.environ.get("CXX", "c++"),
        "cxx_flags": " ".join(cxx_flags(kind)),
        "host_cpu": _host_cpu(),
        "source_path": str(_CSRC),
        "prefix": sys.prefix,
    }
    if kind == "cuda":
        key.update(
            cuda_flags=" ".join(cuda_flags()),
            torch_cuda=str(torch.version.cuda),
            nvcc=_nvcc_version(),
            gpu_capabilities=_gpu_capabilities(),
            cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        )
    return key


def extension_name(kind: str) -> str:
    """Name (and build sub-folder) of the ``kind`` extension: changes whenever anything in :func:`cache_key` does."""
    digest = hashlib.sha1(json.dumps(cache_key(kind), sort_keys=True).encode()).hexdigest()[:12]
    return f"nclib_lattice_{kind.replace('-', '_')}_{digest}"


def _check_toolchain(cuda: bool) -> None:
    # pip's ninja lives next to the interpreter; make it visible even in a non-activated venv.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        raise ExtensionUnavailable(
            "nclib needs ninja to build its C++ kernel: `pip install ninja` (or `apt-get install ninja-build`)."
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(
            f"nclib needs a C++ compiler ({cxx!r} not found): install gcc/g++ (e.g. `apt-get install g++`) "
            "or set CXX."
        )
    if cuda:
        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise ExtensionUnavailable(
                "a CUDA tensor was given but this torch build has no usable CUDA "
                f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda})."
            )
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or shutil.which("nvcc") is None and not Path(CUDA_HOME, "bin", "nvcc").exists():
            raise ExtensionUnavailable(
                "the CUDA lattice kernel needs nvcc (the CUDA toolkit matching torch.version.cuda="
                f"{torch.version.cuda}); install it or set CUDA_HOME."
            )


def _try_lock(fd: int) -> bool:
    """Take the exclusive OS lock on ``fd`` without blocking; False if another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    elif msvcrt is not None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    return True  # LOCK_KIND == "none": nothing to take


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class _BuildLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while not _try_lock(self.fd):
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise ExtensionUnavailable(
                    f"waited {LOCK_TIMEOUT_S:.0f} s for another process building the nclib kernel "
                    f"(lock {self.path}). If no such process runs, delete {self.path.parent} and retry."
                )
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        _unlock(self.fd)
        os.close(self.fd)


_EMULATION_SOURCE = '#define NCLIB_CUDA_EMULATE 1\n#include "lattice_cuda.cu"\n#include "lattice_cuda.cpp"\n'


def _build(kind: str, name: str, build_dir: Path) -> ModuleType:
    from torch.utils.cpp_extension import load as _load

    sources = [str(s) for s in _sources(kind)]
    if kind == "cuda-emulation":  # one host translation unit holding the kernels and their binding
        src = build_dir / "emulation.cpp"
        if not src.exists() or src.read_text() != _EMULATION_SOURCE:
            src.write_text(_EMULATION_SOURCE)
        sources = [str(src)]
    (build_dir / "cache_key.json").write_text(json.dumps(cache_key(kind), indent=1, sort_keys=True))
    return _load(
        name=name,
        sources=sources,
        extra_cflags=cxx_flags(kind),
        extra_cuda_cflags=cuda_flags() if kind == "cuda" else None,
        extra_ldflags=openmp_flags(),
        extra_include_paths=[str(_CSRC)],
        build_directory=str(build_dir),
        verbose=os.environ.get("NCLIB_VERBOSE_BUILD") == "1",
    )


def load(kind: str = "cpu") -> ModuleType:
    """Build (first call) and import the ``kind`` lattice extension, one of :data:`BUILD_KINDS`."""
    _check_kind(kind)
    if kind in _loaded:
        return _loaded[kind]
    if kind in _errors:
        raise ExtensionUnavailable(_errors[kind])
    try:
        _check_toolchain(kind == "cuda")
        name = extension_name(kind)
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        with _BuildLock(build_root() / f"{name}.flock"):
            stale = build_dir / "lock"
            if stale.exists():  # we hold the only lock: torch's file is left over from a killed build
                stale.unlink()
            module = _build(kind, name, build_dir)
    except ExtensionUnavailable as e:
        _errors[kind] = str(e)
        raise
    except Exception as e:  # compiler errors, import errors
        msg = (
            f"building the nclib {kind} lattice kernel failed: {e}\n"
            f"Build folder: {build_root()} (logs and build.ninja inside). Run with NCLIB_VERBOSE_BUILD=1 to see "
            "the compiler output; delete the folder to force a clean rebuild."
        )
        _errors[kind] = msg
        raise ExtensionUnavailable(msg) from e
    _loaded[kind] = module
    return module


def available(kind: str = "cpu") -> bool:
    """Whether the ``kind`` extension loads (built on first call); False instead of raising
    :class:`ExtensionUnavailable`, for callers with a plain-torch fallback."""
    try:
        load(kind)
    except ExtensionUnavailable:
        return False
    return True


def kind_for(device: torch.device) -> str:
    """The build kind that runs on tensors of ``device``."""
    return "cuda" if device.type == "cuda" else "cpu"


def build_lattice(kind: str, features_pm: torch.Tensor, roi: Optional[torch.Tensor], batch: int) -> LatticeState:
    """Build the lattice of ``features_pm`` (P, D) contiguous float32 with the ``kind`` kernel.

    ``roi``: None (every pixel) or a (P,) contiguous bool tensor; ``batch`` images of P / batch pixels each.
    """
    kernel = load(kind)
    if roi is None:  # the kernels' "no roi" is an empty tensor
        roi = torch.empty(0, dtype=torch.bool, device=features_pm.device)
    return LatticeState(*kernel.build(features_pm, roi, int(batch)))


def apply_lattice(kind: str, state: LatticeState, values: torch.Tensor, transpose: bool,
                  channel_major: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Splat, blur and slice ``values`` (P, C) contiguous float32 on ``state``; ``transpose``: the exact adjoint.

    ``"cpu"`` build only: ``channel_major`` takes and returns (B, C, H*W) (NCHW memory) instead; ``out`` (shaped
    like ``values``) receives the result instead of a new tensor (loops that filter many times).
    """
    s = state
    args = (values, s.vertex_ids, s.barycentric, s.neighbors, s.splat_ptr, s.splat_entries, bool(transpose),
            int(s.vertices_per_image.shape[0]))
    if channel_major or out is not None:
        if kind != "cpu":
            raise ValueError(f"channel_major values and out need the 'cpu' build, not {kind!r}")
        return load(kind).filter(*args, channel_major=channel_major, out=out)
    return load(kind).filter(*args)
