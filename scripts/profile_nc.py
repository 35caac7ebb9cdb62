"""Where the time of one NC loss training step goes: `python scripts/profile_nc.py` -> benchmarks/nc_profile.md.

The case of the speed goals (batch 2, 321x321 real photos, 21 classes, sigma_rgb 15, sigma_xy 100), at scale 1 and
at the authors' scale 0.5: ``normalized_cut_loss(logits.softmax(1), images, scale=...).backward()``, the step
that `make bench` times. Per step: the wall time (median), torch's profiler self times per operator (the caller's
softmax named as such; the gradient is reset each step, as by a training loop's ``zero_grad()``), and the lattice
build timed on its own (a pybind call the profiler does not see). ``--quick``: one step of a 64x64 case, to ``--out`` (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from torch.profiler import profile

from nclib.lattice import Permutohedral, rgbxy_features
from nclib.losses import normalized_cut_loss

from benchutil import median_ms, out_path, photos

#: operators that belong to the caller's step, not to the loss
CALLER = {"aten::_softmax": "caller: softmax forward", "aten::_softmax_backward_data": "caller: softmax backward"}


def profile_step(images: torch.Tensor, logits: torch.Tensor, scale: float, runs: int) -> tuple[float, list, float]:
    """(median wall ms per step, [(operator, self ms per step)] largest first, lattice build ms per step)."""

    def step():
        logits.grad = None  # as a training loop's zero_grad(): no accumulation into an old gradient
        normalized_cut_loss(logits.softmax(1), images, sigma_rgb=15.0, sigma_xy=100.0, scale=scale).backward()

    wall = median_ms(step, runs)
    with profile() as prof:
        for _ in range(runs):
            step()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / runs) for e in prof.key_averages()), key=lambda x: -x[1])
    size = [max(1, round(s * scale)) for s in images.shape[-2:]]
    small = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
    build = median_ms(lambda: Permutohedral(rgbxy_features(small, 15.0, 100.0 * scale)), runs)
    return wall, ops, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="operators listed per scale")
    ap.add_argument("--out", type=Path, help="default: benchmarks/nc_profile.md")
    ap.add_argument("--quick", action="store_true", help="one step of a 64x64 case (a smoke test; needs --out)")
    args = ap.parse_args()
    args.out = out_path(ap, args, "nc_profile.md")
    torch.set_num_threads(args.threads)
    size, runs = (64, 1) if args.quick else (321, args.runs)
    images = photos(size)
    logits = torch.randn(images.shape[0], 21, size, size, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    lines = [
        "# NC loss: time per step, by operator",
        "",
        f"`python scripts/profile_nc.py{' --quick' if args.quick else ''}` ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads, {runs} steps). One step: "
        f"`normalized_cut_loss(logits.softmax(1), images, sigma_rgb=15, sigma_xy=100, scale=s).backward()`, batch "
        f"{images.shape[0]}, {size}x{size} real photos, 21 classes. Milliseconds per step (the profiler's self CPU "
        "time of each operator on the calling thread; the machine is shared, so compare within a table).",
        "",
    ]
    for scale in (1.0, 0.5):
        wall, ops, build = profile_step(images, logits, scale, runs)
        caller = sum(ms for name, ms in ops if name in CALLER)
        lines += [f"## scale {scale}", "",
                  f"Whole step {wall:.1f} ms, of which the caller's softmax (forward and backward) "
                  f"{caller:.1f} ms (the loss itself: about {wall - caller:.1f} ms); the lattice build "
                  f"{build:.1f} ms.", "",
                  "| operator | ms per step |", "| --- | ---: |"]
        lines += [f"| {CALLER.get(name, name)} | {ms:.2f} |" for name, ms in ops[: args.top]]
        lines += [f"| lattice build (pybind, timed on its own) | {build:.2f} |", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
