"""The JIT build wrapper: clear messages for a missing toolchain, no hang on a stale lock."""
from __future__ import annotations

import fcntl
import os

import pytest

from nclib import _ext


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
