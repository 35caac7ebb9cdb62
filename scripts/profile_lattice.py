"""Where the time of one lattice call goes: `python scripts/profile_lattice.py` -> benchmarks/lattice_profile.md.

The case of the speed goal (2 x 321^2 real photos, 21 channels, sigma_rgb 15, sigma_xy 100): the kernel's own
phase timers (``profile()`` of the CPU extension: wall ms of the last build and filter) and the Python-side steps of
``gaussian_filter(values, rgbxy_features(images, ...))`` timed one by one; medians of ``--runs`` calls, for 1 and
2 threads. With ``NCLIB_BASELINE_REF`` (default ``main``, ``none`` to skip) the baseline kernel's build and filter
are timed in the same run beside ours (it may have no phase timers).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nclib import _ext
from nclib._checks import check_finite
from nclib.lattice import Permutohedral, gaussian_filter, rgbxy_features, to_pixel_major

from benchutil import ROOT, median_ms, photos
from lattice_baseline import baseline_ref, load_baseline, paired_median_ms

KERNEL_PHASES = ("embed_hash", "merge", "remap", "neighbours", "splat", "blur", "slice")


def kernel_phases(feats: torch.Tensor, vals: torch.Tensor, runs: int) -> dict[str, float]:
    """Median wall ms of each kernel phase over `runs` build + filter calls."""
    kernel = _ext.load("cpu")
    seen: dict[str, list[float]] = {k: [] for k in KERNEL_PHASES}
    for _ in range(runs + 1):
        Permutohedral(feats).filter(vals)
        for name, ms in kernel.profile():
            seen[name].append(ms)
    return {k: statistics.median(v[1:]) for k, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "lattice_profile.md")
    args = ap.parse_args()
    imgs = photos(321)
    b = imgs.shape[0]
    vals = torch.rand(b, 21, 321, 321)
    feats = rgbxy_features(imgs, 15.0, 100.0)
    baseline, sha = (None, None) if baseline_ref() == "none" else load_baseline()

    lines = [
        "# Permutohedral lattice: time per phase",
        "",
        f"`python scripts/profile_lattice.py` ({platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, median of {args.runs} calls). One call: "
        "`gaussian_filter(values, rgbxy_features(images, 15, 100))`, batch 2, 321x321 real photos, 21 channels. "
        "Milliseconds per call (2 images); the machine is shared, so compare within a column.",
        "",
    ]
    load_before = os.getloadavg()[0]
    py_steps = {
        "rgbxy_features (checks, cat)": lambda: rgbxy_features(imgs, 15.0, 100.0),
        "check_finite(features)": lambda: check_finite("features", feats),
        "to_pixel_major(features)": lambda: to_pixel_major(feats),
        "check_finite(values)": lambda: check_finite("values", vals),
    }  # the values need no transpose: the CPU kernel reads and writes NCHW
    cols = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        col = {f"kernel: {k}": v for k, v in kernel_phases(feats, vals, args.runs).items()}
        for name, fn in py_steps.items():
            col[f"python: {name}"] = median_ms(fn, args.runs)
        ours, base = (median_ms(lambda: gaussian_filter(vals, rgbxy_features(imgs, 15.0, 100.0)), args.runs), None)
        if baseline is not None:
            ours, base = paired_median_ms(lambda: gaussian_filter(vals, rgbxy_features(imgs, 15.0, 100.0)),
                                          lambda: gaussian_filter(vals, rgbxy_features(imgs, 15.0, 100.0)),
                                          args.runs, baseline)
        col["sum of the phases above"] = sum(col.values())
        col["whole call, ours"] = ours
        if base is not None:
            col[f"whole call, baseline kernel ({sha})"] = base
            col["baseline / ours"] = base / ours
            # CPU time of this process: on a shared machine, less disturbed than wall time (1 thread: the work).
            call = lambda: gaussian_filter(vals, rgbxy_features(imgs, 15.0, 100.0))  # noqa: E731
            ours_cpu, base_cpu = paired_median_ms(call, call, args.runs, baseline, clock=time.process_time)
            col["whole call CPU time, ours"] = ours_cpu
            col["whole call CPU time, baseline kernel"] = base_cpu
            col["CPU time baseline / ours"] = base_cpu / ours_cpu
        cols[threads] = col
        print(threads, "threads:", {k: round(v, 2) for k, v in col.items()}, flush=True)
    lines += ["| phase | 1 thread ms | 2 threads ms |", "|---|---|---|"]
    for name in cols[1]:
        fmt = "{:.2f}x" if name.endswith("baseline / ours") else "{:.2f}"
        lines.append(f"| {name} | {fmt.format(cols[1][name])} | {fmt.format(cols[2][name])} |")
    lines += [
        "",
        f"Load average (1 min) over the run: {load_before:.1f} -> {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores; where it exceeds the core count, wall times are inflated and the CPU-time rows "
        "are the better comparison.",
        "",
        "Kernel phases (wall, from the extension's timers): embed_hash = embedding + block-local key numbering "
        "(parallel over pixel blocks), merge = block tables into image tables (serial per image), remap = local to "
        "global ids, neighbours = the blur's neighbour table; splat, blur, slice = one 21-channel filter. The rest "
        "of the whole call is the Python side (the steps listed, the output view, autograd bookkeeping).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
