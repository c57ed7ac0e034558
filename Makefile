# The two commands: `make run` starts the console with a living demo mesh; `make test` runs
# every test and quality gate.
# Both build their own virtual environment on first use, needing only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest native clean-native bench-proxy bench-catalog clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The agent's request path compiled with mypyc, in place (mesh_agent/native.py says which
# modules and why). Rebuilt when any agent source changes; an out-of-date build is never run.
NATIVE := mesh_agent/_native.built
$(NATIVE): $(STAMP) $(wildcard mesh_agent/*.py mesh_agent/proxy/*.py) agent/build_native.py
	$(BIN)/python agent/build_native.py

native: $(NATIVE)

clean-native:
	rm -f $(NATIVE) mesh_agent/*.so mesh_agent/proxy/*.so
	rm -rf build

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

# The suite runs against the compiled agent, the one that ships (compiled code checks types at
# run time, so it can fail where the interpreted code does not); PYTEST_NATIVE=0 runs it
# interpreted.
PYTEST_NATIVE ?= 1

pytest: $(STAMP) $(if $(filter 1,$(PYTEST_NATIVE)),$(NATIVE))
	$(if $(filter 1,$(PYTEST_NATIVE)),,$(MAKE) clean-native)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test: lint typecheck pytest

bench-proxy: $(STAMP) $(NATIVE)
	$(BIN)/python bench/proxy.py

bench-catalog: $(STAMP)
	$(BIN)/python bench/catalog.py

clean: clean-native
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
