# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv when needed. torch is installed first, pinned, so that a CPU-only machine
# never resolves an unpinned `torch` into a multi-GB CUDA build; pass TORCH_PIP_ARGS to pick an index
# (e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"), or SYSTEM_SITE=1 to reuse
# the CUDA torch already installed on a GPU machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
SYSTEM_SITE ?= 0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: env test demo plan-bench docs docs-slow docs-check clean-venv

env: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(BIN)/python || $(PY) -m venv $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages,) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e ".[runtime,reference,test]"
	@# triton (the `kernels` extra) only where none is installed: a CUDA torch pins its own triton version.
	@$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q -c requirements-lock.txt triton
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/lorabench plan --model 70b --method qlora
	$(BIN)/lorabench compare --model 7b
	$(BIN)/lorabench run -m sweep=cpu-smoke results_dir=results/_scratch
	$(BIN)/lorabench report results/_scratch/cpu-smoke --out reports/_scratch/cpu-smoke

plan-bench: $(STAMP)
	$(BIN)/python scripts/bench_plan_startup.py

# README.md and docs/*.md: every command-output block between <!-- docs ... --> markers is generated from a
# real run (scripts/readme.py; syntax in docs/ARCHITECTURE.md). `docs` re-runs the fast commands, `docs-slow`
# also the slow ones (a sweep, a 70B trace) and records their date, commit and wall time; tests/test_readme.py
# fails when a fast block differs from what today's code prints.
docs: $(STAMP)
	$(BIN)/python scripts/readme.py

docs-slow: $(STAMP)
	$(BIN)/python scripts/readme.py --slow

docs-check: $(STAMP)
	$(BIN)/python scripts/readme.py --check

clean-venv:
	rm -rf $(VENV)
