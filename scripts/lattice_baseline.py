"""The CPU lattice kernel of another git revision (default ``main``), built beside ours for same-run comparisons.

``NCLIB_BASELINE_REF`` names the revision (any ``git rev-parse`` name). Its ``nclib/csrc`` sources are taken with
``git show`` (no worktree, nothing checked out) into ``$NCLIB_BUILD_DIR/baseline-<sha>`` and JIT-built with the
flags of our own kernel, so the comparison is of the sources alone. A revision whose kernel sources equal this
checkout's (e.g. ``HEAD`` of a clean tree) is this checkout's kernel: nothing is built, the ratios measure the noise.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from nclib import _ext
from nclib.lattice import to_pixel_major

ROOT = Path(__file__).resolve().parents[1]


def baseline_ref() -> str:
    return os.environ.get("NCLIB_BASELINE_REF", "main")


def load_baseline():
    """(module with build/filter, short sha) of the baseline revision's CPU kernel."""
    from torch.utils.cpp_extension import load

    ref = baseline_ref()
    sha = subprocess.check_output(["git", "rev-parse", "--short=10", ref], cwd=ROOT, text=True).strip()
    names = subprocess.check_output(["git", "ls-tree", "--name-only", sha, "nclib/csrc/"], cwd=ROOT, text=True).split()
    texts = {name: subprocess.check_output(["git", "show", f"{sha}:{name}"], cwd=ROOT)
             for name in names if name.endswith((".h", "lattice_cpu.cpp"))}
    if all((ROOT / name).is_file() and (ROOT / name).read_bytes() == text for name, text in texts.items()):
        return _ext.load("cpu"), sha  # the same kernel sources: a second build would only cost a minute
    src = _ext.build_root() / f"baseline-{sha}"
    src.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        # The baseline's torch ops under their own namespace: ours are registered in this process already, and a
        # second registration of a name aborts it. The bench calls the baseline's pybind functions only.
        text = re.sub(rb"TORCH_LIBRARY(_FRAGMENT)?\((\w+)", rb"TORCH_LIBRARY\1(\2_baseline", text)
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


class _PixelMajorOnly:
    """A kernel module without the NCHW (``channel_major``) filter or ``out=``, as the Python side of the day fed
    it: values transposed to pixel-major before the call, the result returned as a permuted view (no copy)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def filter(self, values, *args, channel_major=False, out=None):
        if channel_major:
            b, c, n = values.shape
            pm = to_pixel_major(values.view(b, c, n, 1))  # the blocked per-image transpose the old side used
            result = self.module.filter(pm, *args).view(b, n, c).permute(0, 2, 1)
        else:
            result = self.module.filter(values, *args)
        return result if out is None else out.copy_(result)  # no out= in the old kernel: a copy, as it would be


class using_kernel:
    """Context in which ``nclib.lattice`` builds its CPU lattices with ``module`` (e.g. the baseline kernel).

    The Python side (checks, layouts) stays this checkout's, so a timing inside compares the kernels alone; a
    kernel without the NCHW filter gets the transposes its own day's Python side made.
    """

    def __init__(self, module):
        self.module = module if _takes_channel_major(module) else _PixelMajorOnly(module)

    def __enter__(self):
        self.saved = _ext.load("cpu")
        _ext._loaded["cpu"] = self.module  # the loader's cache: what Permutohedral picks up
        return self.module

    def __exit__(self, *exc):
        _ext._loaded["cpu"] = self.saved


def _takes_channel_major(module) -> bool:
    return "channel_major" in (module.filter.__doc__ or "")


def paired_median_ms(ours, theirs, runs: int, baseline, clock=None, warmup: int = 1) -> tuple[float, float]:
    """Median ms of ``ours()`` and of ``theirs()`` (run under the baseline kernel), calls alternating so that the
    noise of a shared machine falls on both alike; ``warmup`` untimed calls each first. ``clock``: default wall time
    (time.perf_counter); time.process_time gives this process's CPU time, which other processes disturb less."""
    import statistics
    import time

    clock = clock or time.perf_counter
    a, b = [], []
    for _ in range(warmup):
        ours()
        with using_kernel(baseline):
            theirs()
    for _ in range(runs):
        t0 = clock()
        ours()
        a.append((clock() - t0) * 1e3)
        with using_kernel(baseline):
            t0 = clock()
            theirs()
            b.append((clock() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)
