"""The CPU lattice kernel of another git revision (default ``main``), built beside ours for same-run comparisons.

``NCLIB_BASELINE_REF`` names the revision (any ``git rev-parse`` name). Its ``nclib/csrc`` sources are taken with
``git show`` (no worktree, nothing checked out) into ``$NCLIB_BUILD_DIR/baseline-<sha>`` and JIT-built with the
flags of our own kernel, so the comparison is of the sources alone.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nclib import _ext

ROOT = Path(__file__).resolve().parents[1]


def baseline_ref() -> str:
    return os.environ.get("NCLIB_BASELINE_REF", "main")


def load_baseline():
    """(module with build/filter, short sha) of the baseline revision's CPU kernel."""
    from torch.utils.cpp_extension import load

    ref = baseline_ref()
    sha = subprocess.check_output(["git", "rev-parse", "--short=10", ref], cwd=ROOT, text=True).strip()
    names = subprocess.check_output(["git", "ls-tree", "--name-only", sha, "nclib/csrc/"], cwd=ROOT, text=True).split()
    src = _ext.build_root() / f"baseline-{sha}"
    src.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith((".h", "lattice_cpu.cpp")):
            text = subprocess.check_output(["git", "show", f"{sha}:{name}"], cwd=ROOT)
            dst = src / Path(name).name
            if not dst.exists() or dst.read_bytes() != text:
                dst.write_bytes(text)
    _ext._check_toolchain(False)
    module = load(
        name=f"nclib_lattice_cpu_baseline_{sha}",
        sources=[str(src / "lattice_cpu.cpp")],
        extra_cflags=_ext.cxx_flags("cpu"),
        extra_include_paths=[str(src)],
        build_directory=str(src),
    )
    return module, sha
