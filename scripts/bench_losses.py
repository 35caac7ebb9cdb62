"""Benchmark the NC loss (forward + backward) and dense-CRF inference; writes benchmarks/losses.md.

Usage: python scripts/bench_losses.py [--runs 7] [--out benchmarks/losses.md]
Real photos (scikit-image astronaut and coffee, resized and centre-cropped to 321x321), 21 classes, 2 threads,
median of several runs after one warm-up. pydensecrf (pip package pydensecrf2) is timed in the same run as a
baseline when installed (it is single-threaded).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nclib.crf import dense_crf  # noqa: E402
from nclib.lattice import Permutohedral, rgbxy_features, xy_features  # noqa: E402
from nclib.losses import normalized_cut_loss  # noqa: E402

from benchutil import median_ms, photos  # noqa: E402

SIZE, K = 321, 21


def network_like_logits(img: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = img.shape
    coarse = torch.randn(b, K, (h + 7) // 8, (w + 7) // 8, generator=g) * 3
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "losses.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    imgs = photos(SIZE, ("astronaut", "coffee"))
    logits = network_like_logits(imgs).requires_grad_(True)
    rows = []

    def nc(scale: float):
        def run():
            logits.grad = None
            normalized_cut_loss(logits.softmax(1), imgs, sigma_rgb=15.0, sigma_xy=100.0, scale=scale).backward()
        return run

    nc_full = median_ms(nc(1.0), args.runs)
    nc_half = median_ms(nc(0.5), args.runs)
    feats = rgbxy_features(imgs, 15.0, 100.0)
    build = median_ms(lambda: Permutohedral(feats), args.runs)
    lat = Permutohedral(feats)
    vals = logits.detach().softmax(1)
    filt = median_ms(lambda: lat.filter(vals), args.runs)
    rows.append(("NC loss fwd+bwd, batch 2, 321x321, 21 classes (ms / batch)", nc_full, "<= 60"))
    rows.append(("  same with scale=0.5 (authors' trick)", nc_half, ""))
    rows.append(("  lattice build, batch 2 RGBXY (ms)", build, ""))
    rows.append(("  lattice filter, 21 channels, batch 2 (ms, one pass; fwd+bwd needs 2 + norm)", filt, ""))

    img1 = imgs[:1]
    probs1 = network_like_logits(img1, seed=1).softmax(1)
    crf = median_ms(lambda: dense_crf(probs1, img1, iterations=10), args.runs)
    b_app = median_ms(lambda: Permutohedral(rgbxy_features(img1, 5.0, 121.0)), args.runs)
    b_sm = median_ms(lambda: Permutohedral(xy_features(img1, 3.0)), args.runs)
    l_app = Permutohedral(rgbxy_features(img1, 5.0, 121.0))
    l_sm = Permutohedral(xy_features(img1, 3.0))
    f_app = median_ms(lambda: l_app.filter(probs1), args.runs)
    f_sm = median_ms(lambda: l_sm.filter(probs1), args.runs)
    rows.append(("dense CRF, 10 iterations, 321x321, 21 labels (ms / image)", crf, "<= 150"))
    rows.append(("  build appearance (RGBXY 5/121) + smoothness (XY 3) lattices (ms)", b_app + b_sm, ""))
    rows.append(("  one filter pass appearance + smoothness, 21 channels (ms; x10 per CRF)", f_app + f_sm, ""))
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax

        rgb = np.ascontiguousarray(img1[0].permute(1, 2, 0).numpy().astype(np.uint8))
        unary = np.ascontiguousarray(unary_from_softmax(probs1[0].numpy()))

        def ref():
            d = dcrf.DenseCRF2D(SIZE, SIZE, K)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=3, compat=3)
            d.addPairwiseBilateral(sxy=121, srgb=5, rgbim=rgb, compat=4)
            d.inference(10)

        rows.append(("pydensecrf2 dense CRF, same input, 1 thread (ms / image)", median_ms(ref, args.runs), "baseline"))
    except ImportError:
        rows.append(("pydensecrf2 dense CRF (not installed: pip install pydensecrf2)", float("nan"), "baseline"))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Loss and dense-CRF benchmarks",
        "",
        f"`python scripts/bench_losses.py --runs {args.runs}`: median of {args.runs} runs after a warm-up, "
        f"torch.set_num_threads(2), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at the end {load[0]:.1f} (other jobs share the machine: treat "
        "numbers as upper bounds). Inputs: scikit-image astronaut and coffee resized and centre-cropped to "
        "321x321; sigma_rgb 15, sigma_xy 100 for NC; DeepLab-LargeFOV CRF parameters.",
        "",
        "| what | ms | goal |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {name} | {value:.1f} | {goal} |" for name, value, goal in rows]
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
