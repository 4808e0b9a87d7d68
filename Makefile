# The two set-up commands (see README): `make repro` and `make test`.
# Each creates .venv if missing, installs the pinned dependencies, makes the dataset available
# and then runs the pipeline, respectively the tests.

VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
FMNIST := /usr/share/datasets/fashion-mnist
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install data repro test lint
.DEFAULT_GOAL := repro

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; skipped when params.yaml sets
# data.root or another dataset.
data:
	@if grep -Eq '^\s+root:\s*[^[:space:]#n]' params.yaml || ! grep -Eq '^\s+dataset:\s*fashion-mnist' params.yaml \
	  || test -f $(FMNIST)/train-images-idx3-ubyte.gz; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the four IDX files (train-images-idx3-ubyte.gz, ...) in a folder and set data.root in params.yaml" >&2; exit 1; fi; \
	echo "installing Debian package dataset-fashion-mnist"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null

repro: install data
	dvc repro

test: install data
	pytest

lint: install
	ruff check src stages tests
