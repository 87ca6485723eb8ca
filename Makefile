# `make demo` and `make test` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raysys-installed
PYTEST_ARGS ?=

.PHONY: demo test lint clean install image image-gpu

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

# the image the KubeRay manifests and cluster.yaml name (tag = the project's version); needs docker and a registry
IMAGE ?= ghcr.io/raysys/raysys:0.1.0
image:
	docker build -f deploy/docker/Dockerfile -t $(IMAGE) .

image-gpu:
	docker build -f deploy/docker/Dockerfile --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
		--build-arg TORCH_INDEX=https://pypi.org/simple -t $(IMAGE)-gpu .
