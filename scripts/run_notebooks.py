"""Execute the notebooks with a parameter profile: ``python scripts/run_notebooks.py params/default.yaml
[--force] [--out build/notebooks] [--write-back] [NOTEBOOK ...]``.

A profile (``params/*.yaml``) maps each notebook's stem to its parameters. Every key is checked against the
notebook's ``parameters`` cell before anything runs (papermill itself only warns on an unknown name). Values equal
to the notebook's default are not injected, so a default run leaves the committed notebook's cells unchanged.
``--force`` sets ``force = True`` in each notebook that has it (retrain instead of reading ``results/``).
``--write-back`` strips volatile metadata (``nclib.report.strip_notebook``) and writes the executed notebook over
``notebooks/NAME.ipynb`` (what ``make figures`` does); otherwise it stays under ``--out``. The written-back
notebook keeps papermill's injected cell (the parameters it ran with) but never ``force = True``: left there, every
later plain ``make figures`` would retrain everything again.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import papermill as pm
import yaml

from nclib.report import notebook_parameters, strip_notebook

ROOT = Path(__file__).resolve().parent.parent


def load_profile(path):
    prof = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(prof, dict) or not all(isinstance(v, dict) or v is None for v in prof.values()):
        raise ValueError(f"{path}: expected a mapping notebook stem -> mapping of parameters")
    return {k: dict(v or {}) for k, v in prof.items()}


def plan_runs(profile, stems=(), force=False, nbdir=ROOT / "notebooks"):
    """[(stem, notebook path, parameters to inject)] for ``stems`` (default: every notebook of the profile),
    everything checked before anything runs: SystemExit naming the key when the notebook lacks a parameter."""
    prof = load_profile(profile)
    plans = []
    for stem in list(stems) or sorted(prof):
        path = Path(nbdir) / f"{stem}.ipynb"
        if not path.is_file():
            raise SystemExit(f"{profile}: no notebook {path}")
        defaults = notebook_parameters(path)
        params = dict(prof.get(stem, {}))
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise SystemExit(f"{profile}: {stem} has no parameter(s) {unknown}; it has {sorted(defaults)}")
        if force and "force" in defaults:
            params["force"] = True
        plans.append((stem, path, {k: v for k, v in params.items() if defaults.get(k) != v}))
    return plans


def drop_force(nb):
    """``nb`` (notebook dict, changed in place and returned) without a ``force = ...`` line in papermill's injected
    cell, and without that cell when nothing else is left in it."""
    for cell in list(nb.get("cells", [])):
        if "injected-parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        src = cell.get("source", "")
        lines = [ln for ln in (src.splitlines(True) if isinstance(src, str) else src)
                 if not re.match(r"\s*force\s*=", ln)]
        if any(ln.strip() and not ln.lstrip().startswith("#") for ln in lines):
            cell["source"] = lines
        else:
            nb["cells"].remove(cell)
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("notebooks", nargs="*", help="notebook stems (default: every notebook of the profile)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "build" / "notebooks"))
    ap.add_argument("--write-back", action="store_true")
    args = ap.parse_intermixed_args(argv)
    plans = plan_runs(args.profile, args.notebooks, args.force)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for stem, path, params in plans:
        t0 = time.perf_counter()
        out = Path(args.out) / path.name
        print(f"{stem}: {params or 'defaults'}", flush=True)
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name="python3", cwd=str(path.parent),
                            execution_timeout=3600, progress_bar=False)
        if args.write_back:
            nb = strip_notebook(drop_force(json.loads(out.read_text())))
            path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
        print(f"{stem}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{len(plans)} notebooks in {time.perf_counter() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
