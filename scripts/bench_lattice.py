"""Benchmark of the CPU permutohedral filter: `make bench` -> benchmarks/lattice.md.

Real photos (scikit-image's bundled ones), 21 channels, sigma_rgb 15, sigma_xy 100, batch 2, 2 threads; medians of
several runs. The goals of the foundation issue are printed beside the measurements.

Every timing is paired with the CPU kernel of a baseline revision measured in the same run, calls alternating
(``NCLIB_BASELINE_REF``, default ``main``; see scripts/lattice_baseline.py): the Python side is this checkout's in
both, so the ratio (baseline / ours, > 1 is faster) is the kernels' alone. ``NCLIB_BASELINE_REF=none`` skips it.

``--quick --out FILE``: the same tables on tiny images, one run, no warm-up (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

import nclib
from nclib import Permutohedral, exact_gaussian_filter, rgbxy_features
from nclib.lattice import relative_rms_error
from nclib.photos import photo_tensor

from benchutil import median_ms, out_path, photos
from lattice_baseline import baseline_ref, load_baseline, paired_median_ms, using_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: benchmarks/lattice.md")
    ap.add_argument("--quick", action="store_true", help="tiny images, 1 run, no warm-up (a smoke test; needs --out)")
    args = ap.parse_args()
    args.out = out_path(ap, args, "lattice.md")
    table_sizes = ((48, 1),) if args.quick else ((321, 2), (321, 1), (513, 2))  # (size, batch) of the photo table
    scaling_sizes = (32, 48) if args.quick else (128, 256, 512, 1024)
    crop = 32 if args.quick else 64  # of the accuracy table (exact O(N^2) filter)
    names = ("astronaut",) if args.quick else ("astronaut", "coffee", "chelsea", "rocket")
    sigmas_xy = (10.0,) if args.quick else (10.0, 30.0)
    warmup = 0 if args.quick else 1
    if args.quick:
        args.runs = 1
    torch.set_num_threads(args.threads)
    nclib.lattice.Permutohedral(torch.zeros(1, 5, 4, 4))  # build the extension outside the timings

    baseline, sha = (None, None) if baseline_ref() == "none" else load_baseline()

    def timed(fn, runs, theirs=None):
        """(ours ms, baseline ms or None): medians over `runs` alternating calls of fn() and of theirs() (default
        fn) under the baseline kernel."""
        if baseline is None:
            return median_ms(fn, runs, warmup), None
        return paired_median_ms(fn, theirs or fn, runs, baseline, warmup=warmup)

    def cell(pair, per=1.0):
        ours, base = pair
        if base is None:
            return f"{ours / per:.1f}"
        return f"{ours / per:.1f} ({base / per:.1f}, {base / ours:.2f}x)"

    against = "no baseline" if baseline is None else f"baseline: the CPU kernel of `{baseline_ref()}` = {sha}"
    lines = [
        "# Permutohedral lattice, CPU kernel",
        "",
        f"`make bench` ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, median of {args.runs} runs). Goal: build + one 21-channel filter <= 20 ms "
        "per 321x321 image; time per pixel at 1024^2 within 1.5x of 128^2.",
        "",
        f"Each cell: ours (baseline, baseline / ours) with the {against}, measured in the same run with calls "
        f"alternating; the Python side is the same for both. Load average at the start: {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores (above the core count, wall times are inflated by other processes).",
        "",
        "## Real photos, 21 channels, sigma_rgb 15, sigma_xy 100",
        "",
        "| size | batch | build ms/img | filter ms/img | total ms/img | normalized filter ms/img | vertices / pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, batch in table_sizes:
        imgs = photos(size)[:batch]
        feats = rgbxy_features(imgs, 15.0, 100.0)
        vals = torch.rand(batch, 21, size, size)
        lat = Permutohedral(feats)
        if baseline is not None:
            with using_kernel(baseline):
                lat_base = Permutohedral(feats)  # filtered by the kernel that built it
        build = timed(lambda: Permutohedral(feats), args.runs)
        filt = timed(lambda: lat.filter(vals), args.runs, lambda: lat_base.filter(vals))
        total = timed(lambda: Permutohedral(feats).filter(vals), args.runs)
        norm = timed(lambda: Permutohedral(feats).filter(vals, normalize=True), args.runs)
        occ = lat.num_vertices / (batch * size * size)
        lines.append(f"| {size}x{size} | {batch} | {cell(build, batch)} | {cell(filt, batch)} | {cell(total, batch)} "
                     f"| {cell(norm, batch)} | {occ:.3f} |")
        print(lines[-1], flush=True)

    lines += ["", "## Linear scaling (one photo, 21 channels, build + filter)", "",
              f"| size | ms | ns / pixel | ratio to {scaling_sizes[0]}^2 |", "|---|---|---|---|"]
    base = None
    for size in scaling_sizes:
        img = photos(size, ("astronaut",))
        feats = rgbxy_features(img, 15.0, 100.0 * size / 321)  # same kernel relative to the image
        vals = torch.rand(1, 21, size, size)
        runs = args.runs if args.quick else max(7, args.runs // (1 + size // 512))
        ms = timed(lambda: Permutohedral(feats).filter(vals), runs)
        ns = ms[0] * 1e6 / size**2
        base = base or ns
        lines.append(f"| {size}^2 | {cell(ms)} | {ns:.1f} | {ns / base:.2f} |")
        print(lines[-1], flush=True)

    lines += ["", f"## Accuracy against the exact Gaussian ({crop}x{crop} crops, a photo's own RGB, normalized)", "",
              "| photo | sigma_xy | relative RMS error | symmetry <Wx,y> vs <x,Wy> | adjoint error |",
              "|---|---|---|---|---|"]
    for name in names:
        img = photo_tensor(name, crop=crop)
        for sxy in sigmas_xy:
            f = rgbxy_features(img, 15.0, sxy)
            lat = Permutohedral(f)
            err = relative_rms_error(lat.filter(img, normalize=True), exact_gaussian_filter(img.double(), f.double(), True))
            x, y = torch.rand(1, 3, crop, crop), torch.rand(1, 3, crop, crop)
            a = float((lat.filter(x).double() * y).sum())
            sym = abs(a - float((x * lat.filter(y).double()).sum())) / abs(a)
            adj = abs(a - float((x * lat.filter(y, transpose=True).double()).sum())) / abs(a)
            lines.append(f"| {name} | {sxy:.0f} | {100 * err:.2f}% | {sym:.1e} | {adj:.1e} |")
    print("\n".join(lines[-len(names) * len(sigmas_xy) - 1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
