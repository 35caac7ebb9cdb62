"""Helpers shared by the benchmark scripts: CPU wall-clock medians, the photo batches they time, and where their
tables go."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nclib.photos import photo_tensor

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``runs`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def photos(size: int, names=("astronaut", "coffee")) -> torch.Tensor:
    """(len(names), 3, size, size) bundled photos, short side resized to ``size``, centre-cropped, RGB 0..255."""
    return torch.cat([photo_tensor(n, size) for n in names])


def out_path(ap: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Path:
    """``--out``, or ``benchmarks/<name>``; ``--quick`` (a smoke test) must name its own file."""
    if args.quick and args.out is None:
        ap.error(f"--quick needs --out: its tables must not replace benchmarks/{name}")
    return Path(args.out) if args.out is not None else ROOT / "benchmarks" / name
