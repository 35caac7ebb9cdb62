"""The JIT build wrapper: clear messages for a missing toolchain, no hang on a stale lock, a cache key that
separates every build that could not run elsewhere, and an import that works without fcntl."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nclib import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NCLIB_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_errors", {})
    return tmp_path


def test_missing_ninja_says_what_to_install(fresh, monkeypatch):
    monkeypatch.setattr(_ext.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/" + name)
    with pytest.raises(_ext.ExtensionUnavailable, match="pip install ninja"):
        _ext.load("cpu")


def test_missing_compiler_says_what_to_install(fresh, monkeypatch):
    monkeypatch.setattr(_ext.shutil, "which", lambda name: "/usr/bin/ninja" if name == "ninja" else None)
    with pytest.raises(_ext.ExtensionUnavailable, match="C\\+\\+ compiler"):
        _ext.load("cpu")


def test_available_is_false_without_toolchain_and_layouts_fall_back(fresh, monkeypatch):
    """``available`` answers False (no raise) where the build cannot run, and the layout helpers that use it fall
    back to torch's copies with the same result."""
    from nclib.lattice import from_pixel_major, to_pixel_major

    monkeypatch.setattr(_ext.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/" + name)
    assert _ext.available("cpu") is False
    v = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    pm = to_pixel_major(v)
    assert torch.equal(pm, v.permute(0, 2, 3, 1).reshape(-1, 5))
    assert torch.equal(from_pixel_major(pm, v.shape), v)


def test_stale_torch_lock_is_removed(fresh, monkeypatch):
    import torch.utils.cpp_extension as cpp

    seen = {}

    def fake_load(name, build_directory, **kw):
        seen["lock_left"] = os.path.exists(os.path.join(build_directory, "lock"))
        return object()

    monkeypatch.setattr(cpp, "load", fake_load)
    name = _ext.extension_name("cpu")
    (fresh / name).mkdir()
    (fresh / name / "lock").write_text("")  # what a killed torch build leaves behind
    _ext.load("cpu")
    assert seen == {"lock_left": False}


def test_build_held_by_another_process_times_out_with_advice(fresh, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(_ext, "LOCK_TIMEOUT_S", 0.6)
    name = _ext.extension_name("cpu")
    fd = os.open(fresh / f"{name}.flock", os.O_CREAT | os.O_RDWR)
    # flock locks belong to the open file description: a second open() in this process conflicts like another
    # process would.
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(_ext.ExtensionUnavailable, match="delete"):
            _ext.load("cpu")
    finally:
        os.close(fd)


def test_failed_build_names_the_build_folder(fresh, monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kw):
        raise RuntimeError("Error building extension: g++ exploded")

    monkeypatch.setattr(cpp, "load", lambda *a, **kw: broken(**kw))
    with pytest.raises(_ext.ExtensionUnavailable, match=str(fresh)):
        _ext.load("cpu")


# ------------------------------------------------------------------------------------------------- cache key


@pytest.mark.parametrize("kind", _ext.BUILD_KINDS)
def test_cache_key_is_stable_and_names_the_kind(kind):
    assert _ext.extension_name(kind) == _ext.extension_name(kind)
    assert _ext.extension_name(kind).startswith(f"nclib_lattice_{kind.replace('-', '_')}_")
    assert _ext.extension_name(kind).isidentifier()  # it is the Python module name too
    key = _ext.cache_key(kind)
    assert key["kind"] == kind and key["prefix"] == sys.prefix and key["source_path"] == str(_ext._CSRC)


def test_build_kinds_have_distinct_folders():
    assert len({_ext.extension_name(k) for k in _ext.BUILD_KINDS}) == len(_ext.BUILD_KINDS)


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="kind must be one of"):
        _ext.load("gpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        _ext.extension_name("cuda_emulation")


@pytest.mark.parametrize("kind", ["cpu", "cuda-emulation"])
def test_cache_key_changes_with_the_compile_flags(kind, monkeypatch):
    before, flags = _ext.extension_name(kind), _ext.cache_key(kind)["cxx_flags"]
    monkeypatch.setenv("NCLIB_NATIVE", "0" if os.environ.get("NCLIB_NATIVE", "1") == "1" else "1")
    assert ("-march=native" in _ext.cache_key(kind)["cxx_flags"]) != ("-march=native" in flags)
    assert _ext.extension_name(kind) != before
    monkeypatch.undo()
    assert _ext.extension_name(kind) == before
    monkeypatch.setattr(_ext, "cxx_flags", lambda k: ["-O2"])
    assert _ext.extension_name(kind) != before


def test_cuda_cache_key_covers_nvcc_flags_gpu_and_cuda_version(monkeypatch):
    monkeypatch.setattr(_ext, "_gpu_capabilities", lambda: "8.0")
    monkeypatch.setattr(_ext, "_nvcc_version", lambda: "release 12.4, V12.4.131")
    base = _ext.extension_name("cuda")
    cpu = _ext.extension_name("cpu")
    changes = [
        ("_gpu_capabilities", lambda: "9.0"),
        ("_nvcc_version", lambda: "release 12.8, V12.8.93"),
        ("cuda_flags", lambda: ["-O3", "--use_fast_math"]),
    ]
    for attr, fn in changes:
        with monkeypatch.context() as m:
            m.setattr(_ext, attr, fn)
            assert _ext.extension_name("cuda") != base, attr
            assert _ext.extension_name("cpu") == cpu, attr  # the CPU build does not depend on the GPU
    with monkeypatch.context() as m:
        m.setattr(_ext.torch.version, "cuda", "11.8")
        assert _ext.extension_name("cuda") != base
    with monkeypatch.context() as m:
        m.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        assert _ext.extension_name("cuda") != base


@pytest.mark.parametrize("kind", _ext.BUILD_KINDS)
def test_cache_key_changes_with_the_host_cpu(kind, monkeypatch):
    before = _ext.extension_name(kind)
    monkeypatch.setattr(_ext, "_host_cpu", lambda: "aarch64 | Neoverse-V2")
    assert _ext.extension_name(kind) != before


def test_host_cpu_names_the_instruction_sets():
    cpu = _ext._host_cpu()
    assert cpu.startswith(os.uname().machine if hasattr(os, "uname") else "")
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        assert flags.split(":", 1)[1].strip() in cpu  # -march=native follows these


@pytest.mark.parametrize("kind", _ext.BUILD_KINDS)
def test_cache_key_changes_with_the_source_path_and_the_prefix(kind, monkeypatch, tmp_path):
    before, sources = _ext.extension_name(kind), _ext.cache_key(kind)["sources"]
    copy = tmp_path / "checkout" / "nclib" / "csrc"
    shutil.copytree(_ext._CSRC, copy)  # the same sources in another checkout
    with monkeypatch.context() as m:
        m.setattr(_ext, "_CSRC", copy)
        assert _ext.cache_key(kind)["sources"] == sources
        assert _ext.extension_name(kind) != before
    with monkeypatch.context() as m:
        m.setattr(_ext.sys, "prefix", str(tmp_path / "other-venv"))
        assert _ext.extension_name(kind) != before
    assert _ext.extension_name(kind) == before


def test_cache_key_changes_with_the_sources(monkeypatch, tmp_path):
    copy = tmp_path / "csrc"
    shutil.copytree(_ext._CSRC, copy)
    monkeypatch.setattr(_ext, "_CSRC", copy)
    before = {k: _ext.cache_key(k)["sources"] for k in _ext.BUILD_KINDS}
    (copy / "lattice_cuda.cu").write_text((copy / "lattice_cuda.cu").read_text() + "\n// edit\n")
    after = {k: _ext.cache_key(k)["sources"] for k in _ext.BUILD_KINDS}
    assert after["cpu"] == before["cpu"]  # the CPU kernel does not compile the .cu
    assert after["cuda"] != before["cuda"] and after["cuda-emulation"] != before["cuda-emulation"]
    (copy / "lattice_common.h").write_text((copy / "lattice_common.h").read_text() + "\n// edit\n")
    assert _ext.cache_key("cpu")["sources"] != before["cpu"]


def test_build_writes_its_cache_key(fresh, monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load", lambda **kw: types.ModuleType(kw["name"]))
    _ext.load("cuda-emulation")
    folder = fresh / _ext.extension_name("cuda-emulation")
    assert '"kind": "cuda-emulation"' in (folder / "cache_key.json").read_text()
    assert "NCLIB_CUDA_EMULATE" in (folder / "emulation.cpp").read_text()


# ---------------------------------------------------------------------------------------------- without fcntl


def _import_ext_copy(monkeypatch, hide: tuple[str, ...], fake: dict | None = None) -> types.ModuleType:
    """A fresh copy of nclib/_ext.py imported with the modules in ``hide`` unavailable (as on Windows)."""
    for name in hide:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    for name, mod in (fake or {}).items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("nclib_ext_copy", _ext.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_fcntl_or_msvcrt_builds_are_not_locked(monkeypatch, tmp_path):
    ext = _import_ext_copy(monkeypatch, ("fcntl", "msvcrt"))
    assert ext.fcntl is None and ext.msvcrt is None and ext.LOCK_KIND == "none"
    with ext._BuildLock(tmp_path / "x.flock"):
        with ext._BuildLock(tmp_path / "x.flock"):  # no OS lock: a second holder is not refused
            pass
    assert "not serialised" in ext.__doc__


def test_without_fcntl_msvcrt_locks_the_first_byte(monkeypatch, tmp_path):
    calls = []
    held = set()

    def locking(fd, mode, nbytes):
        calls.append((mode, nbytes))
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd
        if mode == 1:  # LK_NBLCK
            if path in held:
                raise OSError("locked")
            held.add(path)
        elif mode == 0:  # LK_UNLCK
            held.discard(path)

    fake = types.ModuleType("msvcrt")
    fake.LK_UNLCK, fake.LK_NBLCK, fake.locking = 0, 1, locking
    ext = _import_ext_copy(monkeypatch, ("fcntl",), {"msvcrt": fake})
    assert ext.LOCK_KIND == "msvcrt"
    monkeypatch.setattr(ext, "LOCK_TIMEOUT_S", 0.6)
    with ext._BuildLock(tmp_path / "y.flock"):
        if os.path.exists("/proc/self/fd"):  # a second holder waits, then gets the advice
            with pytest.raises(ext.ExtensionUnavailable, match="delete"):
                with ext._BuildLock(tmp_path / "y.flock"):
                    pass
    assert calls[0] == (1, 1) and calls[-1] == (0, 1)
    with ext._BuildLock(tmp_path / "y.flock"):  # released on exit
        pass


def test_import_nclib_without_fcntl():
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import nclib, nclib.lattice\n"
        "from nclib import _ext\n"
        "assert _ext.LOCK_KIND in ('msvcrt', 'none'), _ext.LOCK_KIND\n"
        "print('ok', _ext.LOCK_KIND)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr


_PORTABLE_RUN = """
import sys, torch
from nclib import Permutohedral, rgbxy_features
from nclib.photos import photo_tensor
img = torch.cat([photo_tensor(n, crop=96) for n in ("astronaut", "coffee")])
lat = Permutohedral(rgbxy_features(img, sigma_rgb=15.0, sigma_xy=20.0))
v = torch.rand(2, 21, 96, 96, generator=torch.Generator().manual_seed(0))
sym = lat.apply_symmetric(v)  # the NC loss's fused (L + L') v, with the degree
torch.save({"state": tuple(lat.state), "out": lat.filter(v), "outT": lat.filter(v, transpose=True), "sym": sym,
            "deg": lat.norm()}, sys.argv[1])
"""


def test_portable_build_equals_native_build_bitwise(tmp_path):
    """The vectorised (-march=native, AVX-512 where present) and the portable build compute the same lattice and
    the same filter outputs bit for bit (standard, adjoint, and the fused (L + L') v with its degree): results do
    not depend on the machine's instruction set."""
    runs = {}
    for native in ("1", "0"):
        env = dict(os.environ, NCLIB_NATIVE=native, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
        out = tmp_path / f"native{native}.pt"
        subprocess.run([sys.executable, "-c", _PORTABLE_RUN, str(out)], env=env, check=True, timeout=900)
        runs[native] = torch.load(out, weights_only=True)
    a, b = runs["1"], runs["0"]
    for x, y in zip(a["state"], b["state"]):
        assert torch.equal(x, y)
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["outT"], b["outT"])
    assert torch.equal(a["sym"], b["sym"]) and torch.equal(a["deg"], b["deg"])
