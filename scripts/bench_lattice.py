"""Benchmark of the CPU permutohedral filter: `make bench` -> benchmarks/lattice.md.

Real photos (scikit-image's bundled ones), 21 channels, sigma_rgb 15, sigma_xy 100, batch 2, 2 threads; medians of
several runs. The goals of the foundation issue are printed beside the measurements.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from benchutil import ROOT, median_ms, photos

import nclib
from nclib import Permutohedral, exact_gaussian_filter, rgbxy_features
from nclib.lattice import relative_rms_error
from nclib.photos import photo_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "lattice.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nclib.lattice.Permutohedral(torch.zeros(1, 5, 4, 4))  # build the extension outside the timings

    lines = [
        "# Permutohedral lattice, CPU kernel",
        "",
        f"`make bench` ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, median of {args.runs} runs). Goal: build + one 21-channel filter <= 20 ms "
        "per 321x321 image; time per pixel at 1024^2 within 1.5x of 128^2.",
        "",
        "## Real photos, 21 channels, sigma_rgb 15, sigma_xy 100, batch 2",
        "",
        "| size | build ms/img | filter ms/img | total ms/img | normalized filter ms/img | vertices / pixels |",
        "|---|---|---|---|---|---|",
    ]
    for size in (321, 513):
        imgs = photos(size)
        feats = rgbxy_features(imgs, 15.0, 100.0)
        vals = torch.rand(2, 21, size, size)
        lat = Permutohedral(feats)
        build = median_ms(lambda: Permutohedral(feats), args.runs) / 2
        filt = median_ms(lambda: lat.filter(vals), args.runs) / 2
        total = median_ms(lambda: Permutohedral(feats).filter(vals), args.runs) / 2
        norm = median_ms(lambda: Permutohedral(feats).filter(vals, normalize=True), args.runs) / 2
        occ = lat.num_vertices / (2 * size * size)
        lines.append(f"| {size}x{size} | {build:.1f} | {filt:.1f} | {total:.1f} | {norm:.1f} | {occ:.3f} |")
        print(lines[-1], flush=True)

    lines += ["", "## Linear scaling (one photo, 21 channels, build + filter)", "",
              "| size | ms | ns / pixel | ratio to 128^2 |", "|---|---|---|---|"]
    base = None
    for size in (128, 256, 512, 1024):
        img = photos(size, ("astronaut",))
        feats = rgbxy_features(img, 15.0, 100.0 * size / 321)  # same kernel relative to the image
        vals = torch.rand(1, 21, size, size)
        ms = median_ms(lambda: Permutohedral(feats).filter(vals), max(3, args.runs // (1 + size // 512)))
        ns = ms * 1e6 / size**2
        base = base or ns
        lines.append(f"| {size}^2 | {ms:.1f} | {ns:.1f} | {ns / base:.2f} |")
        print(lines[-1], flush=True)

    lines += ["", "## Accuracy against the exact Gaussian (64x64 crops, a photo's own RGB, normalized)", "",
              "| photo | sigma_xy | relative RMS error | symmetry <Wx,y> vs <x,Wy> | adjoint error |",
              "|---|---|---|---|---|"]
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = photo_tensor(name, crop=64)
        for sxy in (10.0, 30.0):
            f = rgbxy_features(img, 15.0, sxy)
            lat = Permutohedral(f)
            err = relative_rms_error(lat.filter(img, normalize=True), exact_gaussian_filter(img.double(), f.double(), True))
            x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
            a = float((lat.filter(x).double() * y).sum())
            sym = abs(a - float((x * lat.filter(y).double()).sum())) / abs(a)
            adj = abs(a - float((x * lat.filter(y, transpose=True).double()).sum())) / abs(a)
            lines.append(f"| {name} | {sxy:.0f} | {100 * err:.2f}% | {sym:.1e} | {adj:.1e} |")
    print("\n".join(lines[-9:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
