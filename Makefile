# posettp: two commands matter — `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/posettp demo --out demo-out

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x tests

test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf demo-out .pytest_cache
