"""Command line: ``python -m nclib.data make-default`` and ``python -m nclib.data prepare {voc,msra10k}``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nclib.data", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-default", help="generate the embedded default data set (deterministic)")
    mk.add_argument("--root", type=Path, default=None, help="target folder (default: <repo>/data/default or $NCLIB_DATA)")
    mk.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    mk.add_argument("--force", action="store_true", help="regenerate even if the folder exists")
    mk.add_argument("--count", type=int, default=None, help="cap every split at this many images (quick tests)")
    pr = sub.add_parser("prepare", help="download and convert a real data set")
    pr.add_argument("dataset", choices=["voc", "msra10k"])
    pr.add_argument("--root", type=Path, required=True, help="target folder, e.g. data/voc")
    pr.add_argument("--base-url", default=None, help="mirror base URL (default: the module constants / env)")
    pr.add_argument("--cache", type=Path, default=None, help="where downloads are kept (default: <root>/downloads)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--scribbles", choices=["png", "xml"], default="png",
                    help="voc only: rloss's rasterized PNGs (default) or ScribbleSup's XML polylines rasterized here")
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
        else:
            from . import prepare

            kw = dict(base_url=args.base_url, cache=args.cache, progress=not args.no_progress)
            if args.dataset == "voc":
                out = prepare.prepare_voc(args.root, scribbles=args.scribbles, **kw)
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
