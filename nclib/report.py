"""What the notebooks need to report: deterministic figure files, strict papermill parameters, where a cached
result comes from, and the paper's tables as CSV.

Kept out of the library's numerical core: nothing here is imported by the losses or the training engine.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

#: Environment variable that redirects every figure a notebook saves (nbval points it at an ignored folder, so
#: that ``make test`` never rewrites the tracked ``figures/``).
FIGURES_ENV = "NCLIB_FIGURES"

#: dpi of every saved figure unless a notebook asks otherwise; fixed so a re-run writes the same bytes.
DEFAULT_DPI = 100

# When this module was first imported: a metrics.json written after it was trained by this process.
_IMPORTED_AT = time.time()


def figures_dir(default: Union[str, Path]) -> Path:
    """The folder figures go to: ``$NCLIB_FIGURES`` when set, else ``default`` (created either way).

    Also makes matplotlib's output deterministic (no software/date metadata in PNG, PDF or SVG, fixed SVG hash
    salt) and the notebook's inline PNGs likewise, so re-running a notebook does not churn its files.
    """
    out = Path(os.environ.get(FIGURES_ENV) or default)
    out.mkdir(parents=True, exist_ok=True)
    deterministic_matplotlib()
    return out


def deterministic_matplotlib() -> None:
    """rcParams and inline-backend settings under which the same figure is saved as the same bytes."""
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "nclib"
    matplotlib.rcParams["savefig.dpi"] = DEFAULT_DPI
    try:  # inside a Jupyter kernel: the PNGs stored in the notebook carry no matplotlib version either
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        if get_ipython() is not None and "inline" in matplotlib.get_backend():
            set_matplotlib_formats("png", metadata={"Software": None})
    except ImportError:
        pass


def save_figure(fig, name: str, folder: Union[str, Path], dpi: int = DEFAULT_DPI) -> None:
    """Save ``fig`` as ``folder/name`` with no metadata that changes between runs, tight bounding box (no
    clipped titles). The figure stays open, so the inline backend still shows it. Returns nothing, so that a
    notebook cell ending with it prints no (machine-dependent) path."""
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a bare file name like '01_x.png', got {name!r}")
    path = Path(folder) / name
    fmt = path.suffix.lstrip(".").lower()
    meta: Dict[str, Any] = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None,
                                                               "CreationDate": None},
                            "svg": {"Date": None, "Creator": None}}.get(fmt, {})
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=meta)


# ---------------------------------------------------------------- papermill parameters

def assigned_names(source: str) -> List[str]:
    """Names assigned at the top level of a cell's source (``x = 1``, ``x: int = 1``), in order."""
    names: List[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def notebook_parameters(path: Union[str, Path]) -> Dict[str, Any]:
    """name -> default value of the assignments in a notebook's ``parameters`` cell (read with ``ast``, so a
    parameter that papermill's line parser misses is still found; a default that is not a literal is its source)."""
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{path}: no cell tagged 'parameters'")
    src = "".join(cells[0]["source"])
    out: Dict[str, Any] = {}
    for node in ast.parse(src).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if getattr(node, "value", None) is None:
            continue
        try:
            value: Any = ast.literal_eval(node.value)
        except ValueError:
            value = ast.get_source_segment(src, node.value)
        out.update({t.id: value for t in targets if isinstance(t, ast.Name)})
    return out


def unknown_parameters(declared_source: str, injected_source: str) -> List[str]:
    """Names papermill injected (``injected_source``, its ``# Parameters`` cell) that the notebook's
    ``parameters`` cell (``declared_source``) does not declare."""
    declared = set(assigned_names(declared_source))
    return [n for n in assigned_names(injected_source) if n not in declared]


def check_parameters(history: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` when papermill injected a parameter the notebook does not declare.

    papermill only logs a warning for ``-p name value`` with an unknown ``name``, and the notebook then runs with
    its default: a typo silently changes nothing. Call this in the cell after the ``parameters`` cell. It reads the
    kernel's input history (``In``): the last input that starts with ``# Parameters`` is papermill's injected cell,
    the input just before it the ``parameters`` cell. Without an injected cell (Jupyter, nbval) it does nothing.
    """
    if history is None:
        from IPython import get_ipython

        ip = get_ipython()
        history = ip.user_ns.get("In", []) if ip is not None else []
    idx = [i for i, src in enumerate(history) if src.lstrip().startswith("# Parameters")]
    if not idx or idx[-1] == 0:
        return
    bad = unknown_parameters(history[idx[-1] - 1], history[idx[-1]])
    if bad:
        raise ValueError(f"unknown notebook parameter(s) {bad}: this notebook declares "
                         f"{assigned_names(history[idx[-1] - 1])} (see papermill --help-notebook)")


# ---------------------------------------------------------------- results-cache provenance

def label_rgb(labels, palette, image=None):
    """(H, W) label map -> (H, W, 3) colours in [0, 1] for the qualitative panels: ``palette[min(label, len - 1)]``
    (``palette`` a (L, 3) array in [0, 1]); with ``image`` ((H, W, 3) RGB 0..255), unlabelled pixels (255) show
    the image dimmed to half, so scribbles and void regions read against the photo."""
    import numpy as np

    out = palette[np.minimum(labels, len(palette) - 1)]
    if image is not None:
        out = np.where((labels == 255)[..., None], image / 255 * 0.5, out)
    return out


def _git(args: Sequence[str], cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(result: Mapping[str, Any], root: Union[str, Path, None] = None) -> str:
    """One line on where a :func:`nclib.train.run` result comes from: ``trained now (...)`` when its
    ``metrics.json`` was written after this process imported :mod:`nclib.report`, else ``from cache (...)`` with
    the commit and date that last committed the file (``not committed`` where git does not know it).

    Fields the result may carry (``commit``, ``nclib``, ``torch``, ``device``, ``finished``, ``train_seconds``) are
    added where present.
    """
    from .train import results_root

    root = Path(root) if root is not None else results_root()
    path = root / f"{result['name']}-{result['hash']}" / "metrics.json"
    extra = [f"{k} {result[k]}" for k in ("nclib", "torch", "device") if result.get(k)]
    if result.get("train_seconds") is not None:
        extra.append(f"trained in {float(result['train_seconds']):.0f} s")
    if path.is_file() and path.stat().st_mtime >= _IMPORTED_AT:
        return f"{result['name']}: trained now ({', '.join(extra) or 'no provenance fields'})"
    if result.get("commit"):
        where = f"commit {result['commit']}" + (f", {result['finished']}" if result.get("finished") else "")
    else:
        log = _git(["log", "-1", "--format=%h %cs", "--", path.name], path.parent) if path.is_file() else ""
        where = f"commit {log.split()[0]}, {log.split()[1]}" if log else "not committed"
    return f"{result['name']}: from cache ({', '.join([where] + extra)})"


# ---------------------------------------------------------------- tables

TABLE_COLUMNS = ("method", "miou_ours", "miou_paper")


def write_table(rows: Iterable[Mapping[str, Any]], path: Union[str, Path], crf: bool = False) -> Path:
    """Write a paper table as CSV: ``method, miou_ours, miou_paper`` (+ ``miou_ours_crf, miou_paper_crf`` when
    ``crf``). mIoU in percent with one decimal; a missing number (``None``) is an empty field."""
    cols = list(TABLE_COLUMNS) + (["miou_ours_crf", "miou_paper_crf"] if crf else [])
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in rows:
            unknown = set(row) - set(cols)
            if unknown:
                raise ValueError(f"rows: unknown column(s) {sorted(unknown)}; expected {cols}")
            if not row.get("method"):
                raise ValueError(f"rows: every row needs a method, got {dict(row)}")
            w.writerow({c: _fmt(row.get(c)) for c in cols})
    return path


def write_claim_csv(per: Mapping[str, Sequence[float]], seeds: Sequence[int], path: Union[str, Path]) -> Path:
    """``figures/claim_<set>.csv``: columns ``method, miou_mean, miou_seed<s>...`` (mIoU in %, 2 decimals), one row
    per entry of ``per`` ({method: [mIoU % per seed, in the order of ``seeds``]}), in its order."""
    import numpy as np

    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["method", "miou_mean"] + [f"miou_seed{s}" for s in seeds])
        for name, vals in per.items():
            if len(vals) != len(seeds):
                raise ValueError(f"per[{name!r}] has {len(vals)} values for {len(seeds)} seeds")
            w.writerow([name, f"{np.mean(vals):.2f}"] + [f"{x:.2f}" for x in vals])
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


# ---------------------------------------------------------------- executed notebooks without volatile metadata

def strip_notebook(nb: Dict[str, Any]) -> Dict[str, Any]:
    """``nb`` (notebook JSON as a dict, changed in place and returned) without what changes on every run:
    papermill's timestamps, durations and environment (notebook and cell metadata), the kernel's per-cell
    ``execution`` timings; execution counts renumbered 1, 2, ... over the code cells in order; papermill's injected
    cell given a fixed id; consecutive stream outputs of one stream (stdout / stderr) merged into one, as the kernel
    splits a cell's prints into chunks at flush times that vary from run to run. Outputs, images included, are
    kept."""
    nb.get("metadata", {}).pop("papermill", None)
    count = 0
    for cell in nb.get("cells", []):
        meta = cell.setdefault("metadata", {})
        meta.pop("papermill", None)
        meta.pop("execution", None)
        if "injected-parameters" in meta.get("tags", []):
            cell["id"] = "injected-parameters"
        if cell.get("cell_type") != "code":
            continue
        cell["outputs"] = _merge_streams(cell.get("outputs", []))
        executed = any("execution_count" in o for o in cell.get("outputs", [])) or cell.get("execution_count")
        if cell.get("execution_count") is not None or executed:
            count += 1
            cell["execution_count"] = count
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = count
    return nb


def _merge_streams(outputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Consecutive ``stream`` outputs of the same name joined into one (their text concatenated, order kept)."""
    merged: List[Dict[str, Any]] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")):
            text = lambda o: "".join(o["text"]) if isinstance(o["text"], list) else o["text"]  # noqa: E731
            prev["text"] = (text(prev) + text(out)).splitlines(True)
        else:
            merged.append(out)
    return merged


# ---------------------------------------------------------------- the paper's tables (VOC 2012 val mIoU, %)

#: Table 1 (DeepLab-MSc-largeFOV): each row adds one ingredient to the previous one (MSC: multi-scale network).
PAPER_TABLE1: Dict[str, Optional[float]] = {
    "pCE": 55.8, "pCE + NEL": 56.1, "pCE + NEL + NC": 59.7, "pCE + NEL + NC + MSC": 60.5,
    "pCE + NEL + NC + MSC + CRF": 65.1}
#: Table 2 (DeepLab-MSc-largeFOV): training target -> (before CRF, after CRF).
PAPER_TABLE2: Dict[str, tuple] = {
    "full masks": (64.1, 68.7), "GrabCut proposals": (55.5, 59.7), "NormalizedCut proposals": (58.7, 61.3),
    "KernelCut proposals": (59.8, 62.8), "ScribbleSup": (None, 63.1), "pCE": (56.0, 62.0), "pCE + NC": (60.5, 65.1)}
#: Table 3: network -> {supervision: (before CRF, after CRF)}.
PAPER_TABLE3: Dict[str, Dict[str, tuple]] = {
    "DeepLab-MSc-largeFOV": {"full masks": (64.1, 68.7), "pCE": (56.0, 62.0), "pCE + NC": (60.5, 65.1)},
    "DeepLab-VGG16": {"full masks": (68.8, 71.5), "pCE": (60.4, 64.3), "pCE + NC": (62.4, 65.2)},
    "ResNet-101": {"full masks": (75.6, 76.8), "pCE": (69.5, 72.8), "pCE + NC": (72.8, 74.5)},
}


def paper_table_rows(table: int, ours: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Rows for :func:`write_table` of the paper's Table ``table`` (1, 2 or 3) with our numbers beside.

    ``ours`` maps a method (as in the paper's rows; Table 3: ``"<network>: <supervision>"``) to our mIoU, or to
    ``(before CRF, after CRF)`` for Tables 2 and 3. A method of ``ours`` the paper does not have is appended
    (marked ``(ours)``); a paper row without ours keeps an empty ``miou_ours``.
    """
    ours = dict(ours or {})
    rows: List[Dict[str, Any]] = []

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, None)

    if table == 1:
        paper = {m: (v, None) for m, v in PAPER_TABLE1.items()}
    elif table == 2:
        paper = dict(PAPER_TABLE2)
    elif table == 3:
        paper = {f"{net}: {sup}": v for net, sups in PAPER_TABLE3.items() for sup, v in sups.items()}
    else:
        raise ValueError(f"table must be 1, 2 or 3, got {table!r}")
    for method in list(paper) + [m for m in ours if m not in paper]:
        mine = pair(ours.get(method))
        ref = paper.get(method, (None, None))
        row: Dict[str, Any] = {"method": method if method in paper else f"{method} (ours)",
                               "miou_ours": mine[0], "miou_paper": ref[0]}
        if table != 1:
            row.update(miou_ours_crf=mine[1], miou_paper_crf=ref[1])
        rows.append(row)
    return rows
