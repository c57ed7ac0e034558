# The two commands: `make run` starts the console with a living demo mesh; `make test` runs
# every test and quality gate.
# Both build their own virtual environment on first use, needing only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench-proxy bench-catalog clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/meshctl demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy app mesh_agent

# Worker processes for the suite (pytest-xdist); tests that start real processes stay together
# per file (tests/conftest.py). PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 3

pytest: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test: lint typecheck pytest

bench-proxy: $(STAMP)
	$(BIN)/python bench/proxy.py

bench-catalog: $(STAMP)
	$(BIN)/python bench/catalog.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
