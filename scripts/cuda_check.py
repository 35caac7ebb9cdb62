"""Compile-only check of the CUDA lattice sources with nvcc: no GPU and no CUDA build of torch needed.

The CPU torch wheel ships the c10/cuda and ATen/cuda headers, so ``nvcc -c`` can compile lattice_cuda.cu and
lattice_cuda.cpp with (nearly) the flags ``torch.utils.cpp_extension.load`` uses on a GPU machine. Prints OK/FAIL
per file and exits non-zero on any failure; the object files go to a temporary folder.

Usage: python scripts/cuda_check.py [--nvcc PATH] [--arch 90] [--verbose]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the nclib of this checkout, whatever PYTHONPATH says

from nclib import _ext  # noqa: E402  (after the path set-up above)

CSRC = ROOT / "nclib" / "csrc"


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and Path(cuda_home, "bin", "nvcc").exists():
        return str(Path(cuda_home, "bin", "nvcc"))
    return shutil.which("nvcc")


# The CPU wheel lacks this build-generated header of c10/cuda; CUDA wheels define exactly this macro in it.
SHIM_HEADER = "c10/cuda/impl/cuda_cmake_macros.h"
SHIM_TEXT = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def compile_commands(nvcc: str, arch: str, shim_dir: Path, out_dir: Path) -> dict[str, list[str]]:
    """Commands mirroring cpp_extension.load for nclib._ext.load("cuda") (see nclib/_ext.py and torch's
    _write_ninja_file): the .cu through nvcc with -std=c++20 (torch's default for nvcc) and nclib._ext.cuda_flags();
    the .cpp through the host C++ compiler with -std=c++17 (nclib's extra_cflags override torch's c++20).

    Host code is compiled at -O0: parsing and template instantiation are what can fail, and it keeps the check
    short; device code keeps ptxas's full optimisation, so PTX/register errors still show.
    """
    import torch
    from torch.utils import cpp_extension as ce

    system = [*ce.include_paths(), sysconfig.get_paths()["include"]]
    if not any(Path(p, SHIM_HEADER).exists() for p in system):
        shim = shim_dir / SHIM_HEADER
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(SHIM_TEXT)
        system.append(str(shim_dir))
    common = [
        "-c",
        "-DTORCH_EXTENSION_NAME=nclib_cuda_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{CSRC}",
        *[a for p in system for a in ("-isystem", p)],
    ]
    cu = [
        nvcc,
        *common,
        *ce.COMMON_NVCC_FLAGS,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "--compiler-options",
        "-fPIC",
        "-O0",
        *[f for f in _ext.cuda_flags() if not f.startswith("-O")],
        "-std=c++20",
        str(CSRC / "lattice_cuda.cu"),
        "-o",
        str(out_dir / "lattice_cuda.cu.o"),
    ]
    cxx = os.environ.get("CXX", "c++")
    cpp = [cxx, *common, "-fPIC", "-O0", "-std=c++17", str(CSRC / "lattice_cuda.cpp"), "-o",
           str(out_dir / "lattice_cuda.cpp.o")]
    return {"lattice_cuda.cu": cu, "lattice_cuda.cpp": cpp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=None, help="nvcc executable (default: $CUDA_HOME/bin/nvcc or PATH)")
    ap.add_argument("--arch", default="90", help="compute capability to compile for, e.g. 80 or 90 (default 90)")
    ap.add_argument("--verbose", action="store_true", help="print the nvcc command lines")
    args = ap.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("cuda-check: nvcc not found (install the CUDA toolkit or set CUDA_HOME); nothing checked")
        return 2
    failures = 0
    with tempfile.TemporaryDirectory(prefix="nclib_cuda_check_") as tmp:
        cmds = compile_commands(nvcc, args.arch, Path(tmp) / "shim", Path(tmp))
        jobs = {}
        t0 = time.monotonic()
        for name, cmd in cmds.items():  # both at once: the check is dominated by parsing torch's headers
            if args.verbose:
                print(" ".join(cmd))
            jobs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, proc in jobs.items():
            src = CSRC / name
            try:
                log, _ = proc.communicate(timeout=max(1.0, 600 - (time.monotonic() - t0)))
                ok = proc.returncode == 0
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                ok, log = False, "timed out after 600 s"
            warnings = [ln for ln in log.splitlines() if "warning" in ln.lower() and str(CSRC) in ln]
            note = f" ({len(warnings)} warning(s) in nclib sources)" if warnings else ""
            print(f"{'OK  ' if ok else 'FAIL'} {src.relative_to(ROOT)}{note}")
            if not ok:
                failures += 1
                print(log[-6000:])
            elif warnings and args.verbose:
                print("\n".join(warnings))
    print(f"cuda-check: {len(jobs) - failures}/{len(jobs)} compiled in {time.monotonic() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
