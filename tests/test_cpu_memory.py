"""nclib.cpu_memory: importing nclib keeps a freed 17 MB tensor's memory in the heap (glibc), the opt-out does not.

Measured through glibc's own accounting (mallinfo2: free bytes held in the heap, bytes in mmapped blocks) in a
fresh interpreter per case, so what earlier tests allocated does not matter.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc malloc's")

PROBE = r"""
import ctypes, json
import nclib, torch
from nclib import cpu_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.ones(2, 21, 321, 321)          # 17.3 MB, what the NC loss and its softmax allocate per call
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"kept": cpu_memory.kept(), "mmapped_during": during.hblkhd, "free_in_heap_after": after.fordblks}))
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("NCLIB_KEEP_CPU_MEMORY", None)
    if env_value is not None:
        env["NCLIB_KEEP_CPU_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_keeps_a_freed_tensor_in_the_heap():
    r = _probe(None)
    assert r["kept"] is True
    assert r["mmapped_during"] < 17_000_000  # served from the heap, not a fresh mmap
    assert r["free_in_heap_after"] >= 17_000_000  # and kept there for the next call


def test_opt_out_leaves_malloc_alone():
    r = _probe("0")
    assert r["kept"] is False
    assert r["mmapped_during"] >= 17_000_000  # glibc's default: a fresh mmap ...
    assert r["free_in_heap_after"] < 17_000_000  # ... returned to the kernel on free


def test_keep_freed_memory_is_idempotent():
    from nclib import cpu_memory

    assert cpu_memory.keep_freed_memory() is cpu_memory.keep_freed_memory()
