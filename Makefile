# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs when missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench proto proto-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the test extra: it is the CPU build (never let pip pick a CUDA build);
	# mkl: the BLAS the products run on where the CPU is Intel's (see worker/ops/blas.py)
	$(BIN)/pip install --quiet -e '.[test,mkl]'
	touch $(STAMP)

demo: $(STAMP)  ## seed example + MLP through a local gRPC server on embedded Ray
	$(BIN)/gradserve demo

test: $(STAMP)  ## the whole suite, slow multi-process tests included (what CI runs)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)  ## skip the slow multi-process tests
	$(BIN)/python -m pytest -q -m 'not slow' tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

proto: $(STAMP)  ## regenerate proto/v1/*_pb2*.py from the .proto files
	$(BIN)/python -m gradserve.proto.generate

proto-check: $(STAMP)
	$(BIN)/python -m gradserve.proto.generate --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
