# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs when missing, at the versions in constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
PIP := $(BIN)/pip install --quiet --constraint $(LOCK)
# Intel's MKL (~1 GB) is only used on Intel CPUs (worker/ops/blas.py), so the demo takes it only there.
# The tests take it on every x86-64 CPU, so both BLAS paths are tested wherever CI runs.
DEMO_SPEC := $(if $(shell grep -qs GenuineIntel /proc/cpuinfo && echo intel),.[mkl],.)

.PHONY: demo test test-fast format proto proto-check lock clean

$(VENV)/.core: pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '$(DEMO_SPEC)'
	touch $@

# torch==2.13.0 (test extra) is the CPU build on disk: never let pip pick a CUDA build.
$(VENV)/.test: $(VENV)/.core
	$(PIP) -e '.[test,mkl]'
	touch $@

demo: $(VENV)/.core  ## seed example + MLP through a local gRPC server on embedded Ray (no torch, no test tools)
	$(BIN)/gradserve demo

# --durations: the slowest tests, listed at the end, so a run says where the suite's time goes.
test: $(VENV)/.test  ## the whole suite, slow multi-process tests included (what CI runs)
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: $(VENV)/.test  ## skip the slow multi-process tests
	$(BIN)/python -m pytest -q -m 'not slow' tests

format: $(VENV)/.test  ## rewrite the code as the lint test wants it: ruff format, then ruff's safe fixes
	$(BIN)/python -m ruff format .
	$(BIN)/python -m ruff check --fix .

proto: $(VENV)/.test  ## regenerate proto/v1/*_pb2*.py from the .proto files
	$(BIN)/python -m gradserve.proto.generate

proto-check: $(VENV)/.test
	$(BIN)/python -m gradserve.proto.generate --check

# Held back in the lock: ml_dtypes 0.7.0 takes 1.2-1.5 s to import where 0.6.0 takes 0.02 s, and
# onnx imports it, so every `gradserve grad model.onnx` paid it (benchmarks/cli_startup.py).
LOCK_PINS := 'ml_dtypes<0.7'

lock:  ## refresh constraints.txt: the newest releases pip resolves today (less LOCK_PINS), for the test and demo environments
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[test,mkl,dev]' $(LOCK_PINS)
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --all --exclude gradserve | sed 's/^torch==\([^+]*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv build

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
