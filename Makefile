# Developer actions. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: help install run worker flower test lint docs docs-serve upstream fmt demo bench soak clean

help:
	@echo "make run    the whole stack in the foreground: Redis (if none answers), worker, Flower"
	@echo "make test   the test suite (real Redis, real worker, loopback HTTP server)"
	@echo "make lint   ruff, mypy and the import layers"
	@echo "make docs   the documentation site (docs/), built strictly into .run/site"
	@echo "make upstream  the upstream canaries and end-to-end smoke tests against the newest"
	@echo "               Celery, kombu and Flower of the pinned majors (in .venv-upstream)"
	@echo "make demo   50 generated images through the real stack, with a summary"
	@echo "make bench  the benchmark report (docs/benchmarks.md)"
	@echo "make soak   the chaos soak, about 10 minutes (docs/soak.md; SOAK_QUICK=1: 2 minutes)"

# Two distributions from one checkout: the client (client/, what other services install) and
# the workers, which depend on it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ./client -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	@bash scripts/stack.sh

# Three test processes: the suite waits on real processes and the network far more than it
# computes, and each process gets its own private Redis and workers.
# scripts/setup.sh: the Debian packages the suite runs for real (installed when root; named
# and stopped otherwise).
test: install $(VENV)/wheelhouse/.filled
	@bash scripts/setup.sh
	$(PY) -m pytest -n 3 --dist worksteal

# Wheels for the producer venvs that tests/test_client_install.py builds (tests/wheelhouse.py):
# downloaded here, once, so the tests install from local files only.
$(VENV)/wheelhouse/.filled: $(VENV)/.installed client/pyproject.toml tests/wheelhouse.py
	$(PY) -m tests.wheelhouse
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The pins stay exact; this runs the canaries (tests/test_upstream_canaries.py) and a few
# end-to-end tests against the newest releases of the same major versions, in a venv of its own.
upstream:
	PYTHON=$(PYTHON) bash scripts/upstream.sh

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: install
	$(PY) -m scripts.demo

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ./client -e '.[dev,bench]'
	touch $@

# The peers (nginx, curl, wget, aria2c) come from apt when missing and we are root; a peer that
# cannot be installed is skipped and named in the report. BENCH_QUICK=1: a two-minute smoke run.
bench: install $(VENV)/.bench-installed
	@bash scripts/bench-peers.sh
	$(PY) -m bench
	$(PY) -m bench.origins

# Not part of `make test`: a long run that crashes Redis and kills workers on purpose.
# SOAK_QUICK=1: a short run; SOAK_DOWNLOADS=N: N downloads, the time scaled to match;
# SOAK_BROKER=rabbitmq: a private RabbitMQ node as the broker, crashed in turn too.
# SOAK_DISK_MARGIN=<bytes>: the workers reserve disk space (DOWNLOAD_DISK_MARGIN) as they go.
soak: install
	$(PY) -m soak

clean:
	rm -rf $(VENV) .venv-upstream .run build *.egg-info .pytest_cache .mypy_cache .ruff_cache
