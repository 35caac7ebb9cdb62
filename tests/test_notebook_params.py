"""Notebook parameters and the reporting helpers the notebooks call (nclib.report, scripts/run_notebooks.py).

References: papermill itself (its --help-notebook parser, its injected-cell translator, its execution), the csv
module, and the PNG chunk layout; nothing here re-derives what it checks from nclib.report's own code.
"""
from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")
yaml = pytest.importorskip("yaml")

from nclib import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
PROFILES = ["smoke", "default", "paper"]
PENDING: set = set()  # notebooks whose parameters cell is not yet converted (none left)
TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict}


def params_of(stem):
    return pm.inspect_notebook(str(ROOT / "notebooks" / f"{stem}.ipynb"))


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_every_parameter_typed_and_documented(stem):
    if stem in PENDING:
        pytest.xfail("notebook 03's parameters cell: regime helper")
    params = params_of(stem)
    assert params, f"{stem}: no parameters cell"
    untyped = [n for n, p in params.items() if p["inferred_type_name"] not in TYPES]
    undocumented = [n for n, p in params.items() if not p["help"].strip()]
    assert not untyped and not undocumented, (untyped, undocumented)
    # every assignment of the cell is seen by papermill's parser (an '=' in a comment hides a parameter)
    nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert set(report.assigned_names("".join(cell["source"]))) == set(params)


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_figures_dir_is_the_one_name(stem):
    if stem in PENDING:
        pytest.xfail("notebook 03 still says `figures`: regime helper")
    params = params_of(stem)
    assert "figures_dir" in params and "figures" not in params and "photo_name" not in params


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_keys_are_notebook_parameters(profile):
    prof = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
    assert sorted(prof) == NOTEBOOKS, "a profile names every notebook, and only notebooks"
    for stem, values in prof.items():
        declared_names = report.notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")
        params = params_of(stem)
        for key, value in (values or {}).items():
            assert key in declared_names, f"params/{profile}.yaml: {stem} has no parameter {key!r}"
            declared = params.get(key, {}).get("inferred_type_name")
            if declared in TYPES:
                assert isinstance(value, TYPES[declared]) and not (declared != "bool" and isinstance(value, bool)), \
                    f"params/{profile}.yaml: {stem}.{key} = {value!r} is not a {declared}"


def test_default_profile_matches_the_notebook_defaults():
    """`make figures` must redraw the committed figures: its profile injects nothing that differs."""
    prof = yaml.safe_load((ROOT / "params" / "default.yaml").read_text())
    for stem, values in prof.items():
        defaults = report.notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")
        for key, value in (values or {}).items():
            assert defaults[key] == value, (stem, key)


def test_notebook_parameters_reads_what_papermills_parser_misses(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('a: int = 3  # ok\nb = "x"  # a=b in a comment\nc: list = [1, 2]  # ok\n'
                                     'd = some_call()  # not a literal')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("x = 1"), cell]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, tmp_path / "n.ipynb")
    assert "b" not in pm.inspect_notebook(str(tmp_path / "n.ipynb"))  # papermill's parser drops it
    assert report.notebook_parameters(tmp_path / "n.ipynb") == {"a": 3, "b": "x", "c": [1, 2], "d": "some_call()"}


def test_unknown_parameters_against_papermills_injected_cell():
    declared = 'size: int = 64  # pixels\nphoto: str = "a"  # name\nx = y = 3\n'
    injected = pm.translators.translate_parameters("python3", "python", {"size": 3, "dataset": "voc"}, "Parameters")
    assert report.unknown_parameters(declared, injected) == ["dataset"]
    ok = pm.translators.translate_parameters("python3", "python", {"size": 3, "x": 1, "y": 2}, "Parameters")
    assert report.unknown_parameters(declared, ok) == []


def test_check_parameters_reads_the_kernel_history():
    declared = 'size: int = 64  # pixels\n'
    injected = pm.translators.translate_parameters("python3", "python", {"sise": 3}, "Parameters")
    with pytest.raises(ValueError, match="sise"):
        report.check_parameters(["", declared, injected, "report.check_parameters()"])
    report.check_parameters(["", declared, "report.check_parameters()"])  # nothing injected: Jupyter, nbval
    good = pm.translators.translate_parameters("python3", "python", {"size": 3}, "Parameters")
    report.check_parameters(["", declared, good, "x"])


def test_papermill_run_with_an_unknown_parameter_fails(tmp_path):
    """End to end through papermill and a kernel: `-p` with a name the notebook lacks stops the run."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('size: int = 4  # pixels')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("from nclib.report import check_parameters\ncheck_parameters()\n"
                                             "print('ran with', size)")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    src = tmp_path / "nb.ipynb"
    nbformat.write(nb, src)
    env_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        with pytest.raises(pm.PapermillExecutionError, match="unknown notebook parameter.*dataset"):
            pm.execute_notebook(str(src), str(tmp_path / "bad.ipynb"), parameters={"dataset": "voc"},
                                kernel_name="python3", progress_bar=False)
        out = pm.execute_notebook(str(src), str(tmp_path / "ok.ipynb"), parameters={"size": 7},
                                  kernel_name="python3", progress_bar=False)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert "ran with 7" in "".join(o.get("text", "") for o in out.cells[-1].outputs)


def test_runner_rejects_an_unknown_profile_key_before_running(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("00_lattice_filter:\n  dataset: voc\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), str(prof),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode != 0 and "dataset" in r.stderr
    assert not (tmp_path / "out" / "00_lattice_filter.ipynb").exists()


# ---------------------------------------------------------------- strip, figures, tables, provenance

def test_strip_notebook_drops_volatile_metadata_and_keeps_images():
    png = {"data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}, "metadata": {},
           "output_type": "display_data"}
    nb = {"metadata": {"papermill": {"duration": 1.0, "start_time": "2026-11-30T10:00:00"}, "kernelspec": {"n": 1}},
          "cells": [
              {"cell_type": "markdown", "metadata": {"papermill": {"duration": 0.1}}, "source": "# t"},
              {"cell_type": "code", "execution_count": 7, "id": "x1", "source": "1",
               "metadata": {"execution": {"iopub.status.busy": "2026"}, "papermill": {"status": "completed"}},
               "outputs": [{"output_type": "execute_result", "execution_count": 7, "data": {}, "metadata": {}}]},
              {"cell_type": "code", "execution_count": 12, "id": "abc123", "source": "x = 1",
               "metadata": {"tags": ["injected-parameters"]}, "outputs": []},
              {"cell_type": "code", "execution_count": 13, "id": "x3", "source": "plot", "metadata": {},
               "outputs": [png]},
          ]}
    out = report.strip_notebook(json.loads(json.dumps(nb)))
    text = json.dumps(out)
    assert "papermill" not in text and "iopub" not in text and "2026" not in text
    assert [c.get("execution_count") for c in out["cells"]] == [None, 1, 2, 3]
    assert out["cells"][1]["outputs"][0]["execution_count"] == 1
    assert out["cells"][2]["id"] == "injected-parameters"
    assert out["cells"][3]["outputs"] == [png] and out["metadata"]["kernelspec"] == {"n": 1}
    assert report.strip_notebook(json.loads(json.dumps(out))) == out  # idempotent


def test_strip_notebook_merges_stream_chunks():
    """The kernel splits a cell's prints at flush times that vary between runs: stripped, they are one output."""
    def stream(name, text):
        return {"name": name, "output_type": "stream", "text": text}

    split = [stream("stdout", ["runs: 17\n"]), stream("stdout", ["from cache\n", "done"]), stream("stderr", "warn\n"),
             stream("stdout", "after\n")]
    whole = [stream("stdout", ["runs: 17\n", "from cache\n", "done"]), stream("stderr", "warn\n"), stream("stdout", "after\n")]
    cell = lambda outs: {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "", "outputs": outs}  # noqa: E731
    a = report.strip_notebook({"metadata": {}, "cells": [cell(split)]})
    b = report.strip_notebook({"metadata": {}, "cells": [cell(whole)]})
    assert a == b and [o["name"] for o in a["cells"][0]["outputs"]] == ["stdout", "stderr", "stdout"]
    assert a["cells"][0]["outputs"][0]["text"] == ["runs: 17\n", "from cache\n", "done"]


def png_chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, kinds = 8, []
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        kinds.append((kind, data[i + 8:i + 8 + n]))
        i += 12 + n
    return kinds


def test_save_figure_is_byte_deterministic_and_without_metadata(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv(report.FIGURES_ENV, str(tmp_path / "redirected"))
    folder = report.figures_dir("../figures-not-used")
    assert folder == tmp_path / "redirected" and folder.is_dir()

    def draw(name):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([1, 10, 100], [3, 1, 2]); ax.set_xscale("log"); ax.set_title("a long title " * 4)
        report.save_figure(fig, name, folder, dpi=50)
        plt.close(fig)
        return (folder / name).read_bytes()

    a, b = draw("a.png"), draw("b.png")
    assert a == b
    assert not [k for k, _ in png_chunks(a) if k in (b"tEXt", b"iTXt", b"zTXt", b"tIME")]
    with pytest.raises(ValueError, match="name"):
        report.save_figure(None, "sub/x.png", folder)


def test_write_table_round_trips(tmp_path):
    rows = [{"method": "pCE", "miou_ours": 55.04, "miou_paper": 60.5, "miou_ours_crf": None, "miou_paper_crf": 66.7},
            {"method": "pCE + NC", "miou_paper": 62.4}]
    p = report.write_table(rows, tmp_path / "t.csv", crf=True)
    got = list(csv.DictReader(p.open()))
    assert got[0] == {"method": "pCE", "miou_ours": "55.0", "miou_paper": "60.5", "miou_ours_crf": "",
                      "miou_paper_crf": "66.7"}
    assert got[1]["miou_ours"] == "" and got[1]["miou_paper"] == "62.4"
    with pytest.raises(ValueError, match="unknown column"):
        report.write_table([{"method": "x", "miou_ours_crf": 1.0}], tmp_path / "u.csv")
    with pytest.raises(ValueError, match="method"):
        report.write_table([{"miou_ours": 1.0}], tmp_path / "v.csv")


def test_provenance_says_trained_now_or_from_cache(tmp_path):
    res = {"name": "toy", "hash": "abcd1234", "train_seconds": 12.3}
    d = tmp_path / "toy-abcd1234"
    d.mkdir()
    (d / "metrics.json").write_text("{}")
    assert report.provenance(res, root=tmp_path) == "toy: trained now (trained in 12 s)"
    old = time.time() - 10 * 24 * 3600
    os.utime(d / "metrics.json", (old, old))
    assert report.provenance(res, root=tmp_path) == "toy: from cache (not committed, trained in 12 s)"
    full = {**res, "commit": "1a2b3c4", "finished": "2026-11-26", "torch": "2.13.0", "device": "cpu"}
    assert report.provenance(full, root=tmp_path) == \
        "toy: from cache (commit 1a2b3c4, 2026-11-26, torch 2.13.0, device cpu, trained in 12 s)"


def test_environment_yml_matches_pyproject():
    """Every core and notebook dependency of pyproject.toml is in environment.yml with the same bounds."""
    tomllib = pytest.importorskip("tomllib")
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs = [d for d in env["dependencies"] if isinstance(d, str)]
    specs += next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_name = {"torch": "pytorch"}
    norm = {s.replace(" ", "") for s in specs}
    for dep in proj["dependencies"] + proj["optional-dependencies"]["notebook"]:
        name = dep.split(">")[0].split("<")[0].split("=")[0]
        want = dep.replace(name, conda_name.get(name, name), 1).replace(" ", "")
        assert want in norm, f"environment.yml lacks {want} (pyproject.toml: {dep})"
    assert f"python{proj['requires-python']}" in norm


def test_paper_table_rows_carry_the_papers_numbers(tmp_path):
    # the paper's Table 2, read from the paper (FACTS section 1), independently of nclib.report's constants
    t2 = {"full masks": ("64.1", "68.7"), "GrabCut proposals": ("55.5", "59.7"),
          "NormalizedCut proposals": ("58.7", "61.3"), "KernelCut proposals": ("59.8", "62.8"),
          "ScribbleSup": ("", "63.1"), "pCE": ("56.0", "62.0"), "pCE + NC": ("60.5", "65.1")}
    p = report.write_table(report.paper_table_rows(2, {"pCE": (27.1, 33.0), "pCE + NC over present": 30.6}),
                           tmp_path / "t2.csv", crf=True)
    got = {r["method"]: r for r in csv.DictReader(p.open())}
    assert {m: (r["miou_paper"], r["miou_paper_crf"]) for m, r in got.items() if m in t2} == t2
    assert got["pCE"]["miou_ours"] == "27.1" and got["pCE"]["miou_ours_crf"] == "33.0"
    assert got["GrabCut proposals"]["miou_ours"] == ""
    assert got["pCE + NC over present (ours)"]["miou_ours"] == "30.6"
    t1 = {r["method"]: r["miou_paper"] for r in report.paper_table_rows(1)}
    assert t1 == {"pCE": 55.8, "pCE + NEL": 56.1, "pCE + NEL + NC": 59.7, "pCE + NEL + NC + MSC": 60.5,
                  "pCE + NEL + NC + MSC + CRF": 65.1}
    t3 = {r["method"]: (r["miou_paper"], r["miou_paper_crf"]) for r in report.paper_table_rows(3)}
    assert t3["ResNet-101: pCE + NC"] == (72.8, 74.5) and t3["DeepLab-VGG16: full masks"] == (68.8, 71.5)
    with pytest.raises(ValueError, match="table"):
        report.paper_table_rows(4)


def runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runner_injects_only_what_differs_and_force_where_declared(tmp_path):
    mod = runner()
    # the default profile equals the notebooks' defaults: nothing injected, the committed cells stay as they are
    plans = mod.plan_runs(ROOT / "params" / "default.yaml", ["00_lattice_filter", "02_kmeans_nc_networks"])
    assert [(s, p) for s, _, p in plans] == [("00_lattice_filter", {}), ("02_kmeans_nc_networks", {})]
    forced = mod.plan_runs(ROOT / "params" / "default.yaml", ["00_lattice_filter", "02_kmeans_nc_networks"], True)
    assert [(s, p) for s, _, p in forced] == [("00_lattice_filter", {}), ("02_kmeans_nc_networks", {"force": True})]
    smoke = dict((s, p) for s, _, p in mod.plan_runs(ROOT / "params" / "smoke.yaml", ["01_losses_and_shallow"]))
    assert smoke == {"01_losses_and_shallow": yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())[
        "01_losses_and_shallow"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("02_kmeans_nc_networks:\n  figures: x\n")
    with pytest.raises(SystemExit, match="figures"):
        mod.plan_runs(bad)


def test_write_back_never_keeps_force():
    """After `make figures FORCE=1` the committed notebooks must not carry `force = True` into the next plain run."""
    mod = runner()

    def nb(src):
        return {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "force = False\n"},
                          {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": src},
                          {"cell_type": "code", "metadata": {}, "source": "print(force)\n"}]}

    only_force = mod.drop_force(nb(["# Parameters\n", "force = True\n"]))
    assert [c["metadata"].get("tags") for c in only_force["cells"]] == [["parameters"], None]
    mixed = mod.drop_force(nb("# Parameters\nseeds = [0]\nforce = True\n"))
    assert mixed["cells"][1]["source"] == ["# Parameters\n", "seeds = [0]\n"]
    untouched = nb(["# Parameters\n", "seeds = [0]\n"])
    assert mod.drop_force(untouched)["cells"][1]["source"] == ["# Parameters\n", "seeds = [0]\n"]


def test_label_rgb_colours_labels_and_dims_the_photo_where_unlabelled():
    import numpy as np

    from nclib.report import label_rgb

    palette = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([[0, 1], [255, 9]], dtype=np.uint8)
    image = np.full((2, 2, 3), 200.0)
    out = label_rgb(labels, palette, image)
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out[0, 1], palette[1]) and np.array_equal(out[1, 1], palette[2])  # clipped to the last
    assert np.allclose(out[1, 0], 200 / 255 * 0.5)  # unlabelled: the photo at half brightness
    assert np.array_equal(label_rgb(labels, palette)[1, 0], palette[2])  # without a photo 255 is just a label
