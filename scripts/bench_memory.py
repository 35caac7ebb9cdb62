"""Peak memory of the NC loss, forward + backward, on one 2000x2000 image with 21 classes (-> benchmarks/memory.md).

Each measurement runs in a fresh interpreter (peak RSS is per process): ``ru_maxrss`` after the inputs are made and
after one ``normalized_cut_loss(...).backward()``. ``--baseline PATH`` measures another checkout the same way.

    python scripts/bench_memory.py [--size 2000] [--baseline PATH] [--quick --out FILE]

``--quick``: a 48x48 image (a smoke test of the script and its baseline path; the numbers are not the goal's).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from benchutil import ROOT, out_path

CHILD = """
import resource, torch
import torch.nn.functional as F
from nclib.losses import normalized_cut_loss
from nclib.photos import photo_tensor
torch.set_num_threads(2)
size = {size}
img = F.interpolate(photo_tensor("astronaut", crop=512).float(), size=(size, size), mode="bilinear")
logits = torch.randn(1, 21, size, size, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
normalized_cut_loss(torch.softmax(logits, 1), img, sigma_rgb=15.0, sigma_xy=100.0).backward()
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
"""


def peak_gb(checkout: Path, size: int) -> tuple[float, float]:
    """(RSS with the inputs only, peak RSS after forward + backward) in GB, Linux ru_maxrss (kB)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # one kernel build per checkout unless a build folder is set (kernel folders are named by a hash of the sources)
    env.setdefault("NCLIB_BUILD_DIR", str(checkout / "build" / "extensions"))
    out = subprocess.run([sys.executable, "-c", CHILD.format(size=size)], cwd=checkout, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, help="image side in pixels (default 2000; 48 with --quick)")
    ap.add_argument("--baseline", type=Path, help="another nclib checkout, measured the same way")
    ap.add_argument("--out", type=Path, help="default: benchmarks/memory.md")
    ap.add_argument("--quick", action="store_true", help="a 48x48 image (a smoke test; needs --out)")
    args = ap.parse_args()
    args.out = out_path(ap, args, "memory.md")
    args.size = args.size or (48 if args.quick else 2000)
    rows = [("this checkout", *peak_gb(ROOT, args.size))]
    if args.baseline:
        rows.append((f"baseline {args.baseline}", *peak_gb(args.baseline.resolve(), args.size)))
    lines = ["# Peak memory of the NC loss", "",
             f"`python scripts/bench_memory.py{' --baseline ' + str(args.baseline) if args.baseline else ''}`: one "
             f"{args.size}x{args.size} photo, 21 classes, forward + backward, 2 threads, a fresh process per row "
             "(peak RSS, GB). Goal (issue 13): not above 3.0 GB.", "",
             "| checkout | inputs only | peak after forward + backward |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows):]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
