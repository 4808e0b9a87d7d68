# The two set-up commands (see README): `make repro` and `make test`.
# Each creates .venv if missing, installs the pinned dependencies, makes the dataset available
# and then runs the pipeline, respectively the tests.

VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install data postgres mlflow-server mlflow-server-stop repro test lint mutation
.DEFAULT_GOAL := repro

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist, installed when params.yaml needs it
# and it is missing (as root or with password-less sudo); otherwise a message says what to do.
data: install
	@pkg=$$($(BIN)/python -c "from bnnprune.pipeline.config import load_params; \
	from bnnprune.pipeline.data import missing_debian_package as m; print(m(load_params().data) or '')") \
	|| exit 1; [ -z "$$pkg" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install $$pkg', or put the four IDX files (train-images-idx3-ubyte.gz, ...) in a folder and set data.root in params.yaml" >&2; exit 1; fi; \
	echo "installing Debian package $$pkg"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$pkg >/dev/null

# PostgreSQL 15 (Debian package) for the shared MLflow server and its test; installed when missing
# (as root or with password-less sudo).
PG_BIN ?= /usr/lib/postgresql/15/bin
postgres:
	@test -x $(PG_BIN)/pg_ctl && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "PostgreSQL 15 is missing: run 'sudo apt-get install postgresql-15'" >&2; exit 1; fi; \
	echo "installing Debian package postgresql-15"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	postgresql-15 >/dev/null

# The shared tracking server (README "Working as a team"): PostgreSQL + `mlflow server` on
# 127.0.0.1, data in MLFLOW_DATA (default ./mlflow-server), ports MLFLOW_PORT (5000), PG_PORT (5433).
mlflow-server: install postgres
	scripts/mlflow_server.sh start

mlflow-server-stop:
	scripts/mlflow_server.sh stop

repro: install data
	dvc repro

test: install data postgres
	pytest

lint: install
	ruff check src stages tests

# Mutation testing of the core (README, reports/mutation.md): mutmut mutates the modules listed
# in pyproject.toml [tool.mutmut] and runs their fast unit tests against every mutant, then
# prints the score per module. A fresh run by default (mutants/ holds a copy of src/ that goes
# stale); `make mutation RESUME=1` continues an interrupted run from mutmut's saved results.
# Not part of `make test`: 1403 mutants take hours on 2 cores.
mutation: install
	$(if $(RESUME),,rm -rf mutants)
	mutmut run
	python scripts/mutation_report.py
