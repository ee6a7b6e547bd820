# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, torch==2.13.0 (CPU build), the
# other dependencies, and the extension built in place against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.ext-built
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
SOURCES := $(CXX_SOURCES) setup.py
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: all build test test-fast test-slow test-avx2 lint format demo bench fuzz test-asan check-install clean

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

# `test` is the whole suite in two runs: `test-fast` (no test marked slow or gpu: about a minute) first, so that
# CI reports a quick failure quickly, then `test-slow` (the marked ones).
test: test-fast test-slow

test-fast: $(BUILT)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-slow: $(BUILT)
	$(PY) -m pytest -q -m "slow or gpu" tests

# The suite as an AVX2-only CPU runs it, on any machine: the kernels capped at AVX2 (SPARSEKERN_ISA, which also
# hides the AVX-512 features from `sparse`), and torch's own code paths capped the same way (ATen, oneDNN, MKL).
AS_AVX2 := SPARSEKERN_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(BUILT)
	$(AS_AVX2) $(PY) -m pytest -q tests

# `lint`: ruff (pyflakes, isort, pycodestyle at 120 columns; pyproject.toml) and clang-format (.clang-format) check,
# change nothing. `format` applies what they can fix; the rest (long strings, names) is by hand.
lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(DEPS)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

demo: $(BUILT)
	$(PY) -m sparse demo

# `make bench BENCH_ARGS="--preset full"`; output (CSV, summary.md, plots) in bench-out/.
BENCH_ARGS ?= --preset quick
bench: $(BUILT)
	$(PY) -m benchmarks $(BENCH_ARGS) --out bench-out

# Deliberate, slow runs (outside `make test`). `fuzz`: the property and fuzz tests under the long hypothesis
# profile (FUZZ_EXAMPLES examples per test). `test-asan`: the extension rebuilt with AddressSanitizer and
# UBSan in a copy under build-asan/ (the in-place build is untouched), then the op tests run against it.
FUZZ_EXAMPLES ?= 2000
fuzz: $(BUILT)
	HYPOTHESIS_PROFILE=long SPARSEKERN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_property.py tests/test_fuzz_formats.py

ASAN_DIR := build-asan
ASAN_TESTS ?= tests/test_ops.py tests/test_bsr_isa.py tests/test_fuzz_formats.py tests/test_property.py tests/test_numerics.py \
	tests/test_threads.py tests/test_scale.py
test-asan: $(DEPS)
	mkdir -p $(ASAN_DIR)/src
	tar cf - --exclude='_C*.so' --exclude=__pycache__ setup.py pyproject.toml csrc sparse kernels \
		| tar xf - -C $(ASAN_DIR)/src
	cd $(ASAN_DIR)/src && SPARSEKERN_SANITIZE=1 SPARSEKERN_CUDA=0 MAX_JOBS=2 $(abspath $(PY)) setup.py build_ext \
		--inplace --build-temp ../tmp > ../build.log 2>&1 || (tail -30 ../build.log; exit 1)
	# -P and --import-mode=append: the checkout must not shadow the sanitized copy on sys.path
	# (tests/test_fuzz_formats.py checks SPARSEKERN_EXPECT_BUILD against the loaded sparse._C).
	# libstdc++ preloaded too: python does not link it, and ASan must find the real __cxa_throw at start-up.
	PYTHONPATH=$(abspath $(ASAN_DIR)/src) LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		SPARSEKERN_EXPECT_BUILD=$(abspath $(ASAN_DIR)/src) \
		$(PY) -P -m pytest -q -p no:cacheprovider --import-mode=append $(ASAN_TESTS)

clean:
	rm -rf build dist *.egg-info sparse/_C*.so $(BUILT) $(ASAN_DIR)

check-install: $(BUILT)
	PY=$(abspath $(PY)) scripts/check_install.sh
