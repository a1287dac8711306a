# Two commands from a fresh clone:  `make run` (set up, then the default study)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/fedmerge run

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup  # the formatter and the linter (ruff, configured in pyproject.toml); `ruff format .` fixes the first
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

test-fast: setup  # the tests not marked slow (no real Ray run, deployment or process test)
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/aggregation.py
