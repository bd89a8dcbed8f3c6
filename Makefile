# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast wheel-check bench zoo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# An unpinned torch would pull a multi-GB CUDA build: install the CPU build first when none is importable.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[lightning,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradwatch demo

# One pytest worker per core (pytest-xdist), at most 8 (each imports torch, Lightning and transformers: ~1 GB);
# worksteal hands the long tests' neighbours to an idle worker. Every test runs in one intra-op thread
# (tests/conftest.py), so the workers do not oversubscribe the cores.
PYTEST_WORKERS := -n auto --maxprocesses 8 --dist worksteal

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not slow"

# The release check: build the sdist and wheel, install the wheel (not editable) into a fresh venv, WHEEL_VENV,
# and use it from outside the checkout: import, the README's quickstart for 20 steps, `gradwatch --help`, the
# extras' adapters (.ci/wheel_check.py). torch==2.13.0 goes in first, as above.
WHEEL_VENV ?= .venv-wheel
wheel-check: $(STAMP)
	rm -rf dist
	$(PY) -m build -q --outdir dist .
	$(PY) .ci/wheel_check.py --dist dist --venv $(WHEEL_VENV)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# The calibration zoo (docs/validation.md). Each torchvision release requires its own torch (0.29: torch >= 2.14)
# and timm requires torchvision, so the full zoo runs in an environment of its own, ZOO_VENV: created when missing
# (torch 2.14.1 + torchvision 0.29.1: the pair this project's machines keep on disk; elsewhere pip downloads a
# multi-GB CUDA build) or a ready one (make zoo ZOO_VENV=path). Entries whose library
# is not installed there are skipped.
# Default 300 steps every 5; docs/validation.md says which command made it (e.g. ZOO_ARGS="--steps 100 --every 2").
ZOO_VENV ?= .venv-zoo
ZOO_ARGS ?=
zoo:
	@test -x $(ZOO_VENV)/bin/python || ($(PYTHON) -m venv $(ZOO_VENV) && \
		$(ZOO_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm transformers)
	$(ZOO_VENV)/bin/pip install -q -e . --no-deps
	$(ZOO_VENV)/bin/pip install -q "tensorboard>=2.12" "numpy>=1.23" "pandas>=1.5"
	$(ZOO_VENV)/bin/python -m gradwatch.reference.zoo --threads 1 --out runs/zoo --json runs/zoo.json \
		--out-md docs/validation.md $(ZOO_ARGS)

clean:
	rm -rf $(VENV) .venv-zoo $(WHEEL_VENV) dist runs *.egg-info
