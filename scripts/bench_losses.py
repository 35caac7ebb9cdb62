"""Benchmark the NC loss (forward + backward) and dense-CRF inference; writes benchmarks/losses.md.

Usage: python scripts/bench_losses.py [--runs 7] [--baseline PATH] [--out benchmarks/losses.md] [--threads 2]
[--only crf_b2,pydensecrf] (``make bench BASELINE=PATH``; e.g. ``git worktree add /tmp/nclib-base <previous main>``
for PATH). The paired 1-thread CRF measurement of a shared machine: ``--threads 1 --only crf_b2,pydensecrf
--baseline PATH --runs 9 --out /tmp/crf.md``.

Real photos (scikit-image astronaut and coffee, resized and centre-cropped to 321x321), 21 classes, 2 threads,
median of several runs after one warm-up. Each checkout is timed in its own child process so that two versions
can be compared in the same run: ``--baseline PATH`` names a second checkout (e.g. a
``git worktree add /tmp/nclib-base <commit>`` of the previous main) whose figures are timed run by run
alternately with this one's and reported as a ratio (the same load on both). pydensecrf (pip package pydensecrf2)
is timed in the same run as the CRF baseline when installed (it is single-threaded). The machine may be shared:
only same-run ratios are comparable between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE, K = 321, 21

#: (key, label, goal) of every figure, in table order.
FIGURES = [
    ("nc", "NC loss fwd+bwd, batch 2, 321x321, 21 classes (ms / batch)", "<= 60"),
    ("nc_half", "  same with scale=0.5 (authors' trick)", "<= 20"),
    ("build", "  lattice build, batch 2 RGBXY (ms)", ""),
    ("filter", "  lattice filter, 21 channels, batch 2 (ms, one pass)", ""),
    ("crf", "dense CRF, 10 iterations, 321x321, 21 labels (ms / image)", "<= 150"),
    ("crf_b2", "  same, batch 2 (ms / image)", "<= 150"),
    ("crf_build", "  build appearance (RGBXY 5/121) + smoothness (XY 3) lattices (ms)", ""),
    ("crf_filter", "  one lattice filter pass appearance + smoothness, 21 channels (ms)", ""),
    ("pydensecrf", "pydensecrf2 dense CRF, same input, 1 thread (ms / image)", "CRF >= 2.5x faster"),
]


def figures() -> dict:
    """Every figure as a zero-argument callable, with the nclib importable here (a child process), public API
    only, so that any checkout since the benchmark's first version can be timed."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "scripts"))
    from nclib.crf import dense_crf
    from nclib.lattice import Permutohedral, rgbxy_features, xy_features
    from nclib.losses import normalized_cut_loss

    from benchutil import photos

    def network_like_logits(img, seed=0):
        g = torch.Generator().manual_seed(seed)
        b, _, h, w = img.shape
        coarse = torch.randn(b, K, (h + 7) // 8, (w + 7) // 8, generator=g) * 3
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    torch.set_num_threads(int(os.environ.get("NCLIB_BENCH_THREADS", "2")))
    imgs = photos(SIZE, ("astronaut", "coffee"))
    logits = network_like_logits(imgs).requires_grad_(True)

    def nc(scale):
        def run():
            logits.grad = None
            normalized_cut_loss(logits.softmax(1), imgs, sigma_rgb=15.0, sigma_xy=100.0, scale=scale).backward()
        return run

    feats = rgbxy_features(imgs, 15.0, 100.0)
    lat = Permutohedral(feats)
    vals = logits.detach().softmax(1)
    img1 = imgs[:1]
    probs1 = network_like_logits(img1, seed=1).softmax(1)
    probs2 = network_like_logits(imgs, seed=1).softmax(1)
    l_app, l_sm = Permutohedral(rgbxy_features(img1, 5.0, 121.0)), Permutohedral(xy_features(img1, 3.0))
    out = {
        "nc": nc(1.0),
        "nc_half": nc(0.5),
        "build": lambda: Permutohedral(feats),
        "filter": lambda: lat.filter(vals),
        "crf": lambda: dense_crf(probs1, img1, iterations=10),
        "crf_b2": lambda: dense_crf(probs2, imgs, iterations=10),
        "crf_build": lambda: (Permutohedral(rgbxy_features(img1, 5.0, 121.0)), Permutohedral(xy_features(img1, 3.0))),
        "crf_filter": lambda: (l_app.filter(probs1), l_sm.filter(probs1)),
    }
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        return out
    rgb = np.ascontiguousarray(img1[0].permute(1, 2, 0).numpy().astype(np.uint8))
    unary = np.ascontiguousarray(unary_from_softmax(probs1[0].numpy()))

    def ref():
        d = dcrf.DenseCRF2D(SIZE, SIZE, K)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=121, srgb=5, rgbim=rgb, compat=4)
        d.inference(10)

    out["pydensecrf"] = ref
    return out


def serve() -> None:
    """Child mode: print the figure names, then for each figure name read on stdin print its wall-clock and
    process CPU times in ms."""
    figs = figures()
    print(json.dumps(sorted(figs)), flush=True)
    for line in sys.stdin:
        name = line.strip()
        fn = figs[name]
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        per = 2 if name == "crf_b2" else 1  # per image
        print(json.dumps([(time.perf_counter() - t0) * 1e3 / per, (time.process_time() - c0) * 1e3 / per]), flush=True)


class Child:
    """A child interpreter that imports nclib from ``checkout`` and times one figure call per request."""

    def __init__(self, checkout: Path, threads: int = 2):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads),
                   NCLIB_BENCH_THREADS=str(threads))
        env.setdefault("NCLIB_BUILD_DIR", str(checkout / "build" / "extensions"))  # one kernel build each
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"], env=env,
                                     cwd=str(checkout), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.names = json.loads(self._line(checkout))

    def _line(self, what) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the benchmark child for {what} died (see its stderr above)")
        return line

    def time(self, name: str) -> list:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(name))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def git_describe(path: Path) -> str:
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        dirty = " (+ uncommitted changes)" if run("status", "--porcelain", "--untracked-files=no") else ""
        return f"`{run('log', '-1', '--format=%h')}` {run('log', '-1', '--format=%s')[:70]}{dirty}"
    except (OSError, subprocess.CalledProcessError):
        return str(path)


def crf_ratio_lines(med: dict, bmed: dict) -> list:
    """The same-run speed-ups of the dense CRF (this checkout, the baseline) over pydensecrf2."""
    lines = []
    for crf in ("crf", "crf_b2"):
        if "pydensecrf" in med and crf in med:
            ratio = med["pydensecrf"] / med[crf]
            lines += ["", f"Dense CRF ({crf}) vs pydensecrf2 in the same run: {ratio:.2f}x faster (goal >= 2.5x)."]
            if crf in bmed:
                lines.append(f"Baseline CRF ({crf}) vs pydensecrf2: {med['pydensecrf'] / bmed[crf]:.2f}x.")
    return lines


def measure(args, only: set):
    """Median wall-clock and CPU ms per figure of this checkout and the baseline: one warm-up each, then run by
    run every figure in turn, each alternating between the checkouts (so pydensecrf2 shares the CRF's load)."""
    ours_child = Child(ROOT, args.threads)
    base_child = Child(args.baseline.resolve(), args.threads) if args.baseline else None
    keys = [k for k, _, _ in FIGURES if k in ours_child.names and (not only or k in only)]
    both = {k: k != "pydensecrf" and base_child is not None and k in base_child.names for k in keys}
    ours: dict = {}
    base: dict = {}
    for rep in range(args.runs + 1):
        for key in keys:
            t = ours_child.time(key)
            b = base_child.time(key) if both[key] else None
            if rep == 0:  # warm-up
                continue
            ours.setdefault(key, []).append(t)
            if b is not None:
                base.setdefault(key, []).append(b)
    for c in (ours_child, base_child):
        if c is not None:
            c.close()
    med = {k: statistics.median(x[0] for x in v) for k, v in ours.items()}
    bmed = {k: statistics.median(x[0] for x in v) for k, v in base.items()}
    cpu = {k: statistics.median(x[1] for x in v) for k, v in ours.items()}
    bcpu = {k: statistics.median(x[1] for x in v) for k, v in base.items()}
    # paired: the median over runs of baseline / this for the two calls timed back to back (robust to load drifts)
    paired = {k: statistics.median(b[0] / o[0] for o, b in zip(ours[k], v)) for k, v in base.items()}
    if "pydensecrf" in ours:
        for k in ("crf", "crf_b2"):
            if k in ours:
                paired[f"pydensecrf/{k}"] = statistics.median(r[0] / o[0] for o, r in zip(ours[k], ours["pydensecrf"]))
    return med, bmed, cpu, bcpu, paired


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per figure (after one warm-up)")
    ap.add_argument("--baseline", type=Path, help="another nclib checkout to time in the same run (ratio)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "losses.md"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both children")
    ap.add_argument("--only", default="", help="comma-separated figure keys to time (default: all)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.serve:
        serve()
        return 0
    only = set(filter(None, args.only.split(",")))
    med, bmed, cpu, bcpu, paired = measure(args, only)
    n = args.runs
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    import torch

    lines = [
        "# Loss and dense-CRF benchmarks",
        "",
        f"`python scripts/bench_losses.py --runs {args.runs}"
        f"{' --baseline ' + str(args.baseline) if args.baseline else ''}"
        f"{f' --threads {args.threads}' if args.threads != 2 else ''}{f' --only {args.only}' if only else ''}`: "
        f"median of {n} runs after a warm-up"
        f"{', alternating with the baseline run by run' if args.baseline else ''}, figures interleaved, "
        f"torch.set_num_threads({args.threads}), "
        f"torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
        f"{load[0]:.1f} (other jobs share the machine: absolute numbers are upper bounds, compare the same-run "
        "ratios). Inputs: scikit-image astronaut and coffee resized and centre-cropped to 321x321; sigma_rgb 15, "
        "sigma_xy 100 for NC; DeepLab-LargeFOV CRF parameters.",
        "",
    ]
    if args.baseline:
        lines += [f"This checkout: {git_describe(ROOT)}. Baseline: {git_describe(args.baseline)}.", ""]
        lines += ["Wall-clock ms are what the goals are stated in; CPU ms (process time, both threads) are less sensitive "
                  "to a busy machine's scheduling (a parallel region waits for a descheduled thread).", ""]
        lines += ["| what | ms | baseline ms | speed-up | CPU ms | baseline CPU ms | CPU speed-up | goal |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    else:
        lines += ["| what | ms | goal |", "| --- | ---: | --- |"]
    for key, label, goal in FIGURES:
        if key not in med:
            if only and key not in only:
                continue
            lines.append(f"| {label}: not measured (pydensecrf2 not installed) | | {goal} |")
            continue
        if args.baseline:
            b, bc = bmed.get(key), bcpu.get(key)
            ratio = f"{b / med[key]:.2f}x" if b else ""
            cratio = f"{bc / cpu[key]:.2f}x" if bc else ""
            lines.append(f"| {label} | {med[key]:.1f} | {'' if b is None else f'{b:.1f}'} | {ratio} | {cpu[key]:.1f} "
                         f"| {'' if bc is None else f'{bc:.1f}'} | {cratio} | {goal} |")
        else:
            lines.append(f"| {label} | {med[key]:.1f} | {goal} |")
    lines += crf_ratio_lines(med, bmed)
    if paired:
        lines += ["", "Paired speed-ups (median over runs of the ratio of back-to-back calls): "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in paired.items()) + "."]
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
