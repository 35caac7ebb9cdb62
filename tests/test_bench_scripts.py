"""Smoke test of `make bench`: every benchmark script runs end to end in ``--quick`` mode (tiny images, one run).

No test ran the scripts, so an API change broke the baseline-kernel adapter of scripts/lattice_baseline.py
unnoticed until the next `make bench`. Here each script runs in a child process as the Makefile runs it, with
its tables written to a temporary folder; the tables must parse with measured (finite, positive) numbers, and
neither benchmarks/ nor any other tracked file may change. The baseline paths compare this checkout with
itself: ``--baseline <repo root>`` for the losses and memory, ``NCLIB_BASELINE_REF=HEAD`` for the lattice
(its kernel sources equal ours, so nothing is compiled). The adapter for kernels older than the NCHW filter and
``out=`` is checked in-process against the current kernel.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from nclib import _ext
from nclib.crf import dense_crf
from nclib.lattice import Permutohedral, rgbxy_features, to_pixel_major
from nclib.photos import photo_tensor

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)", re.IGNORECASE)
WITH_BASELINE = re.compile(r"\d+\.\d \(\d+\.\d, \d+\.\d\dx\)")  # bench_lattice: "ours (baseline, baseline / ours)"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _is_checkout() -> bool:
    try:
        return _git("rev-parse", "HEAD").returncode == 0
    except OSError:  # no git
        return False


def _snapshot() -> tuple:
    """(benchmarks/ files with their bytes and mtimes, `git status` of the tracked and non-ignored files)."""
    files = {p.relative_to(ROOT).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in sorted((ROOT / "benchmarks").rglob("*")) if p.is_file()}
    status = _git("status", "--porcelain", "--untracked-files=all").stdout if _is_checkout() else ""
    return files, status


def _script_env(**extra: str) -> dict:
    """The environment `make bench` gives a script: the repo on PYTHONPATH, this session's kernel build folder."""
    return dict(os.environ, PYTHONPATH=str(ROOT), NCLIB_BUILD_DIR=str(_ext.build_root()), **extra)


def run_script(name: str, *args: str, env: dict | None = None) -> str:
    """Run scripts/<name> --quick with ``args`` as `make bench` does (the repo on PYTHONPATH, this session's kernel
    build folder so nothing is compiled twice); assert that it succeeds and leaves the tracked tree alone."""
    child_env = _script_env(OMP_NUM_THREADS="1", **(env or {}))
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), "--quick", *args], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    after = _snapshot()
    assert after[0] == before[0], f"{name} --quick changed benchmarks/"
    assert after[1] == before[1], f"{name} --quick changed the tracked tree:\n{before[1]}\n->\n{after[1]}"
    return proc.stdout


def tables(text: str) -> list[list[dict]]:
    """Every markdown table of ``text`` as a list of rows, each {header: cell}; the separator row dropped."""
    found, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = {"header": cells, "rows": []}
            found.append(current)
        elif not all(set(c) <= set("-: ") for c in cells):
            assert len(cells) == len(current["header"]), f"ragged row {line!r}"
            current["rows"].append(dict(zip(current["header"], cells)))
    return [t["rows"] for t in found]


def numbers(cell: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(cell)]


def check_table(rows: list[dict], positive: list[str], min_rows: int = 1) -> None:
    """At least ``min_rows`` rows; every number of every cell finite and >= 0; every ``positive`` column of every
    row holds a number, all of its numbers > 0 (a measured time, not a blank or a failed measurement)."""
    assert len(rows) >= min_rows, rows
    for row in rows:
        for header, cell in row.items():
            for x in numbers(cell):
                assert math.isfinite(x) and x >= 0, f"{header}: {cell!r} in {row}"
        for header in positive:
            got = numbers(row[header])
            assert got and all(x > 0 for x in got), f"{header}: {row[header]!r} in {row}"


def test_quick_needs_out():
    """--quick without --out is refused: a quick table must never replace a committed one."""
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_losses.py"), "--quick"], cwd=ROOT, env=_script_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--quick needs --out" in proc.stderr, proc.stderr
    assert _snapshot() == before


def test_baseline_env_needs_a_baseline_and_key_value(tmp_path):
    for args in (["--baseline-env", "NCLIB_KEEP_CPU_MEMORY=0"], ["--baseline", str(ROOT), "--baseline-env", "X"]):
        proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_losses.py"), "--quick", "--out",
                               str(tmp_path / "x.md"), *args], cwd=ROOT, env=_script_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "--baseline-env takes KEY=VALUE and needs --baseline" in proc.stderr, args
    assert not (tmp_path / "x.md").exists()


def test_bench_lattice_quick(tmp_path):
    clean = _is_checkout() and _git("diff", "--quiet", "HEAD", "--", "nclib/csrc").returncode == 0
    # HEAD's kernel sources equal ours: the baseline path runs without compiling a second kernel (minutes)
    ref = "HEAD" if clean else "none"
    out = tmp_path / "lattice.md"
    run_script("bench_lattice.py", "--threads", "1", "--out", str(out), env={"NCLIB_BASELINE_REF": ref})
    text = out.read_text()
    photo, scaling, accuracy = tables(text)
    timed = ["build ms/img", "filter ms/img", "total ms/img", "normalized filter ms/img"]
    check_table(photo, timed + ["vertices / pixels"])
    check_table(scaling, ["ms", "ns / pixel"], min_rows=2)
    check_table(accuracy, ["relative RMS error"])
    if ref == "HEAD":
        assert "the CPU kernel of `HEAD`" in text
        for cell in [r[c] for r in photo for c in timed] + [r["ms"] for r in scaling]:
            assert WITH_BASELINE.fullmatch(cell), f"no baseline figure in {cell!r}"


def test_bench_losses_quick_with_self_baseline(tmp_path):
    out = tmp_path / "losses.md"
    # the baseline child with glibc malloc as it is (an A/B of nclib.cpu_memory on one checkout)
    run_script("bench_losses.py", "--baseline", str(ROOT), "--baseline-env", "NCLIB_KEEP_CPU_MEMORY=0",
               "--out", str(out))
    text = out.read_text()
    assert "with NCLIB_KEEP_CPU_MEMORY=0." in text
    assert ("OMP_WAIT_POLICY=passive" in text) == ("OMP_WAIT_POLICY" not in os.environ)  # alternating children
    (rows,) = tables(text)
    measured = [r for r in rows if "not measured" not in r["what"]]
    ours = [r for r in measured if not r["what"].startswith("pydensecrf2")]
    assert len(ours) == 9, rows  # NC, at scale 0.5, its loss alone, build, filter, CRF, batch 2, CRF build, filter
    check_table(ours, ["ms", "baseline ms", "speed-up", "CPU ms", "baseline CPU ms", "CPU speed-up"])
    assert "Baseline: " in text
    if importlib.util.find_spec("pydensecrf") is None:
        assert any("pydensecrf2" in r["what"] and "not installed" in r["what"] for r in rows), rows
    else:
        (ref,) = [r for r in measured if r["what"].startswith("pydensecrf2")]
        check_table([ref], ["ms"])
        assert "Dense CRF, one image, vs pydensecrf2 in the same run:" in text
        assert "Dense CRF batch 2 vs pydensecrf2 in the same run:" in text and "(goal >= 2.5x)" in text


def test_bench_memory_quick_with_self_baseline(tmp_path):
    out = tmp_path / "memory.md"
    run_script("bench_memory.py", "--baseline", str(ROOT), "--out", str(out))
    (rows,) = tables(out.read_text())
    check_table(rows, ["inputs only", "peak after forward + backward"], min_rows=2)
    assert [r["checkout"] for r in rows] == ["this checkout", f"baseline {ROOT}"]
    for r in rows:  # the peak includes the inputs
        assert numbers(r["peak after forward + backward"])[0] >= numbers(r["inputs only"])[0], r


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.md"
    run_script("bench_train.py", "--out", str(out))
    (rows,) = tables(out.read_text())
    check_table(rows, ["s/step", "s/image", "x CE only"], min_rows=3)
    assert [r["loss"] for r in rows] == ["pCE", "pCE + NC", "pCE + NC"]
    assert rows[0]["x CE only"] == "1.00"


class PixelMajorKernel:
    """The interface of the CPU kernels before the NCHW filter and ``out=`` (e.g. 84ce452), backed by the current
    kernel called the old way: pixel-major (P, C) values in, a new (P, C) tensor out."""

    def __init__(self, module):
        self.build = module.build
        self.module = module

    def filter(self, values, vtx, bary, nbr, csr_ptr, csr_idx, transpose, batch):
        """Splat, blur and slice (P, C) values; transpose=True applies the adjoint"""
        assert values.dim() == 2 and values.is_contiguous()  # what the old kernels accepted
        return self.module.filter(values, vtx, bary, nbr, csr_ptr, csr_idx, transpose, batch)


def test_baseline_adapter_runs_the_current_api(monkeypatch):
    """Under ``using_kernel`` with an old-interface kernel, every call the current Python side makes (NCHW filter,
    adjoint, normalisation, ``out=`` buffers of the CRF) gives what the current kernel gives directly."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from lattice_baseline import using_kernel

    current = _ext.load("cpu")
    img = photo_tensor("astronaut", crop=32)
    feats = rgbxy_features(img, 15.0, 10.0)
    vals = torch.rand(1, 5, 32, 32)
    probs = torch.rand(1, 4, 32, 32).softmax(1)

    def run():
        lat = Permutohedral(feats)
        pm = to_pixel_major(vals)
        return [lat.filter(vals), lat.filter(vals, transpose=True), lat.filter(vals, normalize=True),
                lat.apply_pixel_major(pm), lat.apply_pixel_major(pm, out=torch.empty_like(pm)),
                dense_crf(probs, img, iterations=3)]

    direct = run()
    with using_kernel(PixelMajorKernel(current)) as adapted:
        assert not isinstance(adapted, PixelMajorKernel)  # wrapped in the adapter for old kernels
        assert _ext.load("cpu") is adapted  # which is what the lattice calls
        old_way = run()
    assert _ext.load("cpu") is current
    for ours, theirs in zip(direct, old_way):
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)


def test_profile_nc_quick(tmp_path):
    """The NC profile's smoke run writes both scales' tables with the caller's softmax named apart."""
    out = tmp_path / "nc_profile.md"
    run_script("profile_nc.py", "--out", str(out))
    text = out.read_text()
    assert "## scale 1.0" in text and "## scale 0.5" in text
    rows = [row for t in tables(text) for row in t]
    names = [row["operator"] for row in rows]
    assert "caller: softmax forward" in names and "lattice build (pybind, timed on its own)" in names
    assert all(float(row["ms per step"]) >= 0 for row in rows)
