# `make demo` and `make test` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raysys-installed
PYTEST_ARGS ?=

.PHONY: demo test lint clean install

install: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build from this machine's disk
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raysys demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check raysys serve jobs tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
