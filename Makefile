# One command runs the broker, one runs every test; both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench bench-first-output fault-table setup setup-test clean

## run: start the broker on its embedded defaults (local backend, memory store)
run: $(VENV)/.runtime
	$(BIN)/session-broker serve

## test: install everything the tests need (Redis, npm clients, ...) and run them all
test: setup-test
	$(BIN)/pytest $(PYTEST_ARGS)

## fault-table: run the fault suite (marker chaos) and rewrite its table in docs/operations.md
fault-table: setup-test
	WRITE_FAULT_TABLE=1 $(BIN)/pytest -m chaos $(PYTEST_ARGS)

## lint: ruff and mypy
lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/mypy

## bench: proxy benchmark, direct vs through the broker (prints a table)
bench: setup-test
	$(BIN)/python bench/ws_bench.py $(BENCH_ARGS)

## bench-first-output: new visitors to print(1)'s first output, local and JupyterHub (prints a table)
bench-first-output: setup-test
	$(BIN)/python bench/bench_first_output.py $(BENCH_ARGS)

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test
	bash scripts/setup-test-deps.sh

$(VENV)/.runtime: pyproject.toml setup.py src/broker/proxy/_wire_py.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[speed,local]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[speed,local,test]'
	touch $@

clean:
	rm -rf $(VENV) .tools tests/js/node_modules .pytest_cache .mypy_cache .ruff_cache
