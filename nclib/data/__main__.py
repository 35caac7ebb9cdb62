"""Command line: ``python -m nclib.data make-default``, ``python -m nclib.data prepare {voc,msra10k,horses}`` and
``python -m nclib.data proposals --method {grabcut,nc,kernelcut} --root <VOC-layout root>`` (Table 2's mask sets)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _proposals(args: argparse.Namespace) -> None:
    import time

    import yaml

    from .proposal_masks import write_proposal_masks

    params = {}
    for item in args.param:  # values read as YAML: numbers, booleans, strings
        if "=" not in item:
            raise ValueError(f"--param must be KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        params[key] = yaml.safe_load(val)
    t0 = time.perf_counter()
    out = write_proposal_masks(args.root, args.method, split=args.split, out=args.out, params=params,
                               unsure_ignore=args.unsure_ignore, band=args.band, limit=args.limit,
                               progress=not args.no_progress)
    meta = json.loads((out / "meta.json").read_text())
    print(f"{meta['images']} proposals at {out} ({time.perf_counter() - t0:.1f} s); labelled fraction "
          f"{meta['labelled_fraction']:.3f}, {meta['no_scribble_images']} images without scribbles")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nclib.data", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-default", help="generate the embedded default data set (deterministic)")
    mk.add_argument("--root", type=Path, default=None, help="target folder (default: <repo>/data/default or $NCLIB_DATA)")
    mk.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    mk.add_argument("--force", action="store_true", help="regenerate even if the folder exists")
    mk.add_argument("--count", type=int, default=None, help="cap every split at this many images (quick tests)")
    pr = sub.add_parser("prepare", help="download and convert a real data set")
    pr.add_argument("dataset", choices=["voc", "msra10k", "horses"])
    pr.add_argument("--root", type=Path, required=True, help="target folder, e.g. data/voc")
    pr.add_argument("--base-url", default=None, help="mirror base URL (default: the module constants / env)")
    pr.add_argument("--cache", type=Path, default=None, help="where downloads are kept (default: <root>/downloads)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--source", type=Path, default=None,
                    help="horses only: a local folder with images/ + masks/ instead of the public archive")
    pr.add_argument("--val-count", type=int, default=None,
                    help="horses only: images in the val split (default 100, i.e. 228 / 100)")
    pr.add_argument("--scribbles", choices=["png", "xml"], default="png",
                    help="voc only: rloss's rasterized PNGs (default) or ScribbleSup's XML polylines rasterized here")
    pp = sub.add_parser("proposals", help="proposal masks of a training split from its scribbles (Table 2)")
    pp.add_argument("--method", required=True, help="grabcut | nc | kernelcut")
    pp.add_argument("--root", type=Path, required=True, help="VOC-layout data root, e.g. data/default/scribble")
    pp.add_argument("--split", default="train", help="split list under ImageSets/Segmentation (default train)")
    pp.add_argument("--out", type=Path, default=None, help="target folder (default <root>/Proposals_<method>[_ignore])")
    pp.add_argument("--unsure-ignore", action="store_true",
                    help="label 255 a band of --band pixels around proposal boundaries (the ignore-region variant)")
    pp.add_argument("--band", type=int, default=3, help="half-width in pixels of the unsure band (default 3)")
    pp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter of the method (repeatable), e.g. sigma_xy=30 for 112 px images")
    pp.add_argument("--limit", type=int, default=None, help="only the first N images of the split (timing)")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "make-default":
            from .default import DEFAULT_SEED, default_root, make_default

            root = args.root if args.root is not None else default_root()
            if root.exists() and not root.is_dir():
                raise ValueError(f"--root {root} is a file, not a folder")
            if not args.force and (root / "meta.json").is_file():
                print(f"default data set already at {root} (--force regenerates it)")
            elif not args.force and root.exists() and any(root.iterdir()):
                raise ValueError(f"{root} exists and is not a default data set (no meta.json); --force replaces it")
            else:
                make_default(root, seed=DEFAULT_SEED if args.seed is None else args.seed, force=True, count=args.count)
                print(f"default data set at {root}")
            meta = json.loads((root / "meta.json").read_text())
            print(json.dumps(meta["stats"], indent=1))
        elif args.cmd == "proposals":
            _proposals(args)
        else:
            from . import prepare

            if args.source is not None and args.dataset != "horses":
                raise ValueError(f"--source is for `prepare horses` only, not {args.dataset}")
            if args.val_count is not None and args.dataset != "horses":
                raise ValueError(f"--val-count is for `prepare horses` only, not {args.dataset}")
            kw = dict(base_url=args.base_url, cache=args.cache, progress=not args.no_progress)
            if args.dataset == "voc":
                out = prepare.prepare_voc(args.root, scribbles=args.scribbles, **kw)
            elif args.dataset == "horses":
                out = prepare.prepare_horses(args.root, source=args.source,
                                             val_count=100 if args.val_count is None else args.val_count, **kw)
            else:
                out = prepare.prepare_msra10k(args.root, **kw)
            print(f"{args.dataset} ready at {out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable or odd target: one line, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
