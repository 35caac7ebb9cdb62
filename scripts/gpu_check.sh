#!/usr/bin/env bash
# `make gpu-check`: the one script to run on a machine with an NVIDIA GPU (target: under 5 minutes, build included).
#   1. checks that torch sees a CUDA device and that nvcc is there (says what to install otherwise);
#   2. builds the CUDA lattice kernel, the CPU kernel and the host emulation in parallel (JIT, cached);
#   3. runs the GPU tests: python -m pytest -q tests/test_cuda.py;
#   4. benchmarks against issue 4's goals: prints a markdown table and writes benchmarks/gpu.md.
# Environment: PY (default .venv/bin/python, else python3), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PATH="$(dirname "$PY"):$PATH"

step() { echo; echo "== gpu-check [$(( $(date +%s) - START )) s] $*"; }

step "1/4 environment"
"$PY" - <<'EOF'
import os, shutil, sys
import torch
if not torch.cuda.is_available():
    print(f"gpu-check: torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda}).")
    if torch.version.cuda is None:
        print("This is a CPU-only torch. Install a CUDA build into the venv (pick the index matching the driver,"
              " see https://pytorch.org/get-started/locally/), e.g.:\n"
              "  .venv/bin/pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\n"
              "or start from scratch: rm -rf .venv && make setup "
              "TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'")
    else:
        print("torch has CUDA but finds no usable GPU: check `nvidia-smi`, the driver and CUDA_VISIBLE_DEVICES.")
    sys.exit(3)
from torch.utils.cpp_extension import CUDA_HOME
nvcc = shutil.which("nvcc") or (CUDA_HOME and f"{CUDA_HOME}/bin/nvcc")
print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"CUDA_HOME {CUDA_HOME} | nvcc {nvcc}")
if not nvcc or not os.path.exists(nvcc):
    print("gpu-check: nvcc not found. Install the CUDA toolkit whose major version matches torch.version.cuda "
          f"({torch.version.cuda}) and put it on PATH or set CUDA_HOME.")
    sys.exit(3)
import re, subprocess
out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
m = re.search(r"release (\d+)\.(\d+)", out)
if m and m.group(1) != torch.version.cuda.split(".")[0]:
    print(f"gpu-check: nvcc is CUDA {m.group(1)}.{m.group(2)} but torch was built with CUDA {torch.version.cuda}; "
          "torch.utils.cpp_extension refuses a different major version. Install a matching toolkit (or a torch "
          "build for this toolkit) and point CUDA_HOME at it.")
    sys.exit(3)
EOF

step "2/4 build the CUDA kernel, the CPU kernel and the emulation (parallel)"
LOGDIR=$(mktemp -d)
"$PY" -c "from nclib import _ext; _ext.load('cuda')" >"$LOGDIR/cuda.log" 2>&1 & P1=$!
"$PY" -c "from nclib import _ext; _ext.load('cpu')" >"$LOGDIR/cpu.log" 2>&1 & P2=$!
"$PY" -c "from nclib import _ext; _ext.load('cuda-emulation')" \
  >"$LOGDIR/emulated.log" 2>&1 & P3=$!
FAIL=0
for job in "cuda:$P1" "cpu:$P2" "emulated:$P3"; do
  if wait "${job#*:}"; then echo "built ${job%%:*}"; else echo "BUILD FAILED: ${job%%:*}"; tail -40 "$LOGDIR/${job%%:*}.log"; FAIL=1; fi
done
[ "$FAIL" = 0 ] || { echo "gpu-check: build failed (NCLIB_VERBOSE_BUILD=1 shows the compiler output)"; exit 1; }

step "3/4 GPU tests"
# The nvcc compile check is redundant here: the real build above compiled the same sources.
"$PY" -m pytest -q tests/test_cuda.py -m "not slow" ${PYTEST_ARGS:-}

step "4/4 benchmark"
"$PY" scripts/bench_gpu.py

ELAPSED=$(( $(date +%s) - START ))
echo
echo "gpu-check: done in ${ELAPSED} s (goal: under 300 s including the build); table in benchmarks/gpu.md"
