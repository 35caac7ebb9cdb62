"""Training-step time with cross entropy only vs cross entropy + normalized cut (-> benchmarks/train.md).

The paper's anchor (Sec 5.2.1, P100 GPU + CPU bilateral filter, DeepLab-LargeFOV): CE only 0.05 s/image, CE + NC
0.15 s/image (NC adds +200%). Here: the small network on the CPU (2 threads), one full SGD step (forward, losses,
backward, update) on a batch of real default-set crops; median over repeats after warm-up. With a CUDA device and
``--gpu`` it also times DeepLab-ResNet-101 at batch 10, 321x321.

    python scripts/bench_train.py [--repeats 7] [--batch 8] [--crop 96] [--gpu] [--quick --out FILE]

``--quick``: batch 1, 48x48 crops, one step each, no warm-up (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from nclib.models import build_model, param_groups
from nclib.train import Config, build_datasets, loss_terms
from nclib.train.loop import batch_targets
from nclib.train.stream import SeededDataset, collate

from benchutil import out_path


def batch_of(cfg: Config, n: int):
    train, _, num_classes = build_datasets(cfg)
    ds = SeededDataset(train, cache=True)
    return collate([ds[(i, i)] for i in range(n)]), num_classes


def step_time(cfg: Config, batch, num_classes: int, device: torch.device, repeats: int, warmup: int = 2) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes).to(device).train()
    opt = torch.optim.SGD(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, momentum=0.9)
    images, target, scrib, roi = batch_targets(batch, cfg, device)
    use_amp = device.type == "cuda"
    times = []
    for r in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(images)
        terms = loss_terms(logits, images, target, scrib, roi, cfg)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--sigma-xy", type=float, default=30.0)
    ap.add_argument("--gpu", action="store_true", help="also time ResNet-101, batch 10, 321x321 on CUDA")
    ap.add_argument("--out", help="default: benchmarks/train.md")
    ap.add_argument("--quick", action="store_true", help="batch 1, 48x48, 1 step, no warm-up (a smoke test; needs --out)")
    args = ap.parse_args()
    args.out = out_path(ap, args, "train.md")
    warmup = 2
    if args.quick:
        args.repeats, args.batch, args.crop, warmup = 1, 1, 48, 0
    torch.set_num_threads(2)
    base = Config(model="small", crop=args.crop, scale_range=(1.0, 1.0), flip=False, sigma_xy=args.sigma_xy,
                  batch_size=args.batch, lr=0.01)
    batch, num_classes = batch_of(base, args.batch)
    cpu = torch.device("cpu")
    rows = []
    t_ce = step_time(base, batch, num_classes, cpu, args.repeats, warmup)
    rows.append(("small", "cpu (2 threads)", args.batch, args.crop, "pCE", "-", t_ce, 1.0))
    for scale in (1.0, 0.5):
        cfg = base.replace(nc_weight=1.6, nc_scale=scale)
        t = step_time(cfg, batch, num_classes, cpu, args.repeats, warmup)
        rows.append(("small", "cpu (2 threads)", args.batch, args.crop, "pCE + NC", scale, t, t / t_ce))
    if args.gpu and torch.cuda.is_available():
        gcfg = base.replace(model="resnet101_aspp", crop=321, batch_size=10, sigma_rgb=12.0, sigma_xy=60.0)
        gbatch, _ = batch_of(gcfg.replace(scale_range=[3.0, 3.0]), 10)
        dev = torch.device("cuda")
        g_ce = step_time(gcfg, gbatch, num_classes, dev, args.repeats)
        rows.append(("resnet101_aspp", torch.cuda.get_device_name(), 10, 321, "pCE (AMP)", "-", g_ce, 1.0))
        for scale in (1.0, 0.5):
            t = step_time(gcfg.replace(nc_weight=1.6, nc_scale=scale), gbatch, num_classes, dev, args.repeats)
            rows.append(("resnet101_aspp", torch.cuda.get_device_name(), 10, 321, "pCE + NC (AMP)", scale, t,
                         t / g_ce))
    lines = [
        "# Training step: cross entropy only vs cross entropy + normalized cut",
        "",
        f"`python scripts/bench_train.py` on {platform.processor() or platform.machine()}, torch {torch.__version__};"
        f" median of {args.repeats} steps after {warmup} warm-up steps; one step = forward, losses, backward, SGD update;"
        f" real crops of the default scribble set; sigma_rgb 15, sigma_xy {args.sigma_xy:g} (crop pixels);"
        " NC at loss scale 0.5 = the authors' trick (loss on a half-size image, sigma_xy halved).",
        "",
        "| model | device | batch | crop | loss | NC scale | s/step | s/image | x CE only |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, d, b, c, loss, sc, t, ratio in rows:
        lines.append(f"| {m} | {d} | {b} | {c} | {loss} | {sc} | {t:.3f} | {t / b:.4f} | {ratio:.2f} |")
    lines += ["", "Paper (P100, CPU bilateral filter, DeepLab-LargeFOV): CE only 0.05 s/image, CE + NC 0.15 s/image "
              "(x 3.0). Goal of this project: NC adds at most 15% on GPU; the CPU ratio is reported for reference."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
