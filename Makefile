# Two commands on a fresh machine: `make run` (serve) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the project so pip keeps it; on a machine without a GPU you may point this at a CPU build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test install install-dev browser lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

## run: install what is missing, fetch and convert the default model if missing, migrate, serve
run: $(VENV)/.installed
	$(BIN)/chipi serve

## browser: Debian's chromium for the web chat test (apt-get, with sudo when not root), if missing
browser:
	sh scripts/install-chromium.sh

## test: install the dev extras and chromium if missing and run the whole suite (SQLite and PostgreSQL)
test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy app

## bench: one table of Chipi's performance on this machine (bench/suite.py; PostgreSQL must be running)
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.suite

clean:
	rm -rf $(VENV) database
