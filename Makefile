# The README's two commands: `make demo` and `make test`. Everything a fresh machine needs is installed here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.ctray-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-all bench bench-read bench-ct lint clean data-package

install: $(STAMP) data-package

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test,dev]"
	@touch $(STAMP)

# Debian's Fashion-MNIST (the real data of the demo and the benchmarks).
data-package:
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) ; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist'" >&2; \
	  echo "(tests that need it are skipped; 'make demo' needs it)" >&2; \
	fi

demo: install
	$(VENV)/bin/ctray demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# CT against SS / AC / STRIP / SCAn over every shipped attack + no attack on Fashion-MNIST 10k, with
# retraining (docs/bench.md). Long on a 2-core CPU box; resumable: rerun to continue. BENCH_ARGS adds options.
BENCH_DIR ?= bench-run
bench: install
	@test -f $(BENCH_DIR)/fashion-mnist/manifest.json || $(VENV)/bin/ctray data fashion-mnist \
	  --out $(BENCH_DIR)/fashion-mnist --n-train 10000 --n-clean 1000 --n-test 2000 --shard-size 2500
	$(VENV)/bin/ctray bench --base $(BENCH_DIR)/fashion-mnist --attacks all --out $(BENCH_DIR)/grid \
	  --preset small --retrain scale.num_workers=0 bench.strip_n=20 $(BENCH_ARGS)

bench-read: install
	$(PY) -m ctray.benchmarks.read

bench-ct: install
	$(PY) -m ctray.benchmarks.ct

lint: install
	$(VENV)/bin/ruff check ctray tests
	$(VENV)/bin/mypy ctray

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
