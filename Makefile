# openhtc developer entry points.
#
#   make demo    the main job: start a server, run a parameter sweep, show the results
#   make test-unit  the pure tests only (pytest -m unit): no server, database or runtime; seconds
#   make test    what CI runs (.ci/run): ruff, ruff format, lint-imports, mypy, pytest on SQLite and PostgreSQL,
#                and the benchmark smoke run once bench/ has one
#
# Both first create or refresh the virtualenv in .venv (python3 -m venv; pip install -e '.[dev]').
# On a fresh Debian machine they install what is missing through apt-get: python3-venv, and for
# `make test` the PostgreSQL server binaries (the tests start their own private cluster).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.openhtc-installed

# make demo PORT=8090 DEMO_DIR=/tmp/htc-demo
PORT ?=
DEMO_DIR ?= .htc-demo
# make test DB=sqlite PYTEST_ARGS='-x -k compat'
DB ?= both
PYTEST_ARGS ?=
# pytest-xdist workers for make pytest: the CPUs, at least 2 (most tests wait on a server, a job or
# a daemon, not on the CPU); PYTEST_WORKERS=0 runs the tests serially in one process.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 2 ? 2 : n )))

# apt-get as root, or through sudo.
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: slurm-demo cluster-demo cluster-up cluster-down htcctl-bundle help install demo test test-unit lint typecheck pytest bench-smoke bench-peers postgres containers clean distclean

help:
	@echo "make demo        start a server, submit a parameter sweep, show the results (PORT=8080)"
	@echo "make cluster-demo  the sweep on a local cluster: PostgreSQL, 2 servers, AGENTS=3 agents in netns (root)"
	@echo "make cluster-up / cluster-down   start / stop that cluster (CLUSTER_DIR=.htc-cluster)"
	@echo "make slurm-demo  the sweep on Slurm pilots: a private Slurm, a server, an allocation queue (root)"
	@echo "make test        ruff, ruff format --check, mypy, pytest (DB=both|sqlite|postgres), bench smoke"
	@echo "make test-unit   the pure tests only (marked unit): no server, database or runtime; seconds"
	@echo "make lint        ruff check, ruff format --check, lint-imports (the layer contracts)"
	@echo "make typecheck   mypy"
	@echo "make pytest      the tests only (PYTEST_ARGS='-x -k compat', DB=sqlite, PYTEST_WORKERS=0 serially)"
	@echo "make install     create or refresh $(VENV)"
	@echo "make containers  apt-get install the container tools that are missing (bubblewrap, podman, …)"
	@echo "make bench-peers the full side-by-side benchmark: openhtc, HyperQueue, Dask, Ray, Slurm (long)"
	@echo "make htcctl-bundle  write dist/htcctl: htcctl as one file needing only python3 (for images)"
	@echo "make clean       remove the demo data and caches; distclean also removes $(VENV)"

# -- the virtualenv ---------------------------------------------------------------------------

install: $(STAMP)

# Rebuilt when pyproject.toml changes or the venv is gone; a no-op otherwise.
$(STAMP): pyproject.toml
	@if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	    echo "==> $(PYTHON) not found; installing it with apt-get"; \
	    $(APT) update -qq && $(APT) install -y -qq python3 python3-venv; \
	fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	    || { echo "openhtc needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	    echo "==> creating $(VENV)"; \
	    if ! $(PYTHON) -m venv --clear $(VENV); then \
	        echo "==> python3 -m venv failed; installing python3-venv with apt-get"; \
	        $(APT) update -qq && $(APT) install -y -qq python3-venv; \
	        $(PYTHON) -m venv --clear $(VENV); \
	    fi; \
	fi
	@echo "==> pip install -e '.[dev]' into $(VENV)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# -- the main job -----------------------------------------------------------------------------

demo: install containers
	@PORT='$(PORT)' DATA_DIR='$(DEMO_DIR)' HTC='$(VENV)/bin/htc' PY='$(PY)' bash examples/demo.sh

# Cluster mode on this machine (docs/cluster.md; root: network namespaces).
AGENTS ?= 3
CLUSTER_DIR ?= .htc-cluster
cluster-demo: install postgres
	@AGENTS='$(AGENTS)' CLUSTER_DIR='$(CLUSTER_DIR)' HTC='$(VENV)/bin/htc' PY='$(PY)' bash examples/cluster-demo.sh

# Allocation queues on a private Slurm (docs/allocation.md, "Try it on one machine"; root).
SLURM_DEMO_DIR ?= .htc-slurm-demo
slurm-demo: install containers
	@SLURM_DEMO_DIR='$(SLURM_DEMO_DIR)' HTC='$(VENV)/bin/htc' PY='$(PY)' bash examples/slurm-demo.sh

cluster-up: install postgres
	$(VENV)/bin/htc cluster up --agents $(AGENTS) --dir $(CLUSTER_DIR)

cluster-down: install
	$(VENV)/bin/htc cluster down --dir $(CLUSTER_DIR)

# htcctl as one file for container images (examples/Containerfile.htcctl).
htcctl-bundle: install
	@$(VENV)/bin/htc htcctl-bundle dist/htcctl

# -- the checks -------------------------------------------------------------------------------

# Every step runs even when an earlier one failed, so one run reports everything; the summary
# line names the failures and the exit status is non-zero if there are any.
test: install postgres containers
	@start=$$(date +%s); failed=""; passed=""; steps="lint typecheck pytest"; note=""; \
	if [ -f bench/__main__.py ]; then steps="$$steps bench-smoke"; \
	else note="; no bench smoke: bench/__main__.py does not exist yet"; fi; \
	for step in $$steps; do \
	    if $(MAKE) --no-print-directory $$step; then passed="$$passed $$step"; \
	    else failed="$$failed $$step"; fi; \
	done; \
	took=$$(( $$(date +%s) - start )); \
	if [ -n "$$failed" ]; then \
	    echo "make test: FAILED:$$failed (passed:$${passed:- none}; DB=$(DB); $${took}s$$note)"; exit 1; \
	fi; \
	echo "make test: PASSED:$$passed (DB=$(DB); $${took}s$$note)"

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]; docs/architecture.md, "Layers").
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: install
	$(VENV)/bin/mypy

# Exit status 5 (no tests collected) fails like any other non-zero status. --dist loadgroup: the
# tests of one xdist group run on one worker (openhtc.testing.parallel says which and why).
pytest: install
	@workers='$(PYTEST_WORKERS)'; parallel=""; \
	if [ "$$workers" != 0 ]; then parallel="-n $$workers --dist loadgroup"; fi; \
	rc=0; $(PY) -m pytest tests -p no:cacheprovider -ra --durations=25 --db $(DB) $$parallel $(PYTEST_ARGS) \
	    || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): that is a failure" >&2; fi; \
	exit $$rc

# The pure tests (@pytest.mark.unit): what a newcomer runs first, in seconds.
test-unit: install
	$(PY) -m pytest tests -m unit -q -p no:cacheprovider --db sqlite $(PYTEST_ARGS)

# The benchmark smoke run, once bench/__main__.py exists.
bench-smoke: install
	@if [ -f bench/__main__.py ]; then \
	    echo "$(PY) -m bench --smoke"; $(PY) -m bench --smoke && \
	    echo "$(PY) -m bench.dashboards --smoke"; $(PY) -m bench.dashboards --smoke; \
	else \
	    echo "bench-smoke: bench/__main__.py does not exist yet; nothing to run"; \
	fi

# Every workload on openhtc (SQLite and PostgreSQL), the spawn floor and every peer, in one run;
# missing peers are installed first (pip into bench/.peers-venv; apt-get for Slurm). Writes
# bench/results/latest.{md,json,png} and docs/img/peers.png (docs/performance.md, "Peers").
bench-peers: install containers postgres
	$(PY) -m bench --peers --chart docs/img/peers.png

# The tests start a private PostgreSQL cluster from the installed server binaries; install them
# when they are missing (never skipped in CI: without them the PostgreSQL tests fail there).
postgres:
	@if [ "$(DB)" = sqlite ] || [ -n "$${OPENHTC_TEST_PG_BIN:-}" ] \
	    || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
	    || { command -v pg_ctl >/dev/null && [ -x "$$(dirname "$$(command -v pg_ctl)")/initdb" ]; }; then \
	    exit 0; \
	fi; \
	echo "==> PostgreSQL server binaries not found; installing the Debian package 'postgresql'"; \
	if ! { $(APT) update -qq && $(APT) install -y -qq postgresql; }; then \
	    if [ "$${CI:-}" = true ]; then echo "could not install PostgreSQL" >&2; exit 1; fi; \
	    echo "warning: could not install PostgreSQL; its tests will be skipped" >&2; \
	fi

# Container jobs need bubblewrap (the default runtime), podman with runc, the CNCF registry that
# `htc server` supervises, and skopeo, umoci and a static busybox for the test images. Install
# whatever is missing (never skipped in CI: without them the container tests fail there).
# chromium: the dashboard's headless-browser test (tests/test_dashboard.py); prometheus: the metrics
# test scrapes the server with a real Prometheus (tests/test_metrics.py); slurm-wlm, munge: a private
# Slurm for the allocation queue tests (tests/alloc/test_slurm_pilots.py).
CONTAINER_PACKAGES := bubblewrap podman runc docker-registry skopeo umoci busybox-static chromium prometheus \
  slurm-wlm munge
containers:
	@missing=""; for pkg in $(CONTAINER_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "==> installing container tools with apt-get:$$missing"; \
	if ! { $(APT) update -qq && $(APT) install -y -qq $$missing; }; then \
	    if [ "$${CI:-}" = true ]; then echo "could not install:$$missing" >&2; exit 1; fi; \
	    echo "warning: could not install$$missing; container features and tests will not work" >&2; \
	fi

clean:
	rm -rf $(DEMO_DIR) $(CLUSTER_DIR) $(SLURM_DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
