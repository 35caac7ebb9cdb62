"""Command line for long jobs outside notebooks.

    python -m nclib train --config configs/default_pce.yaml [--set lr=0.01 --set seed=1] [--out DIR] [--force]
    torchrun --nproc_per_node 4 -m nclib train --config configs/voc_resnet101_nc.yaml --out runs/r101
    python -m nclib evaluate --checkpoint results/<run>/model.pt [--scales 0.5 0.75 1 --flip --crf --nc]

``train`` without ``--out`` goes through the results cache (``results/<name>-<hash>/``, skipped when already run);
with ``--out`` it trains into that folder (resuming a checkpoint found there) and evaluates at the end. Both call
``nclib.train.train_and_evaluate`` and write the same ``metrics.json`` (``val``: single scale; ``val_msc``: the
config's ``eval_scales`` / ``eval_flip``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]


def _parse_set(items: List[str]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for but CUDA is not available on this machine (use --device cpu)")


def _check_json_path(path: Optional[str]) -> None:
    """Fail before the evaluation, not after it, when ``--json`` cannot be written."""
    if path:
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--json {path}: folder {parent} does not exist")
        if Path(path).is_dir():
            raise ValueError(f"--json {path} is a folder, not a file")


def _train(args: argparse.Namespace) -> dict:
    from .train import Config, run, train_and_evaluate

    base = Config.from_yaml(args.config).to_dict()
    cfg = Config.from_dict({**base, **_parse_set(args.set)})
    if args.out is None:
        return run(cfg, force=args.force, progress=not args.quiet)
    return train_and_evaluate(cfg, args.out, resume=not args.force, progress=not args.quiet)


def _evaluate(args: argparse.Namespace) -> dict:
    from .evaluate import evaluate
    from .train import build_datasets, load_model

    _check_device(args.device)
    _check_json_path(args.json)
    model, cfg = load_model(args.checkpoint, device=args.device)
    over = {"val_split": args.split} if args.split else {}
    if args.root:
        over["root"] = args.root
    cfg = cfg.replace(**over) if over else cfg
    _, val, num_classes = build_datasets(cfg)
    return evaluate(model, val, num_classes, device=args.device, scales=args.scales, flip=args.flip, crf=args.crf,
                    crf_kwargs=cfg.crf_args,
                    nc_energy=args.nc, sigma_rgb=cfg.sigma_rgb, sigma_xy=cfg.sigma_xy,
                    max_images=args.max_images)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="nclib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"nclib {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a config (results cache, or --out DIR)")
    t.add_argument("--config", help="YAML file with Config keys (required; e.g. configs/default_pce.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--out", help="output folder (default: the results cache)")
    t.add_argument("--force", action="store_true", help="retrain even if cached / ignore a checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("evaluate", help="score a checkpoint on its config's validation split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", help="split to score (default: the config's val_split)")
    e.add_argument("--root", help="data root (default: the config's)")
    e.add_argument("--scales", type=float, nargs="+", default=[1.0])
    e.add_argument("--flip", action="store_true")
    e.add_argument("--crf", action="store_true", help="dense CRF post-processing")
    e.add_argument("--nc", action="store_true", help="also report the NC energy of the predictions")
    e.add_argument("--max-images", type=_positive_int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    if args.cmd == "train" and not args.config:  # no silent hours-long default run
        from .train import Config

        try:  # a bad --set is still reported as such
            Config.from_dict(_parse_set(args.set))
        except ValueError as err:
            print(f"nclib train: error: {err}", file=sys.stderr)
            return 2
        t.print_help(sys.stderr)
        print("nclib train: error: --config is required", file=sys.stderr)
        return 2
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError

    try:
        res = _train(args) if args.cmd == "train" else _evaluate(args)
        if res:
            text = json.dumps({k: v for k, v in res.items() if k != "history"}, indent=1, default=str)
            print(text)
            if getattr(args, "json", None):
                with open(args.json, "w") as f:
                    f.write(text)
    except (ValueError, OSError) as err:
        notes = " ".join(getattr(err, "__notes__", []))
        print(f"nclib {args.cmd}: error: {err}{' (' + notes + ')' if notes else ''}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"nclib {args.cmd}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"nclib {args.cmd}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
