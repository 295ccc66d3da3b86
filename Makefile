# Two commands do everything on a fresh machine:  `make run` (the main job) and `make test` (the tests).
# Each creates its own virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Local copies of datasets for machines without internet (used instead of downloading when present).
export KSHOT_OMNIGLOT_ARCHIVES ?= $(if $(wildcard ../shared/data/omniglot/images_background.zip),$(abspath ../shared/data/omniglot),)
# Where converted datasets are cached.
export KSHOT_DATA ?= $(CURDIR)/.kshot-cache

.PHONY: run test lint benchmarks install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## Meta-train a ProtoNet on Omniglot 5-way 1-shot for a few minutes, then print test accuracy +- 95% CI.
run: install
	$(BIN)/kshot train protonet-omniglot-quick --out runs/quickstart-$$(date +%Y%m%d-%H%M%S)

## The test suite.
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
