"""GPU check and benchmark of the CUDA lattice, the losses, the dense CRF and a training step -> benchmarks/gpu.md.

One table: GPU-vs-CPU max difference, bitwise determinism over 3 runs, timings against issue 4/14's goals.
Real photos (scikit-image's bundled ones, resized), batch 10, 321x321, 21 channels/classes; training steps of
DeepLab-LargeFOV and DeepLab-ResNet-101 at random init (no download), CE vs CE + NC. GPU times are medians of
CUDA-event timings on the current stream after warm-up; CPU times are wall-clock medians.

Every row runs on its own: a failing row is reported as FAIL in the table and the others still run; the exit
status is 1 when any row failed or missed a hard goal (differences, determinism), 0 otherwise. Timing goals are
reported (met / NOT met) but do not fail the run.

    python scripts/bench_gpu.py                  # on a machine with a CUDA device (make gpu-check)
    python scripts/bench_gpu.py --dry-run        # no GPU: every row on the CPU kernel, small sizes, seconds
    python scripts/bench_gpu.py --sanitize-case  # 32x32 workload for compute-sanitizer (scripts/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from any folder, without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIGMA_RGB, SIGMA_XY = 15.0, 100.0  # the NC loss settings of the paper's experiments (RGB 0..255, pixels)


def photo_batch(size: int, batch: int) -> torch.Tensor:
    """(batch, 3, size, size) RGB 0..255, cycling through the bundled photos (flipped on later cycles)."""
    from nclib.photos import photo_tensor

    imgs = []
    for i in range(batch):
        img = photo_tensor(PHOTOS[i % len(PHOTOS)], size)
        imgs.append(img.flip(-1) if (i // len(PHOTOS)) % 2 else img)
    return torch.cat(imgs)


def synthetic_scribbles(batch: int, size: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """(B, H, W) int64 scribbles: a few horizontal strokes of random labels (about 3 % of pixels), 255 elsewhere."""
    s = torch.full((batch, size, size), 255, dtype=torch.long)
    for b in range(batch):
        for _ in range(4):
            y = int(torch.randint(0, size, (1,), generator=gen))
            x0 = int(torch.randint(0, size // 2, (1,), generator=gen))
            s[b, y, x0:x0 + size // 3] = int(torch.randint(0, classes, (1,), generator=gen))
    return s


def timer(dev: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """Median milliseconds of fn(): CUDA events on the current stream on a GPU, wall clock on the CPU."""

    def cuda_ms(fn, runs: int, warmup: int = 3) -> float:
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

    def cpu_ms(fn, runs: int, warmup: int = 1) -> float:
        from benchutil import median_ms  # scripts/ is on sys.path when this file runs

        for _ in range(warmup - 1):  # median_ms makes the last warm-up call itself
            fn()
        return median_ms(fn, runs)

    return cuda_ms if dev.type == "cuda" else cpu_ms


def max_diff(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """(max |a - b|, max |b|) on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max()), float(b.abs().max())


def all_equal(xs: List[torch.Tensor]) -> bool:
    return all(torch.equal(xs[0], x) for x in xs[1:])


class Table:
    """Rows of (section, measurement, value, goal, status); FAIL rows make the exit status 1."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, str, str, str, str]] = []
        print("| section | measurement | value | goal | status |\n|---|---|---|---|---|", flush=True)

    def add(self, section: str, name: str, value: str, goal: str = "", status: str = "") -> None:
        self.rows.append((section, name, value, goal, status))
        print(f"| {section} | {name} | {value} | {goal} | {status} |", flush=True)

    def run(self, section: str, fn: Callable[[], None]) -> None:
        """Run one section; an exception becomes a FAIL row and the next section still runs."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on: one broken row must not hide the others
            traceback.print_exc()
            self.add(section, "(section raised)", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", "", "FAIL")
        print(f"# {section}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(r[4] == "FAIL" for r in self.rows)


def check(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def goal(value: float, limit: float) -> str:
    return "met" if value <= limit else "NOT met"


def sanitize_case(dev: torch.device) -> int:
    """The 32x32 workload that compute-sanitizer runs: build, filter (both directions, normalized), NC loss
    forward + backward, dense CRF, with a roi; every nclib kernel launches at least once. Prints one line."""
    from nclib import Permutohedral, rgbxy_features
    from nclib.crf import dense_crf
    from nclib.losses import normalized_cut_loss

    gen = torch.Generator().manual_seed(0)
    imgs = photo_batch(32, 2).to(dev)
    roi = torch.ones(2, 32, 32, dtype=torch.bool)
    roi[1, 25:, :] = False  # crop padding: some pixels without vertices
    roi = roi.to(dev)
    lat = Permutohedral(rgbxy_features(imgs, SIGMA_RGB, 10.0), roi=roi)
    v = torch.rand(2, 21, 32, 32, generator=gen).to(dev)
    outs = [lat.filter(v), lat.filter(v, transpose=True), lat.filter(v, normalize=True)]
    x = (3 * torch.randn(2, 21, 32, 32, generator=gen)).to(dev).requires_grad_()
    loss = normalized_cut_loss(torch.softmax(x, 1), imgs, sigma_rgb=SIGMA_RGB, sigma_xy=10.0, roi=roi)
    loss.backward()
    crf = dense_crf(torch.softmax(x.detach(), 1), imgs, iterations=2, roi=roi)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(t).all()) for t in [*outs, x.grad, crf])
    print(f"sanitize-case: {lat.num_vertices} vertices, NC {float(loss.detach()):.4f}, all outputs finite: {finite}")
    return 0 if finite else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="where the measured side runs; cpu only rehearses the script (the reference is the same)")
    ap.add_argument("--dry-run", action="store_true", help="--device cpu with small sizes: checks the script")
    ap.add_argument("--sanitize-case", action="store_true", help="run the 32x32 compute-sanitizer workload only")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 10; dry-run 2)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 321; dry-run 48)")
    ap.add_argument("--channels", type=int, default=21)
    ap.add_argument("--runs", type=int, default=None, help="timed runs per row, median (default 20; dry-run 2)")
    ap.add_argument("--train-runs", type=int, default=None, help="timed training steps (default 5; dry-run 1)")
    ap.add_argument("--models", default="largefov,resnet101_aspp", help="models of the training-step rows")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="threads of the CPU reference (default: every core with a GPU, 2 in a dry run)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default benchmarks/gpu.md; "
                    "dry-run build/gpu-check/gpu-dry-run.md)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    dev = torch.device("cpu" if dry else args.device)
    if args.sanitize_case:
        return sanitize_case(dev)
    B = args.batch or (2 if dry else 10)
    S = args.size or (48 if dry else 321)
    C = args.channels
    runs = args.runs or (2 if dry else 20)
    train_runs = args.train_runs or (1 if dry else 5)
    out = args.out or (ROOT / "build" / "gpu-check" / "gpu-dry-run.md" if dry else ROOT / "benchmarks" / "gpu.md")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device visible to torch {torch.__version__} (torch.version.cuda="
              f"{torch.version.cuda}); use --dry-run to rehearse on the CPU")
        return 2

    from nclib import Permutohedral, rgbxy_features
    from nclib.losses import normalized_cut_loss

    args.cpu_threads = args.cpu_threads or (2 if dev.type == "cpu" else os.cpu_count() or 2)
    torch.set_num_threads(args.cpu_threads)
    ms = timer(dev)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    imgs = photo_batch(S, B)
    logits = 3 * torch.randn(B, C, S, S, generator=gen)
    probs = torch.softmax(logits, 1)
    feats = rgbxy_features(imgs, SIGMA_RGB, SIGMA_XY)
    imgs_d, logits_d, probs_d, feats_d = imgs.to(dev), logits.to(dev), probs.to(dev), feats.to(dev)
    table = Table()
    t_load = time.perf_counter()
    Permutohedral(feats_d[:1, :, :8, :8])  # JIT build / load of the kernel, outside every timing
    load_s = time.perf_counter() - t_load

    def lattice_rows() -> None:
        lat_c, lat_d = Permutohedral(feats), Permutohedral(feats_d)
        same = all(torch.equal(getattr(lat_c, n).cpu(), getattr(lat_d, n).cpu())
                   for n in ("vertices_per_image",)) and lat_c.num_vertices == lat_d.num_vertices
        table.add("lattice", "vertices (device vs CPU kernel)", f"{lat_d.num_vertices} vs {lat_c.num_vertices}",
                  "equal", check(same))
        ref = lat_c.filter(probs, normalize=True)
        d, scale = max_diff(lat_d.filter(probs_d, normalize=True), ref)
        table.add("filter", "max abs diff device vs CPU, normalized", f"{d:.2e} (max {scale:.2f})", "<= 1e-4 rel",
                  check(d <= 1e-4 * scale))
        d, scale = max_diff(lat_d.filter(probs_d, transpose=True), lat_c.filter(probs, transpose=True))
        table.add("filter", "max abs diff device vs CPU, transpose", f"{d:.2e} (max {scale:.3g})", "<= 1e-4 rel",
                  check(d <= 1e-4 * scale))
        outs = [Permutohedral(feats_d).filter(probs_d) for _ in range(3)]
        table.add("filter", "bitwise equal over 3 builds + filters", str(all_equal(outs)), "True",
                  check(all_equal(outs)))
        build = ms(lambda: Permutohedral(feats_d), runs)
        filt = ms(lambda: lat_d.filter(probs_d), runs)
        total = ms(lambda: Permutohedral(feats_d).filter(probs_d), runs)
        table.add("filter", "lattice build, ms/image", f"{build / B:.3f}")
        table.add("filter", f"{C}-channel filter, ms/image", f"{filt / B:.3f}")
        table.add("filter", f"build + {C}-channel filter, ms/image", f"{total / B:.3f}", "<= 1",
                  goal(total / B, 1.0) if dev.type == "cuda" else "dry-run")
        if dev.type == "cuda":
            cpu_total = timer(cpu)(lambda: Permutohedral(feats).filter(probs), 3)
            table.add("filter", f"speedup vs CPU kernel ({args.cpu_threads} threads)", f"{cpu_total / total:.0f}x")

    def nc_rows() -> None:
        def nc(x0: torch.Tensor, im: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            x = x0.detach().clone().requires_grad_()
            loss = normalized_cut_loss(torch.softmax(x, 1), im, sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY)
            loss.backward()
            return loss.detach(), x.grad

        lc, gc = nc(logits, imgs)
        res = [nc(logits_d, imgs_d) for _ in range(3)]
        dl, _ = max_diff(res[0][0], lc)
        dg, gmax = max_diff(res[0][1], gc)
        table.add("NC loss", "abs diff device vs CPU: loss; max over grad",
                  f"{dl:.2e} (loss {float(lc):.4f}); {dg:.2e} (max {gmax:.2e})", "<= 1e-4 rel",
                  check(dl <= 1e-4 * abs(float(lc)) and dg <= 1e-4 * gmax))
        same = all_equal([r[0] for r in res]) and all_equal([r[1] for r in res])
        table.add("NC loss", "bitwise equal loss + grad over 3 runs", str(same), "True", check(same))
        t = ms(lambda: nc(logits_d, imgs_d), runs)
        table.add("NC loss", f"forward + backward, ms per batch of {B}", f"{t:.2f}", "<= 15",
                  goal(t, 15.0) if dev.type == "cuda" else "dry-run")

    def crf_rows() -> None:
        from nclib.crf import dense_crf

        ref = dense_crf(probs, imgs, iterations=10)
        outs = [dense_crf(probs_d, imgs_d, iterations=10) for _ in range(3)]
        d, _ = max_diff(outs[0], ref)
        table.add("dense CRF", "max abs diff device vs CPU, 10 iterations", f"{d:.2e}", "<= 1e-3", check(d <= 1e-3))
        table.add("dense CRF", "bitwise equal over 3 runs", str(all_equal(outs)), "True", check(all_equal(outs)))
        t = ms(lambda: dense_crf(probs_d, imgs_d, iterations=10), max(2, runs // 4))
        table.add("dense CRF", f"10 iterations, {C} labels, ms/image", f"{t / B:.2f}", "<= 10",
                  goal(t / B, 10.0) if dev.type == "cuda" else "dry-run")

    def train_rows(model_name: str) -> None:
        from nclib.models import build_model, param_groups
        from nclib.train import Config, loss_terms

        scrib = synthetic_scribbles(B, S, C, gen).to(dev)
        roi = torch.ones(B, S, S, dtype=torch.bool, device=dev)
        times = {}
        for label, nc_w in (("CE", 0.0), ("CE + NC", 1.6)):
            cfg = Config(model=model_name, nc_weight=nc_w, sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY, batch_size=B)
            torch.manual_seed(0)
            model = build_model(model_name, C).to(dev).train()  # random init: no download
            opt = torch.optim.SGD(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, momentum=0.9)

            def step() -> None:
                terms = loss_terms(model(imgs_d), imgs_d, scrib, scrib, roi, cfg)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()

            times[label] = ms(step, train_runs, 2 if dev.type == "cuda" else 1)
            model = opt = None  # free the weights before the next model is built
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        extra = times["CE + NC"] / times["CE"] - 1
        table.add(f"train {model_name}", f"step CE / CE + NC, ms (batch {B}, {S}x{S})",
                  f"{times['CE']:.1f} / {times['CE + NC']:.1f}")
        table.add(f"train {model_name}", "NC adds", f"{100 * extra:.0f} %",
                  "<= 15 %" if model_name.startswith("resnet") else "",
                  (goal(extra, 0.15) if dev.type == "cuda" else "dry-run") if model_name.startswith("resnet") else "")

    table.run("lattice + filter", lattice_rows)
    table.run("NC loss", nc_rows)
    table.run("dense CRF", crf_rows)
    for name in [m for m in args.models.split(",") if m]:
        table.run(f"train {name}", lambda name=name: train_rows(name))

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        where = "NO GPU: --dry-run, device side = the CPU kernel; differences are 0 by construction, times are CPU"
    lines = [
        "# GPU check: CUDA lattice, NC loss, dense CRF, training step",
        "",
        f"`make gpu-check` on {where}, torch {torch.__version__}, CUDA {torch.version.cuda}, host "
        f"{platform.processor() or platform.machine()}. Reference: the CPU kernel ({args.cpu_threads} threads). "
        f"Real photos at {S}x{S}, batch {B}, {C} channels, sigma_rgb {SIGMA_RGB:g}, sigma_xy {SIGMA_XY:g}; times: "
        f"median of {runs} runs ({train_runs} training steps) after warm-up. Training: random init, synthetic "
        f"scribbles, SGD; NC weight 1.6. Extension load {load_s:.1f} s.",
        "",
        "| section | measurement | value | goal | status |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in table.rows],
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"written to {out}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
