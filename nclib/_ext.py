"""JIT build of the C++/CUDA lattice kernels with ``torch.utils.cpp_extension.load``.

The build happens once per source version into ``$NCLIB_BUILD_DIR`` (default ``~/.cache/nclib``). Builds are
serialised with an ``fcntl`` lock that the OS releases when a process dies, so a killed build never blocks the
next one (torch's own ``lock`` file is removed when we hold ours: it can only be stale then).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}

LOCK_TIMEOUT_S = float(os.environ.get("NCLIB_BUILD_LOCK_TIMEOUT", 900))


class ExtensionUnavailable(RuntimeError):
    """The compiled kernel cannot be built or loaded; the message says why and how to fix it."""


def build_root() -> Path:
    root = os.environ.get("NCLIB_BUILD_DIR") or os.path.join(Path.home(), ".cache", "nclib")
    return Path(root)


def _sources_digest(files: list[Path]) -> str:
    h = hashlib.sha1((torch.__version__ + os.environ.get("NCLIB_NATIVE", "1")).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


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


class _BuildLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise ExtensionUnavailable(
                        f"waited {LOCK_TIMEOUT_S:.0f} s for another process building the nclib kernel "
                        f"(lock {self.path}). If no such process runs, delete {self.path.parent} and retry."
                    ) from None
                time.sleep(0.5)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _sources(kind: str) -> list[Path]:
    return [_CSRC / "lattice_cpu.cpp"] if kind == "cpu" else [_CSRC / "lattice_cuda.cpp", _CSRC / "lattice_cuda.cu"]


def extension_name(kind: str) -> str:
    """Name (and build sub-folder) of the extension: changes whenever a source or torch changes."""
    return f"nclib_lattice_{kind}_{_sources_digest(_sources(kind) + sorted(_CSRC.glob('*.h')))}"


def cxx_flags(kind: str) -> list[str]:
    """Host-compiler flags of the ``kind`` kernel.

    No multiply-add fusion: the embedding in lattice_common.h must round the same on every CPU (-march=native
    fuses by default) and on the GPU (nvcc -fmad=false), or CPU and CUDA lattices differ at ties.
    """
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
    if kind == "cpu" and os.environ.get("NCLIB_NATIVE", "1") == "1":
        flags.append("-march=native")  # JIT-built on the machine that runs it; NCLIB_NATIVE=0 opts out
    return flags


def load(kind: str = "cpu") -> ModuleType:
    """Build (first call) and import the ``cpu`` or ``cuda`` lattice extension."""
    if kind in _loaded:
        return _loaded[kind]
    if kind in _errors:
        raise ExtensionUnavailable(_errors[kind])
    cuda = kind == "cuda"
    sources = _sources(kind)
    try:
        _check_toolchain(cuda)
        name = extension_name(kind)
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load as _load

        with _BuildLock(build_root() / f"{name}.flock"):
            stale = build_dir / "lock"
            if stale.exists():  # we hold the only lock: torch's file is left over from a killed build
                stale.unlink()
            flags = cxx_flags(kind)
            module = _load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=flags,
                extra_cuda_cflags=["-O3", "--use_fast_math", "-fmad=false"] if cuda else None,
                extra_include_paths=[str(_CSRC)],
                build_directory=str(build_dir),
                verbose=os.environ.get("NCLIB_VERBOSE_BUILD") == "1",
            )
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
