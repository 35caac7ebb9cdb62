# Two commands do all the set-up on a fresh machine:  `make figures`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is declared as a range in pyproject.toml; here we install the CPU wheel first so that pip does not
# pull a several-GB CUDA build. Override with e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." for CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The inline backend (not agg) so that executed notebooks store their figures as image/png outputs.
NB_ENV := MPLBACKEND=module://matplotlib_inline.backend_inline TQDM_DISABLE=1 PYTHONHASHSEED=0
# FORCE=1 retrains every cached result (`make figures FORCE=1`); PROFILE picks the parameters (params/*.yaml).
PROFILE ?= params/default.yaml
FORCE ?=
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: setup test unit nbval figures smoke bench cuda-check gpu-check data clean lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,notebook,proposals]"
	$(BIN)/python -m pip install -q -e ".[crf-reference]" || echo "pydensecrf2 did not build: the dense CRF comparison test will skip"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/python -m nclib.data make-default

unit: setup
	$(BIN)/python -m pytest -q tests

# nbval runs the committed notebooks read-only; their figures go to the ignored build/figures (NCLIB_FIGURES).
nbval: setup
	$(NB_ENV) NCLIB_FIGURES=$(CURDIR)/build/figures $(BIN)/python -m pytest -q --nbval-lax --nbval-current-env -p no:randomly $(NOTEBOOKS)

test: setup data lint unit nbval cuda-check

# Executes every notebook with the profile's parameters (unknown names fail before anything runs), strips the
# volatile metadata and writes it back over notebooks/ with its outputs and images; figures land in figures/.
figures: setup data
	$(NB_ENV) $(BIN)/python scripts/run_notebooks.py $(PROFILE) --write-back $(if $(FORCE),--force)
	@echo "figures written to figures/ (figures that need optional data: build/figures)"

# The notebooks with the CI profile (seconds each), into build/notebooks; tracked files untouched.
smoke: setup data
	$(NB_ENV) NCLIB_FIGURES=$(CURDIR)/build/figures $(BIN)/python scripts/run_notebooks.py params/smoke.yaml

# BASELINE=<path of another checkout, e.g. a git worktree of the previous main>: same-run ratios for the losses.
# tests/test_bench_scripts.py (make unit) runs each script with --quick, its tables in a temporary folder.
bench: setup
	$(BIN)/python scripts/bench_lattice.py
	$(BIN)/python scripts/bench_losses.py $(if $(BASELINE),--baseline $(BASELINE))
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_memory.py $(if $(BASELINE),--baseline $(BASELINE))
	$(BIN)/python scripts/profile_nc.py

# Static checks (pyflakes, import order, complexity <= 15, bugbear): configured in pyproject.toml [tool.ruff].
lint: setup
	$(BIN)/ruff check nclib tests scripts

# Compile-only check of the CUDA sources with nvcc (no GPU needed); skipped where nvcc is absent.
cuda-check: setup
	@if command -v nvcc >/dev/null 2>&1; then $(BIN)/python scripts/cuda_check.py; \
	else echo "cuda-check: nvcc not found, skipped"; fi

# On a fresh GPU machine whose python already has a CUDA torch: installs nothing (no venv, no pip, no network).
# Preflight, build, GPU tests, compute-sanitizer, benchmarks; one table -> benchmarks/gpu.md. PY= picks the python.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build .pytest_cache
