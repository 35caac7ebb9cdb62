#!/usr/bin/env bash
# `make gpu-check`: the one script to run on a fresh machine with an NVIDIA GPU and a CUDA build of torch already
# installed. Installs nothing, needs no network, no venv: it uses $PY (default: .venv/bin/python when that python
# has a CUDA torch, else python3) with the repo on PYTHONPATH.
#   1. preflight: names every missing piece (CUDA torch + GPU, nvcc matching torch's CUDA, a host gcc nvcc accepts,
#      ninja, pytest, nclib's imports, compute-sanitizer) with a one-line fix each; stops here if one is missing;
#   2. builds the CUDA kernel, the CPU kernel and the CUDA-emulation build (tests/test_cuda.py -k emulated), in
#      parallel;
#   3. in parallel: the GPU tests (pytest -k "cuda or gpu"), compute-sanitizer memcheck and initcheck on a 32x32
#      case (scripts/bench_gpu.py --sanitize-case, PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every buffer is its own
#      allocation the sanitizer can bound);
#   4. the benchmark (scripts/bench_gpu.py): GPU-vs-CPU differences, bitwise determinism over 3 runs, timings;
#   5. prints ONE table (steps + benchmark rows) and writes it to benchmarks/gpu.md.
# Every step runs under `timeout` (and the whole run under GPU_CHECK_BUDGET seconds, default 540), so a hang
# cannot eat the device time; a failed step is reported and the next one still runs; exit 1 if any step failed.
# Logs: build/gpu-check/*.log.
#
#   bash scripts/gpu_check.sh              # on the GPU machine (goal: under 300 s, build included)
#   bash scripts/gpu_check.sh --preflight  # only the preflight
#   bash scripts/gpu_check.sh --dry-run    # rehearsal without a GPU: preflight reported but not fatal, CPU and
#                                          # emulation builds, the tests that run on a CPU, bench --dry-run;
#                                          # table in build/gpu-check/gpu.md (benchmarks/gpu.md is left alone)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-full}
case "$MODE" in full | --preflight | --dry-run) ;; *) echo "usage: $0 [--preflight | --dry-run]"; exit 2 ;; esac
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NCLIB_BUILD_DIR=${NCLIB_BUILD_DIR:-$ROOT/build/extensions}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=agg TQDM_DISABLE=1
LOG=$ROOT/build/gpu-check
mkdir -p "$LOG"
rm -f "$LOG/bench.md"  # only this run's benchmark rows go into the table
if [ "$MODE" = full ]; then TABLE=$ROOT/benchmarks/gpu.md; else TABLE=$LOG/gpu.md; fi

# The python: $PY if given; else the first of .venv/bin/python, python3 whose torch has CUDA; else the first found.
if [ -z "${PY:-}" ]; then
  for cand in .venv/bin/python python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then PY=$cand; break; fi
    PY=${PY:-$cand}
  done
  PY=${PY:-python3}
fi
export PATH="$(dirname "$(command -v "$PY" 2>/dev/null || echo "$PY")"):$PATH"  # pip's ninja sits beside python
# nvcc and compute-sanitizer from CUDA_HOME or the usual toolkit folder when not on PATH
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && ! command -v nvcc >/dev/null 2>&1 && export PATH="$d/bin:$PATH"
  [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && ! command -v compute-sanitizer >/dev/null 2>&1 \
    && export PATH="$PATH:$d/bin"
done

ROWS=()     # "| gpu-check | step | seconds | goal | status |"
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
record() {  # name status seconds note
  ROWS+=("| gpu-check | $1 | $3 s${4:+: $4} |  | $2 |")
  case "$2" in FAIL*) FAILED=1 ;; esac
  echo "== gpu-check [$(( $(date +%s) - START )) s] $1: $2 ($3 s) $4"
}
# start NAME TIMEOUT CMD...: run CMD in the background under timeout, log to $LOG/NAME.log; PID in PIDS[NAME]
declare -A PIDS T0 LIMIT
start() {
  local name=$1 limit=$2; shift 2
  local rem; rem=$(( $(left) - 5 ))
  (( limit > rem )) && limit=$rem
  if (( limit < 10 )); then PIDS[$name]=""; LIMIT[$name]=0; return; fi
  echo "== gpu-check [$(( $(date +%s) - START )) s] $name (limit ${limit} s): $*"
  T0[$name]=$(date +%s); LIMIT[$name]=$limit
  timeout -k 10 "$limit" "$@" >"$LOG/$name.log" 2>&1 &
  PIDS[$name]=$!
}
# finish NAME [CLASSIFIER]: wait for NAME, record PASS / FAIL / TIMEOUT (CLASSIFIER may turn a log into "n/a")
finish() {
  local name=$1 classify=${2:-}
  if [ -z "${PIDS[$name]}" ]; then record "$name" "FAIL (no time left in GPU_CHECK_BUDGET)" 0 ""; return; fi
  wait "${PIDS[$name]}"; local rc=$?
  local secs=$(( $(date +%s) - T0[$name] )) note=""
  note=$(grep -E "passed|failed|error|ERROR SUMMARY|sanitize-case|built " "$LOG/$name.log" | tail -1 | tr '|' '/' | cut -c1-120)
  if [ -n "$classify" ] && "$classify" "$LOG/$name.log"; then
    record "$name" "n/a" "$secs" "$(grep -m1 -iE 'not supported|unable' "$LOG/$name.log" | cut -c1-100)"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" "FAIL (timeout ${LIMIT[$name]} s)" "$secs" "$note"; tail -20 "$LOG/$name.log"
  elif (( rc != 0 )); then
    record "$name" "FAIL (exit $rc)" "$secs" "$note"; tail -30 "$LOG/$name.log"
  else
    record "$name" "ok" "$secs" "$note"
  fi
}
sanitizer_unsupported() { grep -qiE "device not supported|unable to find injection|not supported on this" "$1"; }

emit_table() {
  local bench=$LOG/bench.md
  {
    echo "# GPU check: build, tests, compute-sanitizer, CUDA lattice, NC loss, dense CRF, training step"
    echo
    echo "\`bash scripts/gpu_check.sh$([ "$MODE" = full ] || echo " $MODE")\`"\
         "$(date -u +%Y-%m-%d), $(( $(date +%s) - START )) s in all (goal <= 300 s);"\
         "python $PY, $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)."
    [ -f "$bench" ] && grep -v '^|' "$bench" | sed -n '3,4p'
    echo
    echo "| section | measurement | value | goal | status |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    [ -f "$bench" ] && grep '^| ' "$bench" | grep -v '^| section |'
    echo
  } >"$TABLE"
  echo; cat "$TABLE"
  echo "gpu-check: $([ $FAILED = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED") in" \
       "$(( $(date +%s) - START )) s; table in ${TABLE#"$ROOT"/}, logs in ${LOG#"$ROOT"/}/"
}

# ------------------------------------------------------------------------------------------------ 1. preflight
T=$(date +%s)
timeout -k 5 60 "$PY" - "$MODE" >"$LOG/preflight.log" 2>&1 <<'EOF'
"""Each missing piece: one line 'MISSING <what>: <fix>'. Exit 1 if any."""
import importlib, os, re, shutil, subprocess, sys, tempfile
missing = []
def miss(what, fix):
    missing.append(what)
    print(f"MISSING {what}: {fix}")
print(f"python {sys.executable} {sys.version.split()[0]}")
try:
    import torch
except Exception as e:
    miss("torch", f"run with PY=/path/to/the/python/that/has/a/CUDA/torch (import torch failed: {e})")
    sys.exit(1)
cuda = torch.version.cuda
print(f"torch {torch.__version__}, torch.version.cuda {cuda}")
tested = (2, 13)  # pyproject.toml's lower bound: the oldest torch the CPU test suite ran against
if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < tested:
    print(f"NOTE torch {torch.__version__} is older than the tested bound {tested[0]}.{tested[1]}: this run is its test")
if cuda is None:
    miss("a CUDA build of torch", f"torch {torch.__version__} is a CPU build: set PY= to the python of the CUDA "
         "torch (on the GPU image: python3), or install one (pip install torch --index-url "
         "https://download.pytorch.org/whl/cu130, needs network)")
elif not torch.cuda.is_available():
    miss("a visible GPU", "torch has CUDA but sees no device: check nvidia-smi, the driver, CUDA_VISIBLE_DEVICES")
else:
    print(f"GPU {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
nvcc = shutil.which("nvcc")
if nvcc is None:
    miss("nvcc", "install the CUDA toolkit " + (cuda or "matching torch") + " or export CUDA_HOME=/path/to/cuda "
         "(nvcc in $CUDA_HOME/bin)")
else:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    print(f"nvcc {nvcc} (CUDA {m.group(1)}.{m.group(2) if m else '?'})" if m else f"nvcc {nvcc}")
    if m and cuda and m.group(1) != cuda.split(".")[0]:
        miss("an nvcc matching torch's CUDA major", f"nvcc is CUDA {m.group(1)}.{m.group(2)}, torch was built with "
             f"CUDA {cuda}: export CUDA_HOME to a CUDA {cuda.split('.')[0]}.x toolkit")
    # does nvcc accept the host compiler? (torch passes -ccbin $CC when CC is set)
    cc = os.environ.get("CC")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cu")
        open(src, "w").write("__global__ void k(float* x) { x[0] = 1.f; }\n")
        cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "t.o")] + (["-ccbin", cc] if cc else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
    host = cc or "gcc"
    ver = subprocess.run([host, "-dumpfullversion"], capture_output=True, text=True).stdout.strip() \
        if shutil.which(host) else "absent"
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        hint = next((ln for ln in msg if "unsupported" in ln.lower() or "not found" in ln.lower()), msg[-1] if msg else "")
        miss(f"a host gcc that nvcc accepts ({host} {ver})", "install a supported gcc (e.g. apt-get install g++-13) "
             f"and export CC=gcc-13 CXX=g++-13 [nvcc said: {hint.strip()[:120]}]")
    else:
        print(f"nvcc accepts host compiler {host} {ver}")
if shutil.which("ninja") is None:
    miss("ninja", "pip install ninja (or apt-get install ninja-build)")
if shutil.which(os.environ.get("CXX", "c++")) is None:
    miss("a C++ compiler", "apt-get install g++ (or export CXX=)")
try:
    import pytest  # noqa: F401
except ImportError:
    miss("pytest", "pip install pytest (offline: carry its wheel, see the device notes)")
try:
    import nclib, nclib.losses, nclib.crf, nclib.models, nclib.train  # noqa: F401,E401
    print(f"nclib from {os.path.dirname(nclib.__file__)}")
except ImportError as e:
    miss(f"python module {e.name}", f"pip install {e.name} (nclib imports it; offline: carry its wheel)")
if shutil.which("compute-sanitizer") is None:
    print("WARNING compute-sanitizer not found (the sanitizer steps will fail): it ships with the CUDA toolkit, "
          "add $CUDA_HOME/bin to PATH")
print(f"preflight: {len(missing)} missing" + (": " + ", ".join(missing) if missing else ""))
sys.exit(1 if missing else 0)
EOF
rc=$?
cat "$LOG/preflight.log"
if (( rc == 0 )); then
  record preflight ok $(( $(date +%s) - T )) ""
else
  record preflight "FAIL (exit $rc)" $(( $(date +%s) - T )) "$(grep -c ^MISSING "$LOG/preflight.log") missing piece(s), see above"
  if [ "$MODE" != --dry-run ]; then emit_table; exit 1; fi
  echo "(dry run: going on without the missing pieces)"
fi
[ "$MODE" = --preflight ] && { emit_table; exit $FAILED; }

# ------------------------------------------------------------------------------------------------ 2. build
PYT=("$PY" -m pytest -q -p no:randomly -p no:cacheprovider)
if [ "$MODE" != --dry-run ]; then
  start build-cuda 240 "$PY" -c "from nclib import _ext; _ext.load('cuda'); print('built cuda')"
fi
start build-cpu 240 "$PY" -c "from nclib import _ext; _ext.load('cpu'); print('built cpu')"
start build-emulation+tests 240 "${PYT[@]}" tests/test_cuda.py -k emulated
[ "$MODE" != --dry-run ] && finish build-cuda
finish build-cpu
finish build-emulation+tests

# ------------------------------------------------------------------------------------------------ 3. tests, sanitizer
start gpu-tests 180 "${PYT[@]}" -m "not slow" -k "(cuda or gpu) and not emulated" tests
if [ "$MODE" != --dry-run ]; then
  for tool in memcheck initcheck; do
    start "sanitizer-$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 --print-limit 20 ${GPU_CHECK_SANITIZER_ARGS:-} "$PY" scripts/bench_gpu.py --sanitize-case
  done
fi
[ "$MODE" = --dry-run ] && start sanitize-case-on-cpu 60 "$PY" scripts/bench_gpu.py --sanitize-case --dry-run
finish gpu-tests
if [ "$MODE" = --dry-run ]; then
  finish sanitize-case-on-cpu  # the workload the sanitizer runs, without the sanitizer and the GPU
else
  finish sanitizer-memcheck sanitizer_unsupported
  finish sanitizer-initcheck sanitizer_unsupported
fi

# ------------------------------------------------------------------------------------------------ 4. benchmark
if [ "$MODE" = --dry-run ]; then
  start bench 120 "$PY" scripts/bench_gpu.py --dry-run --out "$LOG/bench.md"
else
  start bench 240 "$PY" scripts/bench_gpu.py --out "$LOG/bench.md"
fi
finish bench
grep -E '^\| ' "$LOG/bench.log" | grep -q FAIL && echo "(bench: FAIL rows in the table)"

emit_table
exit $FAILED
