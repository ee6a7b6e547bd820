# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, torch==2.13.0 (CPU build), the
# other dependencies, and the extension built in place against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.ext-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: all build test demo bench check-install clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest -q tests

demo: $(BUILT)
	$(PY) -m sparse demo

# `make bench BENCH_ARGS="--preset full"`; output (CSV, summary.md, plots) in bench-out/.
BENCH_ARGS ?= --preset quick
bench: $(BUILT)
	$(PY) -m benchmarks $(BENCH_ARGS) --out bench-out

clean:
	rm -rf build dist *.egg-info sparse/_C*.so $(BUILT)

check-install: $(BUILT)
	PY=$(abspath $(PY)) scripts/check_install.sh
