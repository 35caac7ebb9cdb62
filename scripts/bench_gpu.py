"""Benchmark of the CUDA permutohedral lattice against issue 4's goals: `make gpu-check` -> benchmarks/gpu.md.

Real photos (scikit-image's bundled ones, resized to 321x321), batch 10, 21 channels/classes/labels. GPU times
are medians of CUDA-event timings on the current stream after warm-up; CPU times (the CPU kernel on the same
batch, for the speedup) are medians of wall-clock runs with `--cpu-threads` threads. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchutil import ROOT, median_ms

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_batch(size: int, batch: int) -> torch.Tensor:
    """(batch, 3, size, size) RGB 0..255, cycling through the bundled photos (flipped on later cycles)."""
    from nclib.photos import photo_tensor

    imgs = []
    for i in range(batch):
        img = photo_tensor(PHOTOS[i % len(PHOTOS)], size)
        imgs.append(img.flip(-1) if (i // len(PHOTOS)) % 2 else img)
    return torch.cat(imgs)


def gpu_median_ms(fn, runs: int, warmup: int = 3) -> float:
    """Median of CUDA-event times of fn() on the current stream (wall clock in --dry-run)."""
    if not torch.cuda.is_available():  # --dry-run on a machine without a GPU
        return median_ms(fn, runs)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def verdict(value: float, goal: float, higher_is_better: bool = False) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--size", type=int, default=321)
    ap.add_argument("--channels", type=int, default=21)
    ap.add_argument("--runs", type=int, default=20, help="timed GPU runs per row (median)")
    ap.add_argument("--cpu-runs", type=int, default=3, help="timed CPU runs per row (median)")
    ap.add_argument("--cpu-threads", type=int, default=2, help="threads of the CPU kernel (project convention: 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.md")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run every step on the CPU kernel (checks this script, measures nothing useful)")
    args = ap.parse_args(argv)
    if args.dry_run:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device visible to torch {torch.__version__} (torch.version.cuda="
              f"{torch.version.cuda}); see scripts/gpu_check.sh for how to install a CUDA build of torch.")
        return 2
    else:
        dev = torch.device("cuda")

    from nclib import Permutohedral, rgbxy_features
    from nclib.losses import normalized_cut_loss

    torch.set_num_threads(args.cpu_threads)
    B, S, C = args.batch, args.size, args.channels
    imgs = photo_batch(S, B)
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, C, S, S, generator=gen)
    probs = torch.softmax(logits, 1)
    feats = rgbxy_features(imgs, 15.0, 100.0)
    imgs_g, logits_g, probs_g, feats_g = imgs.to(dev), logits.to(dev), probs.to(dev), feats.to(dev)

    t0 = time.perf_counter()
    Permutohedral(feats_g[:1, :, :8, :8])  # JIT build / load of the CUDA kernel, outside every timing
    load_s = time.perf_counter() - t0
    Permutohedral(feats[:1, :, :8, :8])

    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: str, goal: str, status: str) -> None:
        rows.append((name, value, goal, status))
        print(f"| {name} | {value} | {goal} | {status} |", flush=True)

    print(f"| measurement (batch {B}, {S}x{S}, {C} channels) | value | goal | status |\n|---|---|---|---|")
    lat_g = Permutohedral(feats_g)
    build_ms = gpu_median_ms(lambda: Permutohedral(feats_g), args.runs)
    filter_ms = gpu_median_ms(lambda: lat_g.filter(probs_g), args.runs)
    total_ms = gpu_median_ms(lambda: Permutohedral(feats_g).filter(probs_g), args.runs)
    add("GPU lattice build, ms/image", f"{build_ms / B:.3f}", "", "")
    add(f"GPU {C}-channel filter, ms/image", f"{filter_ms / B:.3f}", "", "")
    add(f"GPU build + {C}-channel filter, ms/image", f"{total_ms / B:.3f}", "<= 1", verdict(total_ms / B, 1.0))

    cpu_ms = median_ms(lambda: Permutohedral(feats).filter(probs), args.cpu_runs)
    add(f"CPU kernel build + filter, ms/image ({args.cpu_threads} threads)", f"{cpu_ms / B:.1f}", "", "")
    add(f"speedup GPU vs CPU kernel ({args.cpu_threads} threads)", f"{cpu_ms / total_ms:.0f}x", ">= 30x",
        verdict(cpu_ms / total_ms, 30.0, higher_is_better=True))
    all_threads = os.cpu_count() or args.cpu_threads
    if all_threads != args.cpu_threads:
        torch.set_num_threads(all_threads)
        cpu_all = median_ms(lambda: Permutohedral(feats).filter(probs), args.cpu_runs)
        torch.set_num_threads(args.cpu_threads)
        add(f"speedup GPU vs CPU kernel ({all_threads} threads)", f"{cpu_all / total_ms:.0f}x", "", "")

    def nc_step():
        x = logits_g.detach().requires_grad_()
        loss = normalized_cut_loss(torch.softmax(x, 1), imgs_g, sigma_rgb=15.0, sigma_xy=100.0)
        loss.backward()

    nc_ms = gpu_median_ms(nc_step, args.runs)
    add(f"GPU NC loss forward + backward, ms per batch of {B}", f"{nc_ms:.2f}", "<= 15", verdict(nc_ms, 15.0))

    try:
        from nclib.crf import dense_crf
    except ImportError as e:
        add("GPU dense CRF, 10 iterations, ms/image", f"n/a ({e})", "<= 10", "not run")
    else:
        crf_ms = gpu_median_ms(lambda: dense_crf(probs_g, imgs_g, iterations=10), max(3, args.runs // 4), warmup=1)
        add(f"GPU dense CRF, 10 iterations, {C} labels, ms/image", f"{crf_ms / B:.2f}", "<= 10",
            verdict(crf_ms / B, 10.0))

    lat_c = Permutohedral(feats)
    occ = lat_g.num_vertices / (B * S * S)
    same = lat_c.num_vertices == lat_g.num_vertices
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        where = "NO GPU: --dry-run on the CPU kernel, these numbers are not GPU timings"
    lines = [
        "# Permutohedral lattice, CUDA kernel",
        "",
        f"`make gpu-check` on {where}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, host {platform.processor() or platform.machine()}; GPU: median of "
        f"{args.runs} CUDA-event timings on the current stream after warm-up; CPU: median of {args.cpu_runs} runs.",
        f"Real photos resized to {S}x{S}, batch {B}, sigma_rgb 15, sigma_xy 100 (NC loss settings), {C} channels; "
        f"{occ:.3f} lattice vertices per pixel (same count on the CPU kernel: {same}). Extension load "
        f"{load_s:.1f} s (first call builds it).",
        "",
        f"| measurement (batch {B}, {S}x{S}, {C} channels) | value | goal | status |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
